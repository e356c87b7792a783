"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

import os
from pathlib import Path

import pytest

# Tests compile into no persistent cache (jaxgpt's commands default to ~/.cache/jaxgpt/xla), and
# the subprocesses they start inherit this; test_compile_cache.py and test_resume.py set their own.
os.environ["JAXGPT_COMPILE_CACHE"] = "off"

# Most of a test's time is XLA:CPU compiling small programs that then run for milliseconds. LLVM at
# -O0 halves that compile time (a 3-layer scanned value_and_grad: 4.2-7.7 s -> 2.0-3.7 s) from the
# same optimised HLO and fusions; only the machine code is optimised less. Benchmarks and the
# commands keep XLA's default. Subprocesses inherit the flag; tests that set their own XLA_FLAGS
# add to it (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # unless set (or imported twice)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: the suite's flags plus ``extra``."""
    return " ".join((TEST_XLA_FLAGS, *extra))

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
