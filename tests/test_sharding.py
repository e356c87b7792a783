"""Logical-axis rules and mesh equivalence: the same run on 1x1x1, 8x1x1, 1x8x1, 2x2x2 (acceptance 2).

The multi-device runs happen in a subprocess with 8 simulated CPU devices
(XLA_FLAGS must be set before JAX starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from jaxgpt.sharding import logical_to_spec
from tests.conftest import ROOT, xla_flags
from tests.train_worker import mesh_config, single_device_run

MESH_8 = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
FSDP_8 = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_rules_map_logical_axes():
    assert logical_to_spec(("vocab", "embed"), (1024, 64), MESH_8) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", None, "heads", "head_dim"), (64, 3, 4, 16), MESH_8) == P("fsdp", None, "tensor", None)
    assert logical_to_spec(("embed", "mlp"), (64, 256), FSDP_8) == P("fsdp", None)  # tensor axis of size 1: unused
    assert logical_to_spec(("batch", "seq"), (8, 32), MESH_8) == P(("data", "fsdp"), None)


def test_indivisible_dims_are_replicated():
    # GPT-2's 50257 vocab rows do not split in 2: replicated (set model.vocab_multiple to shard them).
    assert logical_to_spec(("vocab", "embed"), (50257, 64), MESH_8) == P(None, "fsdp")
    assert logical_to_spec(("embed",), (6,), FSDP_8) == P(None)


def run_worker(raw: dict, meshes, devices: int = 8, timeout: int = 600) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_worker.py"), json.dumps(raw), json.dumps(meshes)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


LOSS_CHUNKS = {"mesh": [2, 2, 2], "model": {"loss_chunks": 4}}


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> list[dict]:
    """The mesh runs of both tests below in one 8-device process (one jax start-up, one model load)."""
    pytest.importorskip("torch")
    return run_worker(mesh_config(tmp_path_factory.mktemp("meshes")), [[8, 1, 1], [1, 8, 1], [2, 2, 2], LOSS_CHUNKS])


def test_meshes_give_same_losses_and_shard_params(mesh_runs):
    runs = [single_device_run()] + [r for r in mesh_runs if not r["model"]]
    assert [r["mesh"] for r in runs] == [[1, 1, 1], [8, 1, 1], [1, 8, 1], [2, 2, 2]]
    base = np.array(runs[0]["losses"])
    assert len(base) == 3 and np.isfinite(base).all()
    for r in runs[1:]:
        rel = np.abs(np.array(r["losses"]) - base) / base
        print(f"mesh {r['mesh']}: max relative loss difference to 1x1x1 {rel.max():.2e}")
        assert rel.max() <= 1e-4, f"mesh {r['mesh']}: relative loss differences {rel}"

    by_mesh = {tuple(r["mesh"]): r["params"] for r in runs}
    one, dp, fsdp, mixed = by_mesh[(1, 1, 1)], by_mesh[(8, 1, 1)], by_mesh[(1, 8, 1)], by_mesh[(2, 2, 2)]
    assert one["wte"]["devices"] == 1
    # data parallel: parameters replicated on all 8 devices
    assert dp["h.0.mlp.c_fc.kernel"]["devices"] == 8 and dp["h.0.mlp.c_fc.kernel"]["shard_shape"] == [64, 256]
    # FSDP: every matrix split 8 ways along embed
    assert fsdp["h.0.mlp.c_fc.kernel"]["spec"] == "P('fsdp', None)"
    assert fsdp["h.0.mlp.c_fc.kernel"]["shard_shape"] == [8, 256]
    assert fsdp["wte"]["shard_shape"] == [50264, 8]
    # 2x2x2: embed over fsdp, heads / mlp / vocab over tensor
    assert mixed["h.0.attn.c_attn.kernel"]["spec"] == "P('fsdp', None, 'tensor', None)"
    assert mixed["h.0.attn.c_attn.kernel"]["shard_shape"] == [32, 3, 2, 16]
    assert mixed["h.0.mlp.c_proj.kernel"]["shard_shape"] == [128, 32]
    assert mixed["wte"]["shard_shape"] == [25132, 32]


def test_loss_chunks_on_a_mesh_give_the_same_losses(mesh_runs):
    """model.loss_chunks on the 2x2x2 mesh (vocab split over the tensor axis, batch over data x fsdp)
    against the plain head on one device."""
    (run,) = [r for r in mesh_runs if r["model"] == LOSS_CHUNKS["model"]]
    base = np.array(single_device_run()["losses"])
    rel = np.abs(np.array(run["losses"]) - base) / base
    print(f"loss_chunks=4 on 2x2x2: max relative loss difference to 1x1x1 {rel.max():.2e}")
    assert len(base) == 3 and rel.max() <= 1e-4, rel


class FakeTPU:
    """Enough of a TPU device for mesh_utils.create_device_mesh: a v4 chip at ``coords``."""
    platform, device_kind, core_on_chip = "tpu", "TPU v4", 0

    def __init__(self, id, process_index, coords):
        self.id, self.process_index, self.coords = id, process_index, coords

    def __repr__(self):
        return f"tpu{self.id}@p{self.process_index}"


def fake_pod(x: int, y: int, z: int, processes: bool = True) -> list[FakeTPU]:
    """A v4 slice whose hosts each own a 2 x 2 x 1 block of chips (ids host by host, as jax.devices())."""
    blocks = [(bx, by, bz) for bz in range(z) for by in range(0, y, 2) for bx in range(0, x, 2)]
    return [FakeTPU(4 * h + i, h if processes else 0, (bx + i % 2, by + i // 2, bz))
            for h, (bx, by, bz) in enumerate(blocks) for i in range(4)]


def test_pod_mesh_gives_each_host_contiguous_batch_rows():
    """On a 16-chip v4 slice (4 hosts), mesh_utils' physical order interleaves the hosts along
    fsdp; each host feeds one block of batch rows, so make_mesh orders those meshes by process."""
    from jax.experimental import mesh_utils

    from jaxgpt.sharding import make_mesh

    physical = mesh_utils.create_device_mesh((1, 16, 1), fake_pod(2, 2, 4), allow_split_physical_axes=True)
    assert [d.process_index for d in physical.reshape(-1)][:8] != [0, 0, 0, 0, 1, 1, 1, 1]  # the problem
    mesh = make_mesh((1, 16, 1), fake_pod(2, 2, 4))
    assert [d.process_index for d in mesh.devices.reshape(-1)] == [p for p in range(4) for _ in range(4)]
    one_host = fake_pod(2, 2, 4, processes=False)  # a single process keeps the physical (ICI) order
    assert (make_mesh((1, 16, 1), one_host).devices ==
            mesh_utils.create_device_mesh((1, 16, 1), one_host, allow_split_physical_axes=True)).all()


def test_added_rows_drop_a_split_they_no_longer_divide():
    """A 64-row embedding split over tensor=2 gets one ChatML row: 65 rows cannot stay split (the
    old layout made device_put fail); the caller places it by the rules."""
    script = (
        "from flax import nnx\n"
        "from jaxgpt import sharding\n"
        "from jaxgpt.model import GPT2, GPT2Config\nfrom jaxgpt.weights import resize_token_embeddings\n"
        "mesh = sharding.make_mesh((1, 1, 2))\n"
        "cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)\n"
        "model = nnx.merge(*sharding.init_sharded(lambda: GPT2(cfg, rngs=nnx.Rngs(0)), mesh))\n"
        "print(model.wte[...].sharding.spec)\n"
        "big = resize_token_embeddings(model, 65)\n"
        "print(big.wte[...].sharding.spec, big.wte[...].shape)\n"
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["P('tensor', None)", "P() (65, 32)"]


def test_tensor_axis_that_does_not_divide_is_reported(caplog):
    """gpt2-xl's 25 heads and GPT-2's 50,259 chat vocab rows do not split over tensor=2: a warning says so."""
    import logging

    from jaxgpt.model import GPT2Config
    from jaxgpt.setup import _warn_unsplit

    with caplog.at_level(logging.WARNING, logger="jaxgpt.train"):
        _warn_unsplit(GPT2Config(vocab_size=50259, n_positions=16, n_embd=1600, n_layer=1, n_head=25), MESH_8)
        _warn_unsplit(GPT2Config(vocab_size=50304, n_positions=16, n_embd=1600, n_layer=1, n_head=32), MESH_8)
    assert [r.getMessage() for r in caplog.records] == [
        "mesh.tensor=2 does not divide n_head (25), the vocabulary rows (50259): those weights are replicated over "
        "the tensor axis, not split (model.vocab_multiple pads the vocabulary)"]
