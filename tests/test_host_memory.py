"""jaxgpt.host_memory: the glibc malloc settings the CPU CLIs restart with, and what they change."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxgpt import host_memory

GLIBC = sys.platform.startswith("linux") and (host_memory.glibc_version() or (0, 0)) >= (2, 35)
needs_glibc = pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc >= 2.35 (the malloc hugetlb tunable)")


def cpu_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def run_python(code: str, env: dict) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@needs_glibc
def test_applies_on_a_cpu_host_and_not_elsewhere(monkeypatch):
    assert host_memory.why_not(cpu_env()) is None
    assert host_memory.OPT_OUT in host_memory.why_not(cpu_env(JAXGPT_MALLOC="default"))
    assert "already set" in host_memory.why_not(cpu_env(GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
    assert "JAX_PLATFORMS=cuda" in host_memory.why_not(cpu_env(JAX_PLATFORMS="cuda"))
    assert host_memory.why_not(cpu_env(JAX_PLATFORMS="cpu,cuda")) is None  # jax takes the first one
    unset = cpu_env()
    del unset["JAX_PLATFORMS"]
    monkeypatch.setattr(host_memory, "accelerator_plugin", lambda: "jax-cuda12-plugin")
    assert "jax-cuda12-plugin is installed" in host_memory.why_not(unset)
    assert host_memory.why_not(cpu_env()) is None  # JAX_PLATFORMS=cpu: the plugin is not used


def test_accelerator_plugin_names():
    match = host_memory._ACCELERATOR_PACKAGES.match
    for name in ("jax-cuda12-plugin", "jax_cuda13_plugin", "jax-rocm60-plugin", "libtpu", "libtpu-nightly"):
        assert match(name), name
    for name in ("jax", "jaxlib", "jax-cuda12-pjrt", "libtpu-extras"):
        assert not match(name), name


@needs_glibc
def test_the_process_restarts_once_with_the_settings():
    code = """
        import os
        from jaxgpt.host_memory import reexec_with_cpu_malloc
        print("start", flush=True)
        reexec_with_cpu_malloc()
        print(os.environ.get("GLIBC_TUNABLES"))
    """
    assert run_python(code, cpu_env()) == ["start", "start", host_memory.TUNABLES]
    assert run_python(code, cpu_env(JAXGPT_MALLOC="default")) == ["start", "None"]
    # the package itself does not load jax, so ``python -m jaxgpt.train`` restarts before it does
    assert run_python("import sys, jaxgpt; print('jax' in sys.modules)", cpu_env()) == ["False"]


@needs_glibc
def test_the_settings_stop_the_per_call_page_faults():
    """What the settings are for: XLA:CPU mallocs a call's temporaries afresh every call. A 64 MiB one
    (above glibc's mmap threshold) is faulted in page by page on every call with glibc's defaults;
    with the settings the freed block is reused."""
    code = """
        import resource
        import jax, jax.numpy as jnp
        f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)  # a [4096, 4096] float32 temporary between the products
        x = jnp.ones((4096, 32), jnp.float32) / 64
        f(x).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            f(x).block_until_ready()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
    """
    default = int(run_python(code, cpu_env())[-1])
    tuned = int(run_python(code, cpu_env(GLIBC_TUNABLES=host_memory.TUNABLES))[-1])
    pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert default > pages // 2, (default, pages)  # glibc's defaults: the temporary's pages, every call
    assert tuned < default // 10, (tuned, default)
