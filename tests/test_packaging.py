"""jaxgpt as users install it: the wheel, in a fresh virtual environment without torch or any extra.

The suite itself runs in the editable developer install with torch (the test extra), which
hides what the wheel lacks: package data, undeclared dependencies, paths into the repository.
Here the wheel is built from the package's own files, installed into a venv of its own, and
the commands run from a folder outside the repository.

The venv is cached in ``.whl/`` (git-ignored, removed by ``make clean``), keyed by
pyproject.toml and the versions of this environment: its dependencies come from the registry
once (pinned to the versions the suite tests, so pip takes them from its cache), and later
runs only rebuild and reinstall the wheel when the package's files change.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".whl"
SOURCE = ["pyproject.toml", "README.md", "jaxgpt"]  # what the wheel is built from
NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.pyc")
NOISE = "PyTorch was not found"  # what transformers logs on import without torch
# A tiny run of the demo config: the commands' paths, not the demo's learning, are under test.
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.batch_size=4", "data.seq_len=64",
         "train.eval_batches=1", "logging.sample_max_new_tokens=4", "logging.progress_bar=false"]


def package_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def source_digest() -> str:
    files = [ROOT / name for name in SOURCE[:2]] + [ROOT / "jaxgpt" / f for f in package_files(ROOT / "jaxgpt")]
    files.append(Path(__file__))  # how the wheel is built and installed
    return digest(x for f in files for x in (f.relative_to(ROOT).as_posix(), f.read_bytes()))


def constraints() -> str:
    """This environment's versions as pip constraints. torch and the other extras are listed too,
    but a constraint installs nothing: only what jaxgpt's wheel requires is pinned by them."""
    out = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], timeout=120).stdout
    return "".join(line + "\n" for line in out.splitlines() if line and not line.startswith("#") and " @ " not in line)


def run(cmd, *, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user's shell with ``venv`` activated: no PYTHONPATH to the repository,
    no transformers setting that would hide the line under test, no hub downloads."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                        "TRANSFORMERS_VERBOSITY")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1")
    return env


