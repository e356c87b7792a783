"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

import os
from pathlib import Path

import pytest

# Tests compile into no persistent cache (jaxgpt's commands default to ~/.cache/jaxgpt/xla), and
# the subprocesses they start inherit this; test_compile_cache.py and test_resume.py set their own.
os.environ["JAXGPT_COMPILE_CACHE"] = "off"

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
