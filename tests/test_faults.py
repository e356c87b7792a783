"""The fault suite of docs/reliability.md, training and checkpoint state: each test provokes one fault a
user meets (a diverging update, a corrupt or poisoned checkpoint, Ctrl-C, a second training into the
same folder, a read-only folder, skipped data) and checks what the user gets: nothing lost, nothing
wrong saved, one line that says what happened and what to do.

Faults that already had their tests stay there: SIGKILL during an async save and SIGTERM
(tests/test_resume.py, bit-identical resume), a corrupt latest step (tests/test_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxgpt.checkpoint import CheckpointError, checkpoint_dir
from jaxgpt.config import from_dict
from jaxgpt.train import TrainingError, train
from tests.conftest import ROOT
from tests.test_resume import Run, committed, metrics, tmp_saves
from tests.test_train import DEMO, QUIET

BAD_LINES = ['{"bad": 1}', "not json"]  # lines 6 and 7 of the data file: skipped with skip_invalid


def raw_config(out: Path, data: Path, **sections) -> dict:
    raw = {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64},
        "data": {"sources": [str(data)], "seq_len": 64, "max_examples": 64, "skip_invalid": True},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "output_dir": str(out)},
        "checkpoint": {"enabled": True, "save_every": 1, "keep": 3, "async_save": False},
        "logging": dict(QUIET, log_every=1),
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def data_with_bad_lines(folder: Path) -> Path:
    lines = Path(DEMO).read_text().splitlines()
    path = folder / "chats.jsonl"
    path.write_text("\n".join(lines[:5] + BAD_LINES + lines[5:]) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2) over data with two invalid lines, and its start-up output.
    Tests copy it before they damage it."""
    tmp = tmp_path_factory.mktemp("faults")
    data = data_with_bad_lines(tmp)
    out = tmp / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(from_dict(raw_config(out, data)))
    return out, data, printed.getvalue()


def copy_run(run_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)
    return out


