"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

import os
from pathlib import Path

import pytest

# Tests compile into no persistent cache (jaxgpt's commands default to ~/.cache/jaxgpt/xla), and
# the subprocesses they start inherit this; test_compile_cache.py and test_resume.py set their own.
os.environ["JAXGPT_COMPILE_CACHE"] = "off"

# Most tests' time is XLA:CPU compiling small programs that then run for milliseconds. LLVM at -O0
# compiles the same optimised HLO and fusions 25-50% faster (a 3-layer scanned value_and_grad:
# 2.8-3.1 s against 3.6-4.2 s at XLA's default, interleaved), and runs the machine code slower
# (the 45-step overfit test: 73 s against 33 s). Over the suite the summed test time fell 15%
# (1,383 -> 1,170 s, 2 workers). Benchmarks and the commands keep XLA's default. Subprocesses
# inherit the flag; tests that set their own XLA_FLAGS add to it (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # unless set (or imported twice)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: this process's (the suite's, or what you set) plus ``extra``."""
    return " ".join((os.environ["XLA_FLAGS"], *extra))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (the ../shared checkout beside the repo)")
    return SHARED


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file missing: {path}")
    return path


# The files that take longest run first: with two workers and `--dist loadfile` a long file
# collected last (test_packaging.py, alphabetically late) ran alone at the end, the other worker idle.
LONG_FIRST = ["test_packaging.py", "test_train.py", "test_export.py", "test_resume.py", "test_faults.py",
              "test_kernels.py", "test_model.py", "test_sharding.py", "test_demo.py", "test_multihost.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order
