"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

import contextlib
import os
from pathlib import Path

import pytest

# Tests compile into no persistent cache (jaxgpt's commands default to ~/.cache/jaxgpt/xla), and
# the subprocesses they start inherit this; test_compile_cache.py and test_resume.py set their own.
os.environ["JAXGPT_COMPILE_CACHE"] = "off"

# Most tests' time is XLA:CPU compiling small programs that then run for milliseconds. LLVM at -O0
# compiles the same optimised HLO and fusions 25-50% faster (a 3-layer scanned value_and_grad:
# 2.8-3.1 s against 3.6-4.2 s at XLA's default, interleaved), and runs the machine code slower
# (a train step of the overfit test: 1.9 s of CPU against 0.8 s). jax's flag
# jax_disable_most_optimizations is that setting, read at each compilation, so the tests that run
# many steps compile theirs at XLA's default (`optimized_xla`). Benchmarks and the commands keep
# XLA's default; subprocesses inherit the setting from the environment.
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # unless set (or the level is in XLA_FLAGS)


@contextlib.contextmanager
def optimized_xla():
    """Compile at XLA's default optimisation inside: for programs that run long enough to pay back
    the slower compilation (dozens of train steps)."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: this process's (what you set, if anything) plus ``extra``."""
    return " ".join((os.environ.get("XLA_FLAGS", ""), *extra)).strip()

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
LONG_FIRST = ["test_packaging.py", "test_gcs.py", "test_train.py", "test_export.py", "test_resume.py", "test_faults.py",
              "test_kernels.py", "test_model.py", "test_sharding.py", "test_lora.py", "test_demo.py", "test_multihost.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order
