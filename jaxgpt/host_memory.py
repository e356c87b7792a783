"""glibc malloc settings for XLA:CPU: keep freed memory instead of faulting it in again every step.

XLA:CPU allocates a step's temporaries afresh on every call, in blocks large enough that glibc
serves them with ``mmap`` and unmaps them when freed, so every step faults its memory in again.
With ``TUNABLES`` they stay in malloc's heap (on transparent huge pages) and are reused: the step
is faster, peak memory the same, but the process keeps its peak (docs/training.md, "Host memory").

glibc reads ``GLIBC_TUNABLES`` when a process starts, so the CLIs that train on the CPU
(``python -m jaxgpt.train``, ``python -m jaxgpt.demo``) re-execute themselves once with it set,
before importing jax. They do not when:
  - ``GLIBC_TUNABLES`` is already set (yours win, and the restarted process sees it set);
  - ``JAXGPT_MALLOC=default`` (the opt-out);
  - the host is not Linux with glibc >= 2.35 (the ``hugetlb`` tunable);
  - jax may run on an accelerator (``JAX_PLATFORMS`` names another platform first, or, when it is
    unset, a jax GPU / TPU plugin or libtpu is installed): the step's memory is the device's.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

TUNABLES = ("glibc.malloc.hugetlb=1"  # madvise(MADV_HUGEPAGE) on malloc's memory: 2 MiB pages
            ":glibc.malloc.mmap_threshold=4294967296"  # blocks up to 4 GiB from the heap, not mmap
            ":glibc.malloc.trim_threshold=17179869184")  # free memory stays in the heap (up to 16 GiB)
OPT_OUT = "JAXGPT_MALLOC"
_ACCELERATOR_PACKAGES = re.compile(r"^(jax[-_]cuda\d+[-_]plugin|jax[-_]rocm\d+[-_]plugin|libtpu([-_]nightly)?)$")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def accelerator_plugin() -> str | None:
    """The name of an installed jax GPU / TPU plugin package, if any."""
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _ACCELERATOR_PACKAGES.match(name.lower()):
            return name
    return None


def why_not(env: os._Environ | dict) -> str | None:
    """None when the tunables should be applied; else the reason they are not."""
    if env.get(OPT_OUT, "").lower() in ("default", "off", "0", "no"):
        return f"{OPT_OUT}={env[OPT_OUT]}"
    if "GLIBC_TUNABLES" in env:
        return "GLIBC_TUNABLES is already set"
    if not sys.platform.startswith("linux") or (glibc_version() or (0, 0)) < (2, 35):
        return "not Linux with glibc >= 2.35"
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        if platforms.split(",")[0].strip().lower() != "cpu":
            return f"JAX_PLATFORMS={platforms}"
    else:
        plugin = accelerator_plugin()
        if plugin:
            return f"{plugin} is installed (jax may run on an accelerator)"
    return None


def describe(env: os._Environ | dict = os.environ) -> str:
    """What this process runs with, for the run's log."""
    tunables = env.get("GLIBC_TUNABLES")
    if tunables == TUNABLES:
        return "glibc tuned for XLA:CPU (jaxgpt.host_memory)"
    if tunables is not None:
        return f"GLIBC_TUNABLES={tunables}"
    return f"glibc defaults ({why_not(env) or 'called as a library: the CLIs restart tuned'})"


def reexec_with_cpu_malloc() -> None:
    """Restart this CLI process with ``TUNABLES`` set, unless ``why_not`` says otherwise.

    Call it first thing in a ``__main__`` module, before jax (or anything large) is imported:
    the process is replaced, and ``sys.orig_argv`` runs again exactly as it was started.
    """
    if why_not(os.environ) is not None:
        return
    env = {**os.environ, "GLIBC_TUNABLES": TUNABLES}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