def truncate_arrays(step_dir: Path):
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.fixture
def unraisable(monkeypatch):
    """What reaches ``sys.unraisablehook`` (printed to stderr outside pytest): tracebacks nobody asked for."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    yield seen
    time.sleep(0.5)  # late ones still reach this test's hook, not the next test's
    gc.collect()


# ----------------------------------------------------------------------------- non-finite parameters


def test_update_that_makes_parameters_nonfinite_is_not_applied():
    """Finite loss and gradients, but an infinite learning rate: the update would make every parameter
    inf/NaN. The step keeps the old parameters and optimizer state and reports ok=False (the loop then
    skips and counts it as it does a non-finite loss)."""
    import jax
    import optax
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.step import applied_steps, make_train_step

    model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(lambda count: np.float32(np.inf))  # a schedule, so the step finds its counter
    state = {"params": params, "opt_state": tx.init(params)}
    before = jax.tree.map(np.asarray, state)
    ids = np.random.default_rng(0).integers(0, 64, (1, 2, 9)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:], "loss_mask": np.ones((1, 2, 8), np.int32),
             "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (1, 2, 8)).copy()}
    step = make_train_step(graphdef, rest, tx)
    new, m = step(state, batch, jax.random.key_data(jax.random.key(0)))
    m = jax.device_get(m)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert not m["params_ok"] and not m["ok"]
    after = jax.tree.map(np.asarray, new)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert int(applied_steps(new["opt_state"])) == 0


def poison(out: Path, cfg, tensor: str = "wte") -> Path:
    """Save step 2 of ``out`` again as step 3 with NaN in one parameter: what jaxgpt saved after a
    diverged update while its guard looked at the loss only."""
    import jax
    from flax import nnx

    from jaxgpt.checkpoint import Checkpointer
    from jaxgpt.loader import load_for_inference
    from jaxgpt.step import make_optimizer

    params = nnx.state(load_for_inference(out)[0], nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                           jax.eval_shape(make_optimizer(cfg, params)[0].init, params))
    ckpt = Checkpointer(checkpoint_dir(out), save_every=1, async_save=False)
    r = ckpt.restore(abstract_params=nnx.to_pure_dict(params), abstract_opt_state=abs_opt)
    pure = dict(r["params"])
    pure[tensor] = np.full(pure[tensor].shape, np.nan, pure[tensor].dtype)
    ckpt.save(3, params=pure, opt_state=r["opt_state"], data_state=r["data_state"], rng=r["rng"],
              config=r["config"], tokenizer=ckpt.restore_tokenizer(2), force=True)
    ckpt.close()
    return checkpoint_dir(out) / "3"


def test_nonfinite_checkpoint_is_named_by_load_export_and_resume(run_dir, tmp_path):
    """A checkpoint holding NaN: sampling / export name the tensor (export used to blame a "logits
    mismatch") and write nothing; training refuses to resume from it rather than save more of it."""
    from jaxgpt.checkpoint import NonFiniteError
    from jaxgpt.loader import load_for_inference
    from jaxgpt.export import ExportError, export

    out = copy_run(run_dir, tmp_path)
    cfg = from_dict(raw_config(out, run_dir[1], train={"steps": 4}))
    step3 = poison(out, cfg)
    with pytest.raises(NonFiniteError, match=rf"{step3}: parameter wte holds NaN or infinity.*earlier steps: 1, 2"):
        load_for_inference(out)
    with pytest.raises(NonFiniteError, match="parameter wte holds NaN"):
        load_for_inference(step3)
    with pytest.raises(ValueError, match="parameter wte holds NaN or infinity") as e:
        export(out, tmp_path / "hf", log=lambda *_: None)
    assert not isinstance(e.value, ExportError) or "logits" not in str(e.value)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    with pytest.raises(TrainingError, match=r"checkpoint step 3 in .*: parameter wte holds NaN or infinity"):
        train(cfg)
    assert committed(checkpoint_dir(out)) == [1, 2, 3]  # nothing written, nothing moved


# ----------------------------------------------------------------------------- data statistics


def test_training_reports_its_data_statistics(run_dir):
    """The start-up output says what was read, skipped (with file:line), truncated and dropped, and the
    run folder keeps the numbers, the same ones `data inspect` prints."""
    from jaxgpt.data import build_datasets
    from jaxgpt.tokenizer import load_tokenizer

    out, data, printed = run_dir
    n_lines = min(len(data.read_text().splitlines()), 64)  # data.max_examples
    line = next(x for x in printed.splitlines() if x.startswith("data: "))
    assert f"{n_lines} records read" in line and "2 skipped (invalid)" in line and "truncated" in line \
        and "dropped" in line and "trained tokens" in line, printed
    assert f"skipped {data}:6: " in printed and f"skipped {data}:7: invalid JSON" in printed
    saved = json.loads((out / "data_stats.json").read_text())["train"]
    inspect = build_datasets(from_dict(raw_config(out, data)).data, load_tokenizer())[0].stats.to_dict()
    assert saved == json.loads(json.dumps(inspect))
    assert saved["records"] == n_lines and saved["skipped"] == 2 and saved["trained_tokens"] > 0


# ----------------------------------------------------------------------------- corrupt checkpoints


def test_corrupt_step_fallback_is_one_line_with_details_in_the_run_folder(run_dir, tmp_path, caplog, unraisable):
    """Falling back past a corrupt step: one console line naming the step and what happens to it; the
    whole error (tensorstore's spec, the traceback) in <run>/checkpoint.log; none of tensorstore's
    "Event loop is closed" tracebacks."""
    out = copy_run(run_dir, tmp_path)
    truncate_arrays(checkpoint_dir(out) / "2")
    cfg = from_dict(raw_config(out, run_dir[1], train={"steps": 1}))  # resumes at 1: nothing left to train
    with caplog.at_level(logging.WARNING, logger="jaxgpt"):
        result = train(cfg)
    gc.collect()  # tensorstore's reads still in flight report when collected
    assert result.step == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxgpt.checkpoint"]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 600, lines
    assert f"{checkpoint_dir(out) / '2'} is incomplete or corrupt" in lines[0]
    assert "set aside as 2.corrupt-" in lines[0] and "trying step 1" in lines[0]
    assert f"details in {out.absolute() / 'checkpoint.log'}" in lines[0]
    details = (out / "checkpoint.log").read_text()
    assert "Traceback" in details and str(checkpoint_dir(out) / "2") in details
    assert not [u for u in unraisable if "Event loop is closed" in u], unraisable[:2]


def test_corrupt_step_for_sampling_is_one_line(run_dir, tmp_path, capsys, unraisable):
    from jaxgpt.sample import main

    out = copy_run(run_dir, tmp_path)
    truncate_arrays(checkpoint_dir(out) / "2")
    assert main(["--model", str(checkpoint_dir(out) / "2"), "--max-new-tokens", "2"]) != 0
    gc.collect()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint_dir(out) / '2'}: ") and err.count("\n") == 1, err[:2000]
    assert not [u for u in unraisable if "Event loop is closed" in u], unraisable[:2]


