"""The persistent compilation cache jaxgpt's commands switch on (jaxgpt.compile_cache)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxgpt import compile_cache
from train_worker import tiny_hf_gpt2

ROOT = Path(__file__).resolve().parents[1]


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXGPT_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "jaxgpt" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == str(Path.home() / ".cache" / "jaxgpt" / "xla")
    monkeypatch.setenv("JAXGPT_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.default_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "", "None"):
        monkeypatch.setenv("JAXGPT_COMPILE_CACHE", off)
        assert compile_cache.default_dir() is None


@pytest.fixture
def restore_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_jax_setting_wins(monkeypatch, tmp_path, restore_cache_dir):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # as JAX_COMPILATION_CACHE_DIR does
    monkeypatch.setenv("JAXGPT_COMPILE_CACHE", str(tmp_path / "jaxgpt"))
    assert compile_cache.enable() == str(tmp_path / "jax")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAXGPT_COMPILE_CACHE", "off")
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("JAXGPT_COMPILE_CACHE", "~/somewhere")
    assert compile_cache.enable() == str(Path.home() / "somewhere")


def test_second_run_loads_the_compiled_programs(tmp_path):
    """``python -m jaxgpt.sample`` twice: the first run fills the cache, the second compiles nothing."""
    model = tiny_hf_gpt2(tmp_path / "model")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAXGPT_COMPILE_CACHE=str(cache), JAX_LOG_COMPILES="1",  # log_compiles: hits logged as warnings
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny model compiles in under a second
    cmd = [sys.executable, "-m", "jaxgpt.sample", "--model", str(model), "--prompt", "Hello",
           "--max-new-tokens", "8", "--temperature", "0"]
    runs = [subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "Persistent compilation cache hit" not in runs[0].stderr
    assert len(list(cache.iterdir())) >= 2, "the first run wrote no cache entries"
    for name in ("jit_prefill", "jit__decode"):
        assert f"Persistent compilation cache hit for '{name}'" in runs[1].stderr, runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout  # the cached programs compute the same tokens
