"""jax's persistent compilation cache, on by default for jaxgpt's commands.

A rerun of the same program (a resume after preemption, the next run with the same
model, shapes and settings, another chat session) loads the compiled executable from
disk instead of compiling it again (time to first step: docs/benchmarks.md).

Where the cache lives, first match wins:
  JAX_COMPILATION_CACHE_DIR   jax's own setting (a local path or gs://...), left as it is;
  JAXGPT_COMPILE_CACHE        a directory, or "off" (also "0", "") for no cache;
  $XDG_CACHE_HOME/jaxgpt/xla  default (~/.cache/jaxgpt/xla); delete it any time.

jax only caches programs that took at least a second to compile, and decides whether
to use the cache at the first compilation of the process: ``enable`` must run before
anything is compiled, which is why the entry points call it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OFF = ("", "0", "off", "false", "none")


def default_dir() -> str | None:
    """The directory jaxgpt uses when jax has none set (None: the cache is switched off)."""
    value = os.environ.get("JAXGPT_COMPILE_CACHE")
    if value is not None:
        return None if value.strip().lower() in OFF else value
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt" / "xla")


def enable() -> str | None:
    """Point jax's persistent compilation cache at ``default_dir()`` unless jax already has
    a directory (``JAX_COMPILATION_CACHE_DIR``). Returns the directory in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = default_dir()
    if path is None:
        return None
    if "://" not in path:
        path = str(Path(path).expanduser())
    jax.config.update("jax_compilation_cache_dir", path)
    return path