def test_all_checkpoints_set_aside_is_not_a_silent_restart(run_dir, tmp_path):
    """Every step corrupt: the first rerun sets them aside and stops; so does every rerun after it
    (it used to start at step 0 and append a second series to metrics.jsonl). checkpoint.resume=false
    starts over and keeps the old metrics apart."""
    out = copy_run(run_dir, tmp_path)
    for step in (1, 2):
        truncate_arrays(checkpoint_dir(out) / str(step))
    old_metrics = (out / "metrics.jsonl").read_text()
    cfg = raw_config(out, run_dir[1], train={"steps": 1})
    for attempt in range(2):
        with pytest.raises(CheckpointError, match=r"every checkpoint was set aside as incomplete or corrupt "
                                                  r"\(1\.corrupt-.*, 2\.corrupt-.*checkpoint\.resume=false to start over"):
            train(from_dict(cfg))
        assert (out / "metrics.jsonl").read_text() == old_metrics, attempt
    train(from_dict(raw_config(out, run_dir[1], train={"steps": 1}, checkpoint={"resume": False})))
    assert [r["step"] for r in metrics(out)] == [1]  # one new series
    kept = list(out.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == old_metrics
    assert committed(checkpoint_dir(out)) == [1] and len(list(checkpoint_dir(out).glob("*.corrupt-*"))) == 2


def test_unwritable_run_folder_is_one_line(tmp_path, capsys):
    """checkpoint.enabled=false into a folder that cannot be written: one line, not a PermissionError traceback."""
    from jaxgpt.train import main

    parent = tmp_path / "parent"
    if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be fails the same way
        parent.write_text("")
    else:
        parent.mkdir(mode=0o555)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(parent / "run", Path(DEMO), checkpoint={"enabled": False})))
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {parent / 'run'}: ") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- one training per folder


def test_second_training_into_the_same_folder_is_refused(tmp_path, caplog):
    """The lock names its holder; a live one refuses (this host or another), a dead one is taken over."""
    from jaxgpt.runlock import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    cfg = from_dict(raw_config(out, Path(DEMO), train={"steps": 1}, checkpoint={"enabled": False}))
    host = socket.gethostname()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"host": host, "pid": holder.pid, "since": "2026-01-01 00:00:00"}))
        with pytest.raises(CheckpointError, match=rf"{out} is in use by another training \(host {host}, pid "
                                                  rf"{holder.pid}, since 2026-01-01 00:00:00\)"):
            train(cfg)
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "2026-01-01 00:00:00"}))
    with pytest.raises(CheckpointError, match=rf"host elsewhere, pid 1.*if no training runs there any more, remove {lock}"):
        train(cfg)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # refused before writing anything

    lock.write_text(json.dumps({"host": host, "pid": holder.pid, "since": "2026-01-01 00:00:00"}))  # now dead
    with caplog.at_level(logging.WARNING, logger="jaxgpt.checkpoint"):
        assert train(cfg).step == 1
    assert any(f"taking over {lock}: its training (pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert not lock.exists()  # released at the end


# ----------------------------------------------------------------------------- Ctrl-C


def test_first_ctrl_c_is_a_flag_second_one_stops_at_once():
    from jaxgpt.preemption import PreemptionGuard

    missed = []  # Ctrl-Cs the guard let through (Python's own handler would end the test session)
    recorder = lambda *_: missed.append(1)  # noqa: E731
    original = signal.signal(signal.SIGINT, recorder)
    try:
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)  # only a flag: the step finishes, the loop saves
            assert not missed and guard.should_stop(1) and guard.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            assert signal.getsignal(signal.SIGINT) is recorder  # a third Ctrl-C is the program's own again
        assert signal.getsignal(signal.SIGINT) is recorder and not missed
    finally:
        signal.signal(signal.SIGINT, original)


