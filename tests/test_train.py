"""The train step and loop against references: PyTorch GPT-2 training, overfitting, fault handling.

Tiny models (width 32-64, 2 layers); the vocabulary is GPT-2's (+2 ChatML tokens),
since the data goes through the real tokenizer.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from jaxgpt.config import from_dict
from jaxgpt.train import TrainingError, train
from tests.conftest import ROOT, optimized_xla, shared_path

DEMO = str(ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl")
DEMO_HELDOUT = str(ROOT / "jaxgpt" / "assets" / "demo_chat_heldout.jsonl")
QUIET = {"progress_bar": False, "tensorboard": False, "plot": False, "log_every": 5}


def tiny_config(tmp_path, **sections):
    raw = {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64},
        "data": {"sources": [DEMO], "seq_len": 64, "max_examples": 64},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"steps": 20, "batch_size": 4, "eval_every": 0, "output_dir": str(tmp_path / "run")},
        "checkpoint": {"enabled": False},
        "logging": dict(QUIET),
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


# ----------------------------------------------------------------------------- 1. parity with PyTorch


def torch_reference_losses(cfg, hf_dir, steps):
    """A plain PyTorch loop over transformers' GPT2LMHeadModel with the same data, AdamW,
    weight-decay groups, clipping and warmup+cosine schedule."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel

    from jaxgpt.data import DataIterator, build_datasets
    from jaxgpt.tokenizer import load_tokenizer

    tok = load_tokenizer()
    train_set, _ = build_datasets(cfg.data, tok)
    it = DataIterator(train_set, cfg.train.batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").float().train()
    o, s = cfg.optimizer, cfg.schedule
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "wte" in n or "wpe" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "wte" in n or "wpe" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    end, total, warm = s.min_lr_ratio, cfg.train.steps, s.warmup_steps

    def lr_lambda(t):  # linear warmup from 0, cosine to min_lr_ratio (written out, not optax's)
        if t < warm:
            return t / warm
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(t - warm, total - warm) / (total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses = []
    for _ in range(steps):
        b = {k: torch.from_numpy(np.asarray(v)) for k, v in next(it).items()}
        # One conversation per row is not guaranteed: packed rows get a block-diagonal mask.
        seg = b["segment_ids"]
        causal = torch.tril(torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool))
        allowed = causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        allowed |= torch.eye(seg.shape[1], dtype=torch.bool)  # pad rows attend to themselves (never trained)
        bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        logits = model(input_ids=b["input_ids"].long(), position_ids=b["positions"].long(),
                       attention_mask=bias[:, None]).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].long().flatten(), reduction="none")
        mask = b["loss_mask"].float().flatten()
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """20 steps of jaxgpt from a transformers-initialised GPT-2 (2 accumulated micro-batches),
    evaluating every 10 steps and writing every output, and the PyTorch reference losses."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from jaxgpt.tokenizer import add_chat_template, load_tokenizer

    tmp_path = tmp_path_factory.mktemp("parity")
    vocab = len(add_chat_template(load_tokenizer()))  # 50259: the model already fits the ChatML tokens
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    cfg = tiny_config(tmp_path, model={"name_or_path": str(hf_dir)},
                      data={"eval_sources": [DEMO_HELDOUT]},
                      optimizer={"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 0.5},
                      schedule={"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
                      train={"steps": 20, "batch_size": 4, "grad_accum": 2, "eval_every": 10, "eval_batches": 2},
                      logging={"log_every": 5, "tensorboard": True, "plot": True})
    ours = train(cfg)
    ref = torch_reference_losses(cfg, str(hf_dir), 20)
    return cfg, ours, ref, tmp_path / "run"


def test_parity_with_pytorch_gpt2(parity_run):
    """20 AdamW steps: jaxgpt (2 accumulated micro-batches) vs a PyTorch loop (one batch) within 1e-3 relative."""
    _, ours, ref, _ = parity_run
    got = np.array([ours.losses[s] for s in range(1, 21)])
    rel = np.abs(got - np.array(ref)) / np.abs(np.array(ref))
    print(f"max relative loss difference to PyTorch over 20 steps: {rel.max():.2e}")
    assert rel.max() < 1e-3, f"per-step relative loss differences {rel}"
    assert got[-1] < got[0] - 0.5, "the model did not learn"  # the comparison is not between two flat lines


def test_bf16_compute_with_remat_tracks_float32(parity_run, tmp_path):
    """The same 20 steps with bfloat16 compute (float32 master weights) and rematerialised
    blocks stay within 2% of the float32 losses."""
    import dataclasses

    cfg, ours, _, _ = parity_run
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16", remat=True),
                              train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "bf16"), eval_every=0),
                              logging=dataclasses.replace(cfg.logging, tensorboard=False, plot=False))
    bf16 = train(cfg)
    assert bf16.params["wte"][...].dtype == np.float32
    f32 = np.array([ours.losses[s] for s in range(1, 21)])
    got = np.array([bf16.losses[s] for s in range(1, 21)])
    assert not np.array_equal(got, f32)  # it really computed in bfloat16
    assert (np.abs(got - f32) / f32).max() < 2e-2


def test_outputs_metrics_eval_plot(parity_run):
    import json

    _, result, _, out = parity_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    eval_recs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(train_recs[0])
    assert train_recs[0]["tokens_per_sec"] > 0 and train_recs[0]["loss"] == pytest.approx(result.losses[5])
    # step 20 ran with the schedule at 19 updates: warmup 3, cosine over 17 steps down to 0.1 * lr
    assert train_recs[-1]["lr"] == pytest.approx(3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * 16 / 17)), rel=1e-5)
    assert [r["step"] for r in eval_recs] == [10, 20] and result.evals[20]["eval_loss"] < result.evals[10]["eval_loss"]
    assert eval_recs[1]["eval_ppl"] == pytest.approx(math.exp(eval_recs[1]["eval_loss"]))
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_config"]["vocab_size"] == 50259 and saved["optimizer"]["lr"] == 3e-3


# ----------------------------------------------------------------------------- 6. overfitting


def test_overfits_sharegpt_identity(tmp_path):
    """A tiny randomly initialised GPT-2 memorises 8 ShareGPT identity chats: train loss < 0.1."""
    pytest.importorskip("torch")
    from tests.train_worker import tiny_hf_gpt2

    data = shared_path("chat", "sharegpt_identity.json")
    model = tiny_hf_gpt2(tmp_path / "hf", n_positions=128)  # loaded, not jit-initialised: less compile time
    # 8 conversations packed into 5 rows of 128: every step sees all of them (~0.05 by step 40).
    cfg = tiny_config(tmp_path, model={"name_or_path": str(model)},
                      data={"sources": [str(data)], "seq_len": 128, "max_examples": 8},
                      optimizer={"lr": 1e-2, "weight_decay": 0.0},
                      schedule={"name": "constant", "warmup_steps": 5},
                      train={"steps": 45, "batch_size": 5, "eval_every": 0},
                      logging={"log_every": 15})
    with optimized_xla():  # 45 steps: at -O0 they ran 2.3x longer than at XLA's default
        result = train(cfg)
    final = result.losses[cfg.train.steps]
    assert result.losses[1] > 5 and final < 0.1, f"train loss {result.losses[1]} -> {final} after {cfg.train.steps} steps"


# ----------------------------------------------------------------------------- logging and non-finite steps


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    """lr=1e35 blows the weights up after step 1; later steps are non-finite, not applied, and
    after train.max_nonfinite in a row the run stops; the last checkpoint stays finite."""
    import jax
    from flax import nnx

    from jaxgpt.checkpoint import Checkpointer, checkpoint_dir
    from jaxgpt.loader import load_for_inference
    from jaxgpt.config import FLOAT_RANGES
    from jaxgpt.inputs import Range

    # The config refuses lr > 1; the guard must hold whatever blows the weights up, so it is let through here.
    monkeypatch.setitem(FLOAT_RANGES, "optimizer.lr", Range(0, low_open=True))

    pytest.importorskip("torch")
    from tests.train_worker import tiny_hf_gpt2

    cfg = tiny_config(tmp_path, model={"name_or_path": str(tiny_hf_gpt2(tmp_path / "hf"))},
                      optimizer={"lr": 1e35, "grad_clip": None},
                      schedule={"name": "constant", "warmup_steps": 0},
                      train={"steps": 10, "max_nonfinite": 3},
                      checkpoint={"enabled": True, "save_every": 1, "async_save": False})
    with pytest.raises(TrainingError, match=r"stopping at step 4: 3 non-finite steps in a row \(train.max_nonfinite=3\)"):
        train(cfg)
    ckpt = Checkpointer(checkpoint_dir(tmp_path / "run"), save_every=1, read_only=True)
    assert ckpt.latest_step() == 3  # saved before the stop; step 4 never saved
    model, _ = load_for_inference(tmp_path / "run")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_train_step_compiles_once(tmp_path, caplog):
    """The step's outputs carry the shardings its inputs had, so steps 2.. reuse the first
    step's program. (A state placed differently from the step's outputs recompiles at step 2:
    ~15 s more for GPT-2 124M on CPU, seen in tools/bench.py before it placed state like this.)"""
    import logging

    import jax

    cfg = tiny_config(tmp_path, train={"steps": 3})
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            train(cfg)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, f"the train step compiled {len(compiles)} times"


def test_model_settings_reach_the_model(tmp_path):
    """model.attention, scan_layers, loss_chunks and remat reach the model on both paths: from scratch and loaded weights."""
    import jax
    from flax import nnx

    from jaxgpt import sharding
    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.setup import build_model
    from jaxgpt.weights import save_pretrained

    mesh = sharding.make_mesh((1, len(jax.devices()), 1))
    arch = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    folder = save_pretrained(GPT2(GPT2Config(**arch), rngs=nnx.Rngs(0)), tmp_path / "hf")
    for name in (None, str(folder)):
        cfg = tiny_config(tmp_path, model={"name_or_path": name, "attention": "xla", "scan_layers": False,
                                           "loss_chunks": 2, "remat": "full"})
        graphdef, params, rest, gcfg = build_model(cfg, 300, mesh)
        assert (gcfg.attention, gcfg.scan_layers, gcfg.loss_chunks, gcfg.remat) == ("xla", False, 2, "full")
        assert nnx.merge(graphdef, params, rest).config.loss_chunks == 2
        assert nnx.merge(graphdef, params, rest).h[0].attn.implementation == "xla"


def test_pretrained_vocabulary_grows_as_resize_token_embeddings_grows_it(tmp_path):
    """Chat tokens added to a pretrained model: build_model grows the embedding on the host, before
    the model is built. The result must be resize_token_embeddings' (new rows at the mean of the
    old ones, padding rows zero), and a checkpoint that disagrees with its config still names the
    tensor."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxgpt import sharding
    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.weights import resize_token_embeddings
    from jaxgpt.setup import build_model
    from jaxgpt.weights import WeightsError, load_pretrained, save_pretrained

    mesh = sharding.make_mesh((1, len(jax.devices()), 1))
    arch = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    folder = save_pretrained(GPT2(GPT2Config(**arch), rngs=nnx.Rngs(0)), tmp_path / "hf")
    cfg = tiny_config(tmp_path, model={"name_or_path": str(folder), "vocab_multiple": 64})
    graphdef, params, rest, gcfg = build_model(cfg, 302, mesh)
    assert (gcfg.vocab_size, gcfg.padded_vocab_size) == (302, 320)
    ref_model, _ = load_pretrained(folder, vocab_multiple=64)
    ref = nnx.state(resize_token_embeddings(ref_model, 302), nnx.Param)
    flat, ref_flat = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(ref))
    assert flat.keys() == ref_flat.keys()
    for path, var in flat.items():  # the mean rows: summed in another order (float32 rounding)
        np.testing.assert_allclose(np.asarray(var[...]), np.asarray(ref_flat[path][...]), rtol=0, atol=1e-7,
                                   err_msg=str(path))
    wte = np.asarray(params["wte"][...])
    assert not wte[302:].any() and np.array_equal(wte[300], wte[301]) and wte[300].any()

    hf = GPT2Config(**{**arch, "n_embd": 64})  # weights of another width under the same config.json
    bad = save_pretrained(GPT2(hf, rngs=nnx.Rngs(0)), tmp_path / "bad")
    (bad / "config.json").write_text((folder / "config.json").read_text())
    cfg = tiny_config(tmp_path, model={"name_or_path": str(bad)})
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor wte\.weight has shape \(300, 64\)"):
        build_model(cfg, 302, mesh)


