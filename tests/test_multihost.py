"""Two processes on this machine train together through jax.distributed (gloo CPU collectives),
4 simulated CPU devices each, one 2x2x2 mesh, each process feeding its half of every batch;
their losses match a single-process run (acceptance 5)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags
from tests.train_worker import mesh_config, single_device_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    pytest.importorskip("torch")
    raw = mesh_config(tmp_path)
    expected = np.array(single_device_run()["losses"])

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())  # no forced device count
    procs = []
    for pid in range(2):
        cfg = {**raw, "train": {**raw["train"], "output_dir": str(tmp_path / "multi")},
               "distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid,
                               "cpu_devices_per_process": 4, "initialization_timeout": 120}}
        # `timeout`: a process whose peer died would otherwise wait for it until the coordinator gives up.
        cmd = ["timeout", "400", sys.executable, str(ROOT / "tests" / "train_worker.py"), json.dumps(cfg),
               json.dumps([[2, 2, 2]])]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outs = [p.communicate(timeout=450) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(line[len("RESULT "):]) for out, _ in outs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        rel = np.abs(np.array(r["losses"]) - expected) / expected
        print(f"process {r['process']}: max relative loss difference to one process {rel.max():.2e}")
        assert rel.max() <= 1e-4, f"process {r['process']}: relative loss differences {rel}"
        # one global array over both processes' devices
        assert r["params"]["h.0.mlp.c_fc.kernel"]["devices"] == 8
