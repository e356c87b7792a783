"""Run folders, data and weights on gs://, against a local Cloud Storage emulator (gcp-storage-emulator;
gcsfs reads STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL). What a TPU VM user does with
a bucket: train into it, be killed, resume from it, read the metrics, sample, export, read data from it,
write one run from two processes; and a bad gs:// path is one line naming it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags
from tests.test_multihost import free_port

BUCKET = "jaxgpt-test"
STEPS, SAVE_EVERY = 4, 2
# configs/demo.yaml at the tiniest size (the same run everywhere: only output_dir and data change)
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=64", "data.seq_len=64",
        "data.max_examples=32", "data.eval_sources=[]", "schedule.warmup_steps=2", f"train.steps={STEPS}",
        "train.eval_every=0", f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep=2", "logging.log_every=1",
        "logging.sample_prompts=[]", "logging.progress_bar=false"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gcp_storage_emulator") is None,
                                reason="gcp-storage-emulator is not installed (pip install 'jaxgpt[test]')")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An in-memory emulator with one bucket; this process and its subprocesses point at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < end, "the GCS emulator did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           # the emulator has no storage-layout API: gcsfs' probe of it would warn at every call
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "JAXGPT_CACHE": str(tmp_path_factory.mktemp("jaxgpt_cache"))}  # HF folders in the bucket are copied here
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pytest.importorskip("gcsfs", reason="gcsfs (jaxgpt's gs:// client) is not installed")
    yield f"gs://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


def epath(url: str):
    from jaxgpt.paths import upath

    return upath(url)


def losses(out) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def committed(ckpts) -> list[int]:
    """The committed steps: on GCS orbax writes a step in place and marks it with commit_success.txt."""
    ckpts = epath(str(ckpts))
    try:
        steps = [p for p in ckpts.iterdir() if p.name.isdigit()]
    except FileNotFoundError:  # not created yet
        return []
    return sorted(int(p.name) for p in steps if (p / "commit_success.txt").exists())


def train_cmd(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxgpt.train", "--config", "demo", *TINY, f"train.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
    """The tiny demo run uninterrupted into a local folder, and into the bucket: SIGKILLed after its
    first committed checkpoint, then the same command to the end (both started together)."""
    tmp = tmp_path_factory.mktemp("gcs")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    ref, out = tmp / "ref", f"{gcs}/run"
    ckpts = epath(out) / "checkpoints"
    logs = [open(tmp / name, "w+") for name in ("ref.log", "killed.log", "resumed.log")]
    ref_proc = subprocess.Popen(train_cmd(str(ref), "logging.tensorboard=false", "logging.plot=false"), cwd=ROOT,
                                env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    killed = subprocess.Popen(train_cmd(out), cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT)
    t0 = end = time.monotonic()
    end += 240
    while not committed(ckpts):
        assert killed.poll() is None, f"the run ended before a checkpoint:\n{_tail(logs[1])}"
        assert time.monotonic() < end, _tail(logs[1])
        time.sleep(0.05)
    killed.kill()
    assert killed.wait(30) == -signal.SIGKILL
    at_kill = committed(ckpts)
    assert at_kill and at_kill[-1] < STEPS, "the run finished before it was killed"
    assert ref_proc.wait(240) == 0, _tail(logs[0])
    t_kill = time.monotonic()
    resumed = subprocess.run(train_cmd(out), cwd=ROOT, env=env, stdout=logs[2], stderr=subprocess.STDOUT, timeout=240)
    assert resumed.returncode == 0, _tail(logs[2])
    print(f"killed after {at_kill} at {t_kill - t0:.0f} s; resumed to the end in {time.monotonic() - t_kill:.0f} s")
    return {"ref": ref, "out": out, "at_kill": at_kill, "resumed_log": _tail(logs[2])}


def _tail(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-4000:]


def test_killed_run_in_a_bucket_resumes_with_the_same_losses(runs):
    out = epath(runs["out"])
    ref = dict(losses(runs["ref"]))
    assert sorted(ref) == list(range(1, STEPS + 1))
    logged = losses(out)  # metrics.jsonl read back from the bucket: every run's lines
    assert {s for s, _ in logged} == set(ref), logged
    wrong = [(s, x, ref[s]) for s, x in logged if x != ref[s]]
    assert not wrong, f"losses in the bucket differ from the local run's (killed after {runs['at_kill']}): {wrong}"
    assert committed(out / "checkpoints")[-1] == STEPS
    # everything else of the run folder is in the bucket too, and the lock was released
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "data_stats.json", "loss.png", "tensorboard", "checkpoints"} <= names, names
    assert "train.lock" not in names
    events = list((out / "tensorboard").iterdir())
    assert events and all(p.name.startswith("events.out.tfevents") for p in events)
    tags = _scalar_tags(events[-1].read_bytes())
    assert "loss" in tags, tags


def _scalar_tags(raw: bytes) -> set[str]:
    """The scalar tags of a TensorBoard event file, read with tensorboardX's own protobufs."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags, i = set(), 0
    while i < len(raw):
        (n,) = struct.unpack("Q", raw[i:i + 8])
        ev = Event.FromString(raw[i + 12:i + 12 + n])
        tags |= {v.tag for v in ev.summary.value}
        i += 12 + n + 4
    return tags


