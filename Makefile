# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-quick clean

# PyTorch (the reference in tests and benchmarks) comes from its CPU wheel index first: PyPI's Linux
# wheel of the same version pulls several GB of CUDA libraries. Where that index cannot be reached,
# pip falls back to the configured indexes (and says so).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_REQ   := $(shell grep -o 'torch==[0-9.]*' pyproject.toml | head -1)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --retries 1 --timeout 15 --index-url $(TORCH_INDEX) "$(TORCH_REQ)" \
		|| echo "note: $(TORCH_REQ) not installed from $(TORCH_INDEX); pip takes it from the default index"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxgpt.demo

# Two pytest workers, one test file each at a time (--dist loadfile keeps a file's fixtures in one
# process): most tests are bound by single-threaded XLA compilation (tests/conftest.py compiles at
# LLVM -O0 for that reason, but for the few tests that run dozens of steps), so on 2 cores the tests
# take 10-13 min on a clean clone (CI: .venv, the wheel's venv, the tests), the longest files
# handed out first. A third worker was no faster. TEST_WORKERS=0 runs them in this process.
# --durations=15: the slowest tests, printed in every CI log (the budget is 15 min in all).
# tests/test_packaging.py installs the built wheel into a venv of its own under .whl/ (no torch, no
# extras; dependencies from pip's cache at .venv's versions), built on its first run and reused.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python tools/bench.py

bench-quick: $(STAMP)
	$(BIN)/python tools/bench.py --quick

clean:
	rm -rf $(VENV) .whl out runs