def cli_run(tmp_path, steps: int) -> Run:
    out = tmp_path / "run"
    out.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(out, Path(DEMO), train={"steps": steps},
                                                checkpoint={"save_every": 1000, "async_save": True})))
    return Run(config, out, dict(os.environ))


def test_ctrl_c_saves_and_exits_130_while_a_second_training_is_refused(tmp_path):
    """`python -m jaxgpt.train` in a terminal: a second training into its folder is refused naming it;
    Ctrl-C finishes the step, saves it (no periodic save was due), prints one line and exits 130."""
    run = cli_run(tmp_path, steps=10_000)
    run.wait_for(lambda: len(run.steps_done()) >= 2)
    cfg = from_dict(raw_config(run.out, Path(DEMO), train={"steps": 1}))
    with pytest.raises(CheckpointError, match=rf"in use by another training \(host {socket.gethostname()}, "
                                              rf"pid {run.proc.pid}, "):
        train(cfg)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=120) == 130, run.output()
    last = max(run.steps_done())
    assert committed(checkpoint_dir(run.out)) == [last] and not tmp_saves(checkpoint_dir(run.out))
    output = run.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.rstrip().splitlines()[-1] == (f"interrupted at step {last}: last checkpoint step {last} in "
                                                f"{checkpoint_dir(run.out)}; rerun the same command to resume")


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_keeping_the_last_commit(tmp_path):
    """Ctrl-C twice while a save is being written: exit 130 without waiting for it; the last committed
    step stays whole (a rerun resumes from it)."""
    from jaxgpt.loader import load_for_inference

    run = cli_run(tmp_path, steps=10_000)
    run.wait_for(lambda: len(run.steps_done()) >= 2)
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: tmp_saves(checkpoint_dir(run.out)) or committed(checkpoint_dir(run.out)))
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.output()
    output = run.output()
    assert "Traceback" not in output and output.rstrip().splitlines()[-1].startswith("interrupted: stopped at once; ")
    steps = committed(checkpoint_dir(run.out))
    if steps:  # the save beat the second Ctrl-C: it is whole
        load_for_inference(run.out)
    rerun = Run(run.out.parent / "run.yaml", run.out, dict(os.environ))
    rerun.wait_for(lambda: len(rerun.steps_done()) >= 1)
    assert min(rerun.steps_done()) == (steps[-1] if steps else 0) + 1
    rerun.proc.kill()
    rerun.finish()


# ----------------------------------------------------------------------------- untrusted weights


def test_pickled_code_in_pytorch_weights_is_refused_not_run(tmp_path):
    """A pytorch_model.bin whose pickle runs code on load: refused with one error, the code never runs."""
    pytest.importorskip("torch")
    from jaxgpt.weights import WeightsError, read_hf_tensors
    from tests.train_worker import tiny_hf_gpt2

    src = tiny_hf_gpt2(tmp_path / "hf")
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"wte.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="weights_only"):
        read_hf_tensors(folder)
    assert not marker.exists()
