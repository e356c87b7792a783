"""End to end: `python -m jaxgpt.train` killed and restarted resumes exactly.

One uninterrupted reference run, then the same command run
as a subprocess and interrupted before it is let finish, by:

  - SIGKILL while an async checkpoint save is in flight (its temporary
    folder is still on disk when the process is dead),
  - SIGTERM at a random step (the preemption path): exit code 0 and a
    committed checkpoint of the step it stopped at,
  - (slow test) several SIGKILLs at random steps as well. Every loss any of these runs logged for a step
must equal the reference loss of that step, and the final checkpoint (params,
optimizer state, data state, RNG) must be bit-identical to the reference's.
The kill steps are random; the seed is in every failure message
(rerun with JAXGPT_RESUME_SEED=<seed>).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxgpt import host_memory
from tests.conftest import ROOT

STEPS, SAVE_EVERY = 24, 4


def raw_config(output_dir: Path) -> dict:
    return {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64},
        "data": {"sources": [str(ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl")], "seq_len": 64, "max_examples": 64},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"steps": STEPS, "batch_size": 4, "eval_every": 0, "output_dir": str(output_dir)},
        "checkpoint": {"save_every": SAVE_EVERY, "keep": 2, "async_save": True},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False, "log_every": 1},
    }


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_step(ckpt_root: Path, step: int) -> dict:
    """A committed checkpoint as orbax itself reads it (no target: the saved layout)."""
    d = ckpt_root / str(step)
    json_reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    return {
        "params": ocp.StandardCheckpointer().restore(d / "params"),
        "opt_state": ocp.StandardCheckpointer().restore(d / "opt_state"),
        "state": json_reader.restore(d / "state", args=ocp.args.JsonRestore()),
    }


def bit_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype
               and np.array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
               for x, y in zip(la, lb))


class Run:
    """``python -m jaxgpt.train --config FILE`` in the background, watched through its output dir."""

    def __init__(self, config_file: Path, out: Path, env: dict):
        self.out = out
        self.skip = len(metrics(out))  # records of earlier runs
        self.log = open(out.parent / f"run{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.train", "--config", str(config_file)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def steps_done(self) -> list[int]:
        return [r["step"] for r in metrics(self.out)[self.skip:] if "loss" in r]

    def wait_for(self, condition, timeout=240.0, poll=0.002):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = condition()
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc={self.proc.returncode}) before the condition:\n{self.output()}")
            time.sleep(poll)
        self.proc.kill()
        raise AssertionError(f"timed out:\n{self.output()}")

    def finish(self, timeout=240.0) -> int:
        rc = self.proc.wait(timeout)
        return rc

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]


def tmp_saves(ckpt_root: Path) -> list[str]:
    return sorted(p.name for p in ckpt_root.glob("*.orbax-checkpoint-tmp*")) if ckpt_root.is_dir() else []


def committed(ckpt_root: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_root.iterdir() if p.name.isdigit()) if ckpt_root.is_dir() else []


def run_chain(tmp_path, plan: list[str]):
    """The reference run, then the same run interrupted as ``plan`` says, then finished; compare."""
    seed = int(os.environ.get("JAXGPT_RESUME_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    why = f"(JAXGPT_RESUME_SEED={seed})"
    t0 = time.monotonic()
    # All runs load the compiled step from one cache after the first compiles it (the same
    # executable either way; this only saves compile time).
    # They compile at XLA's default (not the suite's -O0): compiled once, the step runs ~100 times.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}

    # -- the reference: uninterrupted
    ref_out = tmp_path / "ref"
    ref_out.mkdir()
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(raw_config(ref_out)))
    run = Run(tmp_path / "ref.yaml", ref_out, env)
    assert run.finish() == 0, run.output()
    if host_memory.why_not(env) is None:  # the CLI restarted itself with the malloc settings for XLA:CPU
        assert "host malloc: glibc tuned for XLA:CPU" in Path(run.log.name).read_text(), run.output()
    ref_losses = {r["step"]: r["loss"] for r in metrics(ref_out) if "loss" in r}
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    events = [f"reference ({time.monotonic() - t0:.0f}s)"]

    # -- the same run, interrupted
    out = tmp_path / "run"
    out.mkdir()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(out)))
    ckpts = out / "checkpoints"

    for what in plan:
        run = Run(config_file, out, env)
        if what == "kill":  # SIGKILL at a random step
            n = rng.randint(1, 6)
            run.wait_for(lambda: len(run.steps_done()) >= n)
            run.proc.kill()
            assert run.finish() == -signal.SIGKILL
            events.append(f"SIGKILL after step {max(run.steps_done())}, committed {committed(ckpts)}")
        elif what == "kill_during_save":  # SIGKILL while the n-th async save of this run is being written
            n = rng.randint(1, 2)
            seen = set()
            run.wait_for(lambda: seen.update(tmp_saves(ckpts)) or len(seen) >= n and tmp_saves(ckpts))
            run.proc.kill()
            assert run.finish() == -signal.SIGKILL
            left = tmp_saves(ckpts)
            assert left, f"the save committed before the kill landed; retry {why}"
            events.append(f"SIGKILL during save {left}, committed {committed(ckpts)}")
        elif what == "term":  # SIGTERM at a random step: finish the step, save, exit 0
            n = rng.randint(1, 5)
            run.wait_for(lambda: len(run.steps_done()) >= n)
            run.proc.send_signal(signal.SIGTERM)
            assert run.finish() == 0, f"SIGTERM must exit 0 {why}:\n{run.output()}"
            last = max(run.steps_done())
            assert last < STEPS, f"the run ended before SIGTERM took effect {why}"
            assert committed(ckpts)[-1] == last and not tmp_saves(ckpts), (committed(ckpts), tmp_saves(ckpts), why)
            assert "preempted" in run.output()
            events.append(f"SIGTERM -> saved step {last}, committed {committed(ckpts)}")
        events[-1] += f" ({time.monotonic() - t0:.0f}s)"

    run = Run(config_file, out, env)
    assert run.finish() == 0, run.output()
    assert committed(ckpts)[-1] == STEPS and not tmp_saves(ckpts)
    events.append(f"finished, committed {committed(ckpts)} ({time.monotonic() - t0:.0f}s)")
    print("\n".join(events))

    # Every loss logged by any of the runs equals the uninterrupted run's loss for that step.
    logged = [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]
    assert {s for s, _ in logged} == set(range(1, STEPS + 1)), (events, why)
    wrong = [(s, loss, ref_losses[s]) for s, loss in logged if loss != ref_losses[s]]
    assert not wrong, f"losses differ after resume {why}: {wrong[:5]}; {events}"
    assert len(logged) > STEPS  # some steps really were recomputed after a kill

    # The final train state is bit-identical to the reference's.
    want, got = read_step(ref_out / "checkpoints", STEPS), read_step(ckpts, STEPS)
    assert bit_equal(got["params"], want["params"]), f"final params differ {why}; {events}"
    assert bit_equal(got["opt_state"], want["opt_state"]), f"final optimizer state differs {why}; {events}"
    assert got["state"] == want["state"], f"data state / rng differ {why}; {events}"


def test_killed_during_save_then_preempted_resumes_bit_identical(tmp_path):
    run_chain(tmp_path, ["kill_during_save", "term"])


@pytest.mark.slow
def test_many_random_kills_resume_bit_identical(tmp_path):
    run_chain(tmp_path, ["kill", "kill_during_save", "kill", "term", "kill", "kill_during_save"])