def build_and_install(venv: Path, fresh: bool, work: Path) -> None:
    """Build the wheel from a copy of the package's files (no stale build/ from the work tree gets in)
    with the venv's own setuptools, and install it: with its dependencies into a new venv, alone
    into a cached one (same pyproject.toml, so the same dependencies)."""
    python, env = venv / "bin" / "python", clean_env(venv)
    src, dist = work / "src", work / "dist"
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=NOT_SOURCE)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    build = run([python, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", dist, src],
                timeout=300, env=env, cwd=work)
    (venv / "wheel-build.log").write_text(build.stdout + build.stderr)
    (wheel,) = dist.glob("jaxgpt-*.whl")
    for old in venv.glob("jaxgpt-*.whl"):
        old.unlink()
    shutil.copy2(wheel, venv / wheel.name)
    # --no-compile: byte-compiling every module of jax, scipy, transformers... took half the install's
    # CPU time; the commands below compile what they import.
    extra = ["--no-compile"] if fresh else ["--no-deps", "--force-reinstall"]
    run([python, "-m", "pip", "install", "-q", "-c", venv / "constraints.txt", wheel, *extra],
        timeout=1200, env=env, cwd=work)
    run([python, "-m", "pip", "check"], timeout=120, env=env, cwd=work)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another `make test` on this clone waits for this one's venv
        pins = constraints()
        venv = CACHE / f"venv-{digest([(ROOT / 'pyproject.toml').read_bytes(), pins, sys.version])[:16]}"
        ready, stamp = venv / "jaxgpt-ready", venv / "jaxgpt-source.sha256"
        fresh = not ready.exists()
        if fresh:
            for old in CACHE.glob("venv-*"):
                shutil.rmtree(old)
            run([sys.executable, "-m", "venv", venv], timeout=300)
            (venv / "constraints.txt").write_text(pins)
            # the build backend, for the wheel below (Python 3.12's venvs have none)
            run([venv / "bin" / "python", "-m", "pip", "install", "-q", "setuptools>=77"],
                timeout=600, env=clean_env(venv))
        source = source_digest()
        if fresh or not stamp.exists() or stamp.read_text() != source:
            build_and_install(venv, fresh, tmp_path_factory.mktemp("wheel"))
            stamp.write_text(source)
            ready.touch()
    return venv


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    assert ROOT not in folder.resolve().parents
    return folder


@pytest.fixture(scope="module")
def jaxgpt_cmd(venv, user_dir):
    """Run ``python -m jaxgpt.<args>`` in the venv from ``user_dir``; it must succeed without the torch line."""
    def cmd(*args: str, stdin: str | None = None) -> str:
        r = run([venv / "bin" / "python", "-m", *args], timeout=600, env=clean_env(venv), cwd=user_dir, input=stdin)
        out = r.stdout + r.stderr
        assert NOISE not in out and "Traceback" not in out, out[-3000:]
        return out
    return cmd


@pytest.fixture(scope="module")
def trained(jaxgpt_cmd, user_dir) -> Path:
    jaxgpt_cmd("jaxgpt.train", "--config", "demo", "train.steps=3", *SMALL)
    return user_dir / "runs" / "demo"  # the demo config's output_dir, relative to where the command ran


def test_wheel_builds_without_setuptools_warnings(venv):
    log = (venv / "wheel-build.log").read_text()
    assert "Successfully built jaxgpt" in log
    assert not re.findall(r"\w*(?:Deprecation|BuildBackend)Warning|is absent from the `packages`", log), log[-3000:]


def test_wheel_holds_every_package_file(venv):
    (wheel,) = venv.glob("jaxgpt-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = sorted(Path(n) for n in whl.namelist() if n.startswith("jaxgpt/"))
    assert in_wheel == [Path("jaxgpt") / f for f in package_files(ROOT / "jaxgpt")]
    assert {"jaxgpt/configs/demo.yaml", "jaxgpt/configs/gpt2-chat.yaml", "jaxgpt/configs/gpt2-xl-pod.yaml",
            "jaxgpt/assets/demo_chat.jsonl", "jaxgpt/assets/gpt2-tokenizer/vocab.json"} <= {p.as_posix() for p in in_wheel}


def test_no_torch_and_jaxgpt_from_the_wheel(venv, user_dir):
    python, env = venv / "bin" / "python", clean_env(venv)
    r = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=user_dir, timeout=60)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    where = run([python, "-c", "import jaxgpt; print(jaxgpt.__file__)"], timeout=60, env=env, cwd=user_dir).stdout
    assert Path(where.strip()).is_relative_to(venv)


def test_train_a_shipped_config_by_name(trained):
    assert (trained / "checkpoints" / "3").is_dir()
    assert (trained / "loss.png").is_file() and (trained / "metrics.jsonl").is_file()


def test_data_inspect_on_a_shipped_file(jaxgpt_cmd, venv):
    (shipped,) = venv.glob("lib/python*/site-packages/jaxgpt/assets/demo_chat.jsonl")
    out = jaxgpt_cmd("jaxgpt.data", "inspect", "--data", str(shipped), "-n", "1")
    assert "<|im_start|>assistant" in out and "trained tokens" in out  # the chat template rendered (jinja2)


def test_sample_and_chat_on_the_run(jaxgpt_cmd, trained):
    out = jaxgpt_cmd("jaxgpt.sample", "--model", str(trained), "--prompt", "Hello", "--max-new-tokens", "4")
    assert out.strip()
    out = jaxgpt_cmd("jaxgpt.chat", "--model", str(trained), "--max-new-tokens", "4", stdin="Who are you?\n")
    assert "you> " in out and "bot> " in out


def test_export_checks_the_file_without_torch(jaxgpt_cmd, trained, user_dir):
    out = jaxgpt_cmd("jaxgpt.export", "--checkpoint", str(trained), "--out", "hf")
    assert "check vs the written safetensors re-read by jaxgpt (no torch)" in out
    assert (user_dir / "hf" / "model.safetensors").is_file() and (user_dir / "hf" / "chat_template.jinja").is_file()