def test_sample_and_export_from_the_bucket(runs, tmp_path):
    pytest.importorskip("torch")
    import torch
    from transformers import GPT2LMHeadModel

    from jaxgpt.export import export
    from jaxgpt.loader import load_model
    from jaxgpt.sample import generate

    prompt = [[50256, 464, 3290]]
    remote = load_model(runs["out"], dtype="float32", param_dtype="float32")
    local = load_model(str(runs["ref"]), dtype="float32", param_dtype="float32")
    assert remote.kind == "checkpoint"
    got = generate(remote.model, prompt, max_new_tokens=6, stop_ids=[])
    assert got == generate(local.model, prompt, max_new_tokens=6, stop_ids=[])  # the same final parameters

    hf = export(runs["out"], tmp_path / "hf", verify_logits=False, log=lambda *_: None)
    model = GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(prompt)).logits.numpy()
    ours = np.asarray(local.model(np.asarray(prompt)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)  # float32 both sides

    # --out in the bucket; that HF folder is a --model (copied into the local cache) that samples the same
    bucket_hf = f"{runs['out']}-hf"
    export(runs["out"], bucket_hf, verify_logits=False, log=lambda *_: None)
    assert sorted(p.name for p in epath(bucket_hf).iterdir()) == sorted(p.name for p in hf.iterdir())
    from_bucket = load_model(bucket_hf)
    assert from_bucket.kind == "hf" and got == generate(from_bucket.model, prompt, max_new_tokens=6, stop_ids=[])


def test_jsonl_in_a_bucket_gives_the_same_batches(gcs):
    from jaxgpt.data import DataConfig, DataIterator, build_datasets
    from jaxgpt.tokenizer import add_chat_template, load_tokenizer

    local = ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl"
    remote = f"{gcs}/data/demo_chat.jsonl"
    epath(remote).write_bytes(local.read_bytes())
    tok = add_chat_template(load_tokenizer())

    def batches(source: str):
        cfg = DataConfig.from_dict({"sources": [source], "seq_len": 64, "max_examples": 48})
        train, _ = build_datasets(cfg, tok)
        it = DataIterator(train, global_batch=4, process_index=0, process_count=1, seed=cfg.seed, shuffle=cfg.shuffle)
        return [next(it) for _ in range(4)], train.stats.to_dict()

    (want, want_stats), (got, got_stats) = batches(str(local)), batches(remote)
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert list(got_stats.pop("formats").values()) == list(want_stats.pop("formats").values())
    assert got_stats == want_stats


def test_parquet_in_a_bucket_gives_the_same_records(gcs, tmp_path):
    """Parquet (and CSV / Arrow) objects are read through datasets and fsspec."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxgpt.config import DataSource
    from jaxgpt.data import read_records

    rows = [json.loads(line) for line in (ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl").read_text().splitlines()[:8]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    remote = f"{gcs}/data/chats.parquet"
    epath(remote).write_bytes((tmp_path / "chats.parquet").read_bytes())
    got = [rec for _, rec in read_records(DataSource(path=remote))]
    assert got == [rec for _, rec in read_records(DataSource(path=str(tmp_path / "chats.parquet")))] == rows


# Each process trains the run to step 2, then the same run to step 3 (a resume from the bucket), in
# one interpreter: the second run loads the compiled step from the persistent cache.
TWO_RUNS = """
import json, sys
from jaxgpt.config import from_dict
from jaxgpt.train import train
from tests.train_worker import describe
raw = json.loads(sys.argv[1])
for steps in (2, 3):
    raw["train"]["steps"] = steps
    print("RESULT " + json.dumps(describe(train(from_dict(raw)))), flush=True)
"""


def test_two_processes_write_one_run_to_the_bucket_and_resume(gcs, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed): a run written to the bucket, then resumed from it."""
    pytest.importorskip("torch")  # tests/train_worker.py's tiny HF model
    from tests.train_worker import mesh_config, tiny_hf_gpt2

    out, port = f"{gcs}/multi", free_port()
    raw = mesh_config(tmp_path)
    raw["model"]["name_or_path"] = str(tiny_hf_gpt2(tmp_path / "hf", n_embd=32, n_layer=1, n_head=2))  # the tiniest
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jc"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    procs = []
    for pid in range(2):
        cfg = {**raw, "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
               "train": {**raw["train"], "output_dir": out},
               "checkpoint": {"enabled": True, "save_every": 2, "keep": 2},
               "distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid,
                               "cpu_devices_per_process": 4, "initialization_timeout": 120}}
        # `timeout`: a process whose peer died would otherwise wait for it until the coordinator gives up.
        procs.append(subprocess.Popen(["timeout", "300", sys.executable, "-c", TWO_RUNS, json.dumps(cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outs = [p.communicate(timeout=320) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [[json.loads(line[len("RESULT "):]) for line in o.splitlines() if line.startswith("RESULT ")]
               for o, _ in outs]
    assert [len(r) for r in results] == [2, 2]
    (first0, second0), (first1, second1) = results
    assert [len(first0["losses"]), len(second0["losses"])] == [2, 1]  # the second run trained step 3 only
    assert first0["losses"] == first1["losses"] and second0["losses"] == second1["losses"]
    assert second0["params"]["h.0.mlp.c_fc.kernel"]["devices"] == 8  # one array over both processes
    assert committed(epath(out) / "checkpoints") == [2, 3]
    assert [s for s, _ in losses(epath(out))] == [1, 2, 3]  # process 0's metrics, both runs
    assert not (epath(out) / "train.lock").exists()


@pytest.mark.parametrize("case", ["no bucket name", "placeholder bucket", "no such bucket", "unreachable endpoint"])
def test_bad_bucket_path_is_one_line_naming_it(gcs, case, capsys, monkeypatch):
    from jaxgpt.train import main

    out = {"no bucket name": "gs:///run", "placeholder bucket": "gs://BUCKET/run",
           "no such bucket": "gs://no-such-bucket/run", "unreachable endpoint": "gs://elsewhere/run"}[case]
    if case == "unreachable endpoint":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        monkeypatch.setenv("JAXGPT_GCS_TIMEOUT", "2")
    assert main(["--config", "demo", *TINY, f"train.output_dir={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and out in err, err
    assert {"no bucket name": "no bucket name", "placeholder bucket": "is not a bucket name",
            "no such bucket": "no such bucket", "unreachable endpoint": "cannot reach"}[case] in err, err


def test_run_lock_in_a_bucket(gcs, caplog):
    """The lock is an object created only if absent (GCS' ifGenerationMatch=0): a second training is
    refused; a lock whose heartbeat stopped (its VM is gone) is taken over."""
    from jaxgpt.checkpoint import CheckpointError
    from jaxgpt.runlock import RunLock
    from jaxgpt.paths import create_exclusive

    folder = epath(f"{gcs}/locked")
    with RunLock(folder):
        assert json.loads((folder / "train.lock").read_text())["pid"] == os.getpid()
        assert not create_exclusive(folder / "train.lock", "{}")  # the atomic create refuses
        with pytest.raises(CheckpointError, match="is in use by another training"):
            RunLock(folder).__enter__()
    assert not (folder / "train.lock").exists()
    gone = {"host": "t1v-n-gone-w-0", "pid": 1, "since": "yesterday", "beat": time.time() - RunLock.STALE_S - 1}
    (folder / "train.lock").write_text(json.dumps(gone))
    with RunLock(folder):
        assert json.loads((folder / "train.lock").read_text())["host"] == socket.gethostname()
    assert "no heartbeat" in caplog.text
    gone["beat"] = time.time()  # another host, beating: refused, naming the object to remove
    (folder / "train.lock").write_text(json.dumps(gone))
    with pytest.raises(CheckpointError, match=f"remove {folder / 'train.lock'}"):
        RunLock(folder).__enter__()


def test_no_builtin_file_access_outside_the_path_module():
    """User paths may be URLs: jaxgpt reads and writes them through jaxgpt.paths (etils.epath), never
    with the builtin open() or os.path, which know local files only."""
    import ast

    bad = []
    for path in sorted((ROOT / "jaxgpt").rglob("*.py")):
        if path.name == "paths.py" and path.parent.name == "jaxgpt":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: open()")
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "os"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: os.path")
    assert not bad, "\n".join(bad)