def test_fresh_run_refused_where_checkpoints_exist(tmp_path):
    """checkpoint.resume=false in a folder that holds checkpoints would skip saving every step the
    old run has (export / chat would load the old model): refused, before anything is built."""
    from jaxgpt.config import ConfigError

    cfg = tiny_config(tmp_path, train={"steps": 2}, checkpoint={"enabled": True, "save_every": 2, "async_save": False})
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = tiny_config(tmp_path, train={"steps": 2}, optimizer={"lr": 0.1},
                        checkpoint={"enabled": True, "save_every": 2, "async_save": False, "resume": False})
    with pytest.raises(ConfigError, match=r"checkpoint.resume=false, but .*checkpoints already holds checkpoints "
                                          r"\(steps 2\): set train.output_dir to a new folder"):
        train(again)
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_plain_text_run_samples_its_prompts_as_text(tmp_path, capsys):
    """Without a chat template (plain-text data), logging.sample_prompts are continued as text."""
    text = tmp_path / "play.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    cfg = tiny_config(tmp_path, data={"sources": [str(text)], "eval_fraction": 0.2},
                      train={"steps": 2, "eval_every": 2},
                      logging={"sample_prompts": ["To be"], "sample_max_new_tokens": 4})
    result = train(cfg)
    assert result.tokenizer.chat_template is None and 2 in result.evals
    assert "step 2 sample | 'To be' -> " in capsys.readouterr().out


