"""Helpers for the training tests, and a script that runs ``jaxgpt.train.train`` in a fresh
process (its own device count / jax.distributed) for test_sharding.py and test_multihost.py:

    python tests/train_worker.py '<config dict as JSON>' '<list of [data, fsdp, tensor]>'

prints one ``RESULT {json}`` line per mesh. A list entry may also be ``{"mesh": [...], "model": {...}}``:
that mesh with those model settings on top of the config's (one process start for several runs).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_gpt2(folder: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 64) -> Path:
    """A randomly initialised transformers GPT2LMHeadModel (vocab = GPT-2 + 2 ChatML tokens),
    saved as an HF folder. Loading it skips the jitted from-scratch init (seconds of compile)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxgpt.tokenizer import add_chat_template, load_tokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=len(add_chat_template(load_tokenizer())), n_positions=n_positions, n_embd=n_embd,
                         n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def _hf_dir() -> Path:
    return tiny_hf_gpt2(Path(tempfile.mkdtemp(prefix="jaxgpt-tiny-gpt2-")))


def mesh_config(output_dir: Path) -> dict:
    """The run test_sharding and test_multihost repeat on several meshes / processes."""
    return {
        "model": {"name_or_path": str(_hf_dir()), "vocab_multiple": 8},
        "data": {"sources": [str(ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl")], "seq_len": 32, "max_examples": 64},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 0, "output_dir": str(output_dir)},
        "checkpoint": {"enabled": False},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False, "log_every": 1},
    }


@functools.lru_cache(maxsize=None)
def single_device_run() -> dict:
    """``mesh_config`` on this process's one device (shared by both test files in a session)."""
    from jaxgpt.config import from_dict
    from jaxgpt.train import train

    raw = mesh_config(Path(tempfile.mkdtemp(prefix="jaxgpt-single-")))
    raw["mesh"] = {"data": 1, "fsdp": 1, "tensor": 1}
    return {"mesh": [1, 1, 1], **describe(train(from_dict(raw)))}


def describe(result) -> dict:
    import jax
    from flax import nnx

    params = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(result.params)}
    return {
        "losses": [result.losses[s] for s in sorted(result.losses)],
        "params": {name: {"spec": str(x.sharding.spec), "devices": len(x.sharding.device_set),
                          "shape": list(x.shape),
                          "shard_shape": list(x.sharding.shard_shape(x.shape))}
                   for name, x in params.items()},
        "process": jax.process_index(),
    }


def main():
    raw = json.loads(sys.argv[1])
    meshes = json.loads(sys.argv[2])
    from jaxgpt.config import from_dict
    from jaxgpt.train import train

    for mesh in meshes:
        run, model = dict(raw), {}
        if isinstance(mesh, dict):
            mesh, model = mesh["mesh"], mesh["model"]
        run["model"] = {**raw["model"], **model}
        run["mesh"] = dict(zip(("data", "fsdp", "tensor"), mesh))
        result = train(from_dict(run))
        print("RESULT " + json.dumps({"mesh": mesh, "model": model, **describe(result)}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