def test_cli_errors_name_the_key_before_any_hub_lookup(tmp_path, monkeypatch, capsys):
    """A mistyped model / tokenizer folder and pod settings off a pod: one line naming the key."""
    from jaxgpt.train import main

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # runs/... could be a hub id
    (tmp_path / "runs" / "gpt2-chat").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cases = [(["model.name_or_path=./my-gpt2"], "error: model.name_or_path=./my-gpt2: no such folder\n"),
             (["model.name_or_path=runs/gpt2-chta"],
              "error: model.name_or_path=runs/gpt2-chta: no such folder (in runs/: gpt2-chat), and the Hugging "
              "Face Hub could not provide it either (LocalEntryNotFoundError)\n"),
             (["model.tokenizer=/nonexistent/tok"], "error: model.tokenizer=/nonexistent/tok: no such folder\n")]
    for overrides, message in cases:
        assert main([*overrides, f"train.output_dir={tmp_path / 'out'}", "train.steps=1"]) == 1
        assert capsys.readouterr().err == message
    # jax.distributed must start before the backend: in a fresh process, as the CLI runs
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    r = subprocess.run([sys.executable, "-m", "jaxgpt.train", "distributed.enabled=true", "train.steps=1",
                        f"train.output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.splitlines()[-1] + "\n"
    assert err.startswith("error: distributed.enabled=true, but JAX found no cluster to join") and \
        "distributed.coordinator_address" in err and "Traceback" not in r.stderr


@pytest.mark.parametrize("name, warmup, steps", [("cosine", 10, 50), ("cosine", 100, 20), ("linear", 5, 30),
                                                 ("linear", 200, 50), ("constant", 30, 20)])
def test_schedule_matches_transformers(name, warmup, steps):
    """Learning rate at every optimizer step against transformers' schedules, a warmup longer than the
    run included (it keeps its slope; the run ends before the peak)."""
    import torch
    import transformers

    from jaxgpt.step import make_schedule

    lr, ratio = 3e-4, (0.1 if name == "cosine" else 0.0)
    cfg = from_dict({"optimizer": {"lr": lr}, "train": {"steps": steps},
                     "schedule": {"name": name, "warmup_steps": warmup, "min_lr_ratio": ratio}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = {"cosine": lambda: transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps,
                                                                                       min_lr_rate=ratio),
          "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, warmup, steps),
          "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, warmup)}[name]()
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = [float(make_schedule(cfg)(c)) for c in range(steps)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-10)


def test_bad_optimizer_and_schedule_values_are_refused():
    from jaxgpt.config import ConfigError, validate

    for section, key, value, message in (
            ("optimizer", "grad_clip", -1.0, "optimizer.grad_clip=-1.0: must be >= 0 (0 or null = off)"),
            ("optimizer", "b2", 1.0, "optimizer.b2=1.0: must be in [0, 1)"),
            ("optimizer", "eps", 0.0, "optimizer.eps=0.0: must be in (0, 1]"),
            ("optimizer", "weight_decay", -0.1, "optimizer.weight_decay=-0.1: must be >= 0"),
            ("schedule", "warmup_steps", -5, "schedule.warmup_steps=-5: must be >= 0"),
            ("schedule", "decay_steps", 0, "schedule.decay_steps=0: must be at least 1"),
            ("schedule", "min_lr_ratio", 2.0, "schedule.min_lr_ratio=2.0: must be in [0, 1]"),
            ("model", "param_dtype", "float16", "model.param_dtype=float16: the weights and AdamW state")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(from_dict({section: {key: value}}), 1)



def test_loss_plot_reads_every_run_of_the_output_dir(tmp_path):
    """After a resume, loss.png draws the earlier runs' logged steps too (the last value of a step
    logged twice), not only the steps of the last run."""
    import json

    from jaxgpt.metrics import logged_losses

    records = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 7.0}] + \
              [{"step": s, "loss": 5.0 - s} for s in (3, 4, 5)]  # a resume from step 2 logged 3 and 4 again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    losses, evals = logged_losses(tmp_path)
    assert losses == {1: 9.0, 2: 8.0, 3: 2.0, 4: 1.0, 5: 0.0} and evals == {4: 7.0}
    assert logged_losses(tmp_path / "missing") == ({}, {})


def test_missing_tensorboardx_names_the_setting(tmp_path, monkeypatch):
    """logging.tensorboard without tensorboardX installed (seen on a GPU machine's image): a
    ConfigError that says how to go on, before any step runs."""
    import sys

    from jaxgpt.config import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the import now raises ImportError
    cfg = tiny_config(tmp_path, logging={"tensorboard": True})
    with pytest.raises(ConfigError, match=r"logging.tensorboard=true needs tensorboardX .*logging.tensorboard=false"):
        train(cfg)
    assert not list((tmp_path / "run").glob("**/events.out.tfevents.*"))
