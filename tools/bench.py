"""jaxgpt vs the PyTorch tools users would pick instead, side by side on one machine.

    python tools/bench.py                 # full CPU run (GPT-2 124M; ~25 min on 2 cores)
    python tools/bench.py --quick         # tiny model: a regular smoke of every section (each torch.compile side adds its compilation)
    python tools/bench.py --gpu           # tokens/s + MFU of GPT-2 124M, seq 1024, bf16 (tools/bench_gpu.sh)
    python tools/bench.py --gpu --quick --batch 2 --steps 8   # its dry run on a CPU (tiny model)
    python tools/bench.py --sections train,finetune
    python tools/bench.py --sections train --rounds 3   # the sides alternate 3 times; median ratio
    python tools/bench.py --sections finetune --rounds 3   # + 2 more rounds of jaxgpt's and TRL's defaults

Sections (each side runs in its own fresh process, one after the other, so
start-up, compile and peak memory are measured per side; both read the same
weights from one safetensors folder and the same batches from one seed):

  train     train-step tokens/s, jaxgpt (jitted step, optax AdamW) vs transformers
            GPT2LMHeadModel (SDPA) + torch.optim.AdamW, eager and compiled (forward +
            loss under torch.compile, fused AdamW); GPT-2 124M random init, float32,
            4x256 and 8x128; peak RSS; time to first step (process start -> import ->
            load weights -> compile -> first step done), for jaxgpt also with a warm
            persistent compilation cache (a second run); first-step loss of every side
            (same weights + batch => same number).
  finetune  one epoch SFT on N oasst threads (../shared) at seq 512: jaxgpt
            (`jaxgpt.train.train`, packing, its defaults: model.remat auto = minimal
            on a CPU; also with remat none and full, the latter as TRL's default
            gradient checkpointing) vs TRL SFTTrainer with its defaults and with
            packing; assistant-only loss, same ChatML template / tokenizer; wall
            time, peak RSS, trained tokens, final losses.
  dpo       one epoch of DPO over N OASST preference pairs (tools/oasst_pairs.py: best- vs
            worst-ranked sibling replies) at seq 512 a sequence: jaxgpt (`jaxgpt.train.train`,
            objective dpo, pairs packed into rows of 1024, and padded one pair a row) vs TRL
            DPOTrainer with its defaults (max_length 512); wall time, peak RSS, pairs trained,
            mean loss.
  generate  tools/bench_generate.py (jaxgpt generate vs transformers generate, eager
            and with a static cache + torch.compile).
  lora      LoRA r=16 on every projection, GPT-2 124M, 4x256: jaxgpt vs jaxgpt's full
            fine-tuning vs PEFT + PyTorch eager, jaxgpt's sides also with the least memory
            (LEAN: blocks scanned, remat full); tokens/s, peak RSS, optimizer-state bytes.
  serve     tools/bench_serve.py (python -m jaxgpt.serve vs transformers serve
            --continuous-batching: output tokens/s and time to first token at
            concurrency 1, 8 and 32); only when named: --sections serve.
  --gpu     tools/bench_gpu.sh: jaxgpt's train step on one GPU, GPT-2 124M, seq 1024,
            bf16, on packed and causal rows (GPU_HEADLINE; or any of GPU_VARIANTS), vs
            torch.compile and torch eager with bf16 autocast; tokens/s, MFU, peak
            memory, time to first step, losses at steps 1 and 10.

Results are printed as a table and written to --out (JSON); docs/benchmarks.md
holds the current numbers, docs/benchmarks-history.md every earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()  # before heavy imports: "time to first step" starts here (or at --t-spawn)

ROOT = Path(__file__).resolve().parents[1]
OASST = ROOT.parent / "shared" / "data" / "chat" / "oasst_en100_messages.jsonl"
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
TINY = dict(n_layer=2, n_head=2, n_embd=128, n_positions=512)
RESULT_TAG = "BENCH_RESULT "
CPU_WORKER_TIMEOUT = 3600  # seconds: a hung worker is reported as an error, the run goes on
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100/H200 SXM (NVIDIA datasheet)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def optimizer_hparams() -> dict:
    """One AdamW setting for both sides of the train-step comparison (jaxgpt's defaults)."""
    return dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def make_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32) for _ in range(n)]


def pipelined_step_s(dispatch, read, steps) -> float:
    """Seconds a step, timed as jaxgpt.train runs them: each ``dispatch(i)`` queued back to back,
    and its loss ``read`` once the next one is queued, so the device never waits for the host."""
    t0, pending = time.perf_counter(), None
    for i in steps:
        handle = dispatch(i)
        if pending is not None:
            read(pending)
        pending = handle
    read(pending)
    return (time.perf_counter() - t0) / len(steps)


def step_stats(times: list[float], tokens_per_step: int) -> dict:
    """Tokens/s from the median timed step (a shared VM's stolen-CPU spikes hit single steps),
    with the mean and every step time kept for the record."""
    import statistics

    med = statistics.median(times)
    return {"tokens_per_s": tokens_per_step / med, "step_s": med,
            "tokens_per_s_mean": tokens_per_step * len(times) / sum(times), "step_times_s": times}


# ----------------------------------------------------------------------------- workers (one process each)

def train_setup(a: dict):
    """jaxgpt's side of the train section for the worker args ``a``: (step, state, batches, rng,
    model config), the state placed as ``jaxgpt.train.train`` places it. tools/ab_step.py builds
    one per variant."""
    import jax
    import numpy as np

    from jaxgpt import sharding
    from jaxgpt.config import Config
    from jaxgpt.setup import build_model
    from jaxgpt.step import make_optimizer, make_train_step

    cfg = Config()
    cfg.model.name_or_path = a["model"]
    cfg.model.dtype = a.get("dtype", "float32")
    cfg.model.attention = a.get("attention", "auto")
    cfg.model.vocab_multiple = a.get("vocab_multiple", 1)
    cfg.model.scan_layers = a.get("scan_layers")  # None: jaxgpt's default for the backend
    cfg.model.remat = a.get("remat", "auto")
    cfg.model.kernels = a.get("kernels", "auto")
    cfg.model.loss_chunks = a.get("loss_chunks")  # None: jaxgpt's default for the backend
    cfg.train.steps = a["warmup"] + a["steps"]
    cfg.schedule.name = "constant"
    for k, v in optimizer_hparams().items():
        setattr(cfg.optimizer, k, v)
    mesh = sharding.make_mesh((1, len(jax.devices()), 1))
    graphdef, params, rest, gcfg = build_model(cfg, 0, mesh)
    if a.get("lora_rank"):  # the lora section: adapters on every projection, the base frozen
        from jaxgpt.setup import with_adapters

        cfg.lora.rank, cfg.lora.alpha = a["lora_rank"], 2.0 * a["lora_rank"]
        cfg.lora.base_dtype = a.get("lora_base_dtype", "float32")
        graphdef, params, rest, _ = with_adapters(cfg, graphdef, params, rest, gcfg.vocab_size, mesh)
    tx, _ = make_optimizer(cfg, params)
    # Placed exactly as jaxgpt.train.train places it: the step's outputs then match its inputs,
    # so the second step reuses the first step's compiled program (no recompile).
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    o_shard = sharding.opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    state = {"params": params, "opt_state": opt_state}
    step = make_train_step(graphdef, rest, tx, mesh=mesh, state_shardings={"params": p_shard, "opt_state": o_shard})
    b, t = a["batch"], a["seq"]
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    batches = [{"input_ids": x[None, :, :-1], "targets": x[None, :, 1:], "loss_mask": np.ones((1, b, t), np.int32),
                "segment_ids": np.ones((1, b, t), np.int32), "positions": pos[None]}
               for x in make_batches(gcfg.vocab_size, b, t, a["warmup"] + a["steps"])]
    if not a.get("segments", True):  # no packing: causal attention only
        batches = [{k: v for k, v in x.items() if k != "segment_ids"} for x in batches]
    batches = [jax.device_put(x) for x in batches]
    return step, state, batches, jax.random.key_data(jax.random.key(0)), gcfg


def worker_train_jax(a: dict) -> dict:
    if a.get("compile_cache"):  # jaxgpt's commands use one by default; the workers start without
        os.environ["JAXGPT_COMPILE_CACHE"] = a["compile_cache"]
        from jaxgpt import compile_cache
        compile_cache.enable()
    import jax

    from jaxgpt.metrics import flops_per_token

    dry_run = None
    if a.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        # The GPU section dry-run on a CPU: the same jax.nn.dot_product_attention call, XLA's implementation
        a, dry_run = {**a, "attention": "xla"}, "attention xla for cudnn, which needs a GPU"
    if a.get("attention") == "flash" and jax.default_backend() != "gpu":  # jaxgpt.flash picks the interpreter
        dry_run = "flash attention in Pallas' interpreter, Triton needs a GPU"
    step, state, batches, rng, gcfg = train_setup(a)
    rss_loaded = rss_mb()
    b, t = a["batch"], a["seq"]
    losses, t_first = [], None
    for i in range(a["warmup"]):
        state, m = step(state, batches[i], rng)
        losses.append(float(m["loss"]))
        t_first = t_first or time.time()
    times, timed_losses = [], []
    for i in range(a["warmup"], a["warmup"] + a["steps"]):
        t0 = time.perf_counter()
        state, m = step(state, batches[i], rng)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        timed_losses.append(m["loss"])
    losses += [float(x) for x in timed_losses]
    pipelined = None
    if a.get("pipelined"):  # the GPU section: also time the steps as jaxgpt.train runs them
        # (The times above wait for every step, so each one also holds the host's dispatch of the
        # next; docs/benchmarks.md.)
        def dispatch(i):
            nonlocal state
            state, metrics = step(state, batches[i], rng)
            return metrics

        timed = range(a["warmup"], a["warmup"] + a["steps"])
        pipelined = pipelined_step_s(dispatch, lambda metrics: float(metrics["loss"]), timed)
        # The same steps with nothing read back until the last: what the device alone sustains.
        t0 = time.perf_counter()
        for i in timed:
            m = dispatch(i)
        float(m["loss"])
        back_to_back = (time.perf_counter() - t0) / a["steps"]
    profile = None
    if a.get("profile_dir"):  # --profile: trace two more steps and summarise the device's kernels
        from trace_summary import summarize

        with jax.profiler.trace(a["profile_dir"], create_perfetto_trace=True):
            for i in range(2):
                state, m = step(state, batches[i], rng)
            jax.block_until_ready(state)
        profile = summarize(a["profile_dir"], steps=2)
    out = {**step_stats(times, b * t), "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
           "time_to_first_step_s": t_first - a["t_spawn"], "peak_rss_mb": rss_mb(),
           "rss_after_load_mb": rss_loaded, "backend": jax.default_backend(), "n_devices": len(jax.devices()),
           "device_kind": jax.devices()[0].device_kind,
           "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state["opt_state"])),
           "trainable_params": sum(x.size for x in jax.tree.leaves(state["params"]))}
    # The model's own FLOPs: padding rows of the embedding (vocab_multiple) do not count.
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_params -= (gcfg.padded_vocab_size - gcfg.vocab_size) * gcfg.n_embd
    fpt = flops_per_token(gcfg, n_params, t)
    out.update(flops_per_token=fpt, n_params=n_params)
    if pipelined:
        out.update(step_s_pipelined=pipelined, tokens_per_s_pipelined=b * t / pipelined,
                   step_s_no_readback=back_to_back)
    if a.get("peak_flops"):
        out["mfu"] = out["tokens_per_s"] * fpt / (a["peak_flops"] * len(jax.devices()))
        if pipelined:
            out["mfu_pipelined"] = out["tokens_per_s_pipelined"] * fpt / (a["peak_flops"] * len(jax.devices()))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    if profile is not None:
        out["profile"] = profile
    if dry_run:
        out["dry_run"] = dry_run
    return out


# torch.compile settings tried in order until one compiles and runs: inductor, each shape static
# (the train step has one shape, generate a prefill and a decode shape), then inductor's GEMM
# autotuning without CUDA graphs, then AOTAutograd without inductor's code generation.
COMPILE_TRIES = ({"dynamic": False}, {"mode": "max-autotune-no-cudagraphs", "dynamic": False},
                 {"backend": "aot_eager"})


def compile_with_fallback(fn, first_call, tries=COMPILE_TRIES):
    """``torch.compile(fn, **settings)`` under the first of ``tries`` with which ``first_call(compiled)``
    runs (compiling is lazy: its errors surface in the first call). Returns (compiled, the first
    call's result, {"settings": what ran, "failed": [each earlier try and its error]})."""
    import torch

    failed = []
    for settings in tries:
        try:
            compiled = torch.compile(fn, **settings)
            return compiled, first_call(compiled), {"settings": settings, "failed": failed}
        except Exception as e:  # noqa: BLE001 - a host's compiler failure is a result: record it, try the next
            failed.append({"settings": settings, "error": f"{type(e).__name__}: {e}"[:2000]})
            torch._dynamo.reset()
    raise RuntimeError("torch.compile failed with every setting tried: "
                       + "; ".join(f"{f['settings']}: {f['error'][:300]}" for f in failed))


def fresh_inductor_cache() -> None:
    """Cold starts, as jaxgpt's workers get (JAXGPT_COMPILE_CACHE=off): inductor's on-disk caches
    in an empty folder, set before torch is imported, removed when the process exits."""
    import atexit

    folder = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgpt-bench-inductor-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def worker_train_torch(a: dict) -> dict:
    """transformers' GPT-2 with torch.optim.AdamW, eager; with ``compile``, PyTorch at its best as
    nanoGPT runs it: the forward and loss under ``torch.compile`` (inductor) and a fused AdamW."""
    compiled = a.get("compile", False)
    if compiled:
        fresh_inductor_cache()
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    device = a.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT2LMHeadModel.from_pretrained(a["model"], dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()  # dropout is 0 in the exported config, as in jaxgpt
    if a.get("lora_rank"):  # the lora section: PEFT's LoRA on every projection, the base frozen
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=a["lora_rank"], lora_alpha=2 * a["lora_rank"], target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True, lora_dropout=0.0))
    h = optimizer_hparams()
    # Same decay rule as jaxgpt: matrices decay; biases, LayerNorm and embeddings do not.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n and "wpe" not in n)]
    # fused: one kernel for the whole update, on CUDA and (torch >= 2.4) on the CPU; None: torch's default (foreach)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], fused=compiled or None)
    rss_loaded = rss_mb()
    vocab = model.config.vocab_size
    batches = [torch.from_numpy(x).long().to(device)
               for x in make_batches(vocab, a["batch"], a["seq"], a["warmup"] + a["steps"])]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=a.get("dtype") == "bfloat16")

    def loss_of(x):
        with autocast:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, vocab).float(), x[:, 1:].reshape(-1))

    def step(forward, x, sync=True):
        loss = forward(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["grad_clip"])
        opt.step()
        return loss.item() if sync else loss.detach()

    forward, compile_info = loss_of, None
    if compiled:  # the first step compiles the forward and (on the first backward) the backward
        tries = [dict(t) for t in a.get("compile_tries", COMPILE_TRIES)]
        forward, first, compile_info = compile_with_fallback(loss_of, lambda f: step(f, batches[0]), tries)
        losses, t_first = [first], time.time()
    else:
        losses, t_first = [step(forward, batches[0])], time.time()
    for i in range(1, a["warmup"]):
        losses.append(step(forward, batches[i]))
    times = []
    for i in range(a["warmup"], a["warmup"] + a["steps"]):
        t0 = time.perf_counter()
        losses.append(step(forward, batches[i]))  # .item() syncs every step, as a training loop that logs does
        times.append(time.perf_counter() - t0)
    pipelined = {}
    if a.get("pipelined"):  # as jaxgpt's side: each step's loss read once the next one is queued
        dt = pipelined_step_s(lambda i: step(forward, batches[i], sync=False), lambda loss: loss.item(),
                              range(a["warmup"], a["warmup"] + a["steps"]))
        pipelined = {"step_s_pipelined": dt, "tokens_per_s_pipelined": a["batch"] * a["seq"] / dt}
    return {**step_stats(times, a["batch"] * a["seq"]), **pipelined, "first_loss": losses[0],
            "last_loss": losses[-1], "losses": losses, "time_to_first_step_s": t_first - a["t_spawn"],
            "peak_rss_mb": rss_mb(), "rss_after_load_mb": rss_loaded, "torch_threads": torch.get_num_threads(),
            "attention": model.config._attn_implementation, "fused_adamw": bool(compiled), "compile": compile_info,
            "n_params": sum(p.numel() for p in model.parameters()),  # the tied head counted once, as jaxgpt's
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "opt_state_bytes": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                                   if torch.is_tensor(t)),
            "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def read_threads(path: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"messages": r["messages"]} for r in rows[:n]]


def train_epoch(a: dict, data: dict, steps: int, sections: dict) -> tuple[float, list[dict], list[float]]:
    """``jaxgpt.train.train`` for ``steps`` steps (lr ``a["lr"]``, linear decay, no checkpoints):
    (wall time of the call, metrics.jsonl records, losses by step)."""
    from jaxgpt.config import from_dict
    from jaxgpt.train import train

    out = Path(a["out"])
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends: start clean
    cfg = from_dict({
        "data": data,
        "optimizer": {"lr": a["lr"], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"name": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0},
        "train": {"steps": steps, "batch_size": a["batch"], "eval_every": 0, "output_dir": str(out)},
        "checkpoint": {"enabled": False},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        **sections,
    })
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return wall, records, [result.losses[k] for k in sorted(result.losses)]


def worker_finetune_jax(a: dict) -> dict:
    """One epoch of ``jaxgpt.train.train`` over the packed threads; wall time of the call."""
    import math

    from jaxgpt.data import DataConfig, build_dataset
    from jaxgpt.tokenizer import add_chat_template, load_tokenizer

    data = {"sources": [a["data"]], "seq_len": a["seq"], "pack": True}
    rows = build_dataset(DataConfig(**data), add_chat_template(load_tokenizer(a["model"]))).num_rows
    steps = math.ceil(rows / a["batch"])  # one epoch (the last batch wraps to the next epoch's first rows)
    wall, records, losses = train_epoch(a, data, steps, {"model": {"name_or_path": a["model"],
                                                                   "remat": a.get("remat", "auto")}})
    trained = sum(r.get("trained_tokens", 0) for r in records if "loss" in r)
    return {"train_wall_s": wall, "process_to_end_s": time.time() - a["t_spawn"], "steps": steps, "rows": rows,
            "trained_tokens": int(trained), "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
            "losses": losses, "peak_rss_mb": rss_mb()}


def worker_finetune_trl(a: dict) -> dict:
    """One epoch of TRL's SFTTrainer: its defaults (+ packing if asked), assistant-only loss, CPU float32."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a["model"])  # the same ChatML template with {% generation %} markers
    model = GPT2LMHeadModel.from_pretrained(a["model"], dtype=torch.float32)
    args = SFTConfig(output_dir=a["out"], num_train_epochs=1, max_length=a["seq"], assistant_only_loss=True,
                     packing=a["packing"], per_device_train_batch_size=a["batch"], learning_rate=a["lr"],
                     use_cpu=True, bf16=False,  # this CPU has no bf16 training path in TRL
                     logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    t_init = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(read_threads(a["data"], a["threads"])),
                         processing_class=tok)
    prep = time.perf_counter() - t_init
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    ds = trainer.train_dataset  # after TRL's tokenizing, truncation / packing: "labels" is -100 where untrained
    trained = sum(sum(1 for x in labels if x != -100) for labels in ds["labels"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_wall_s": wall, "dataset_prep_s": prep, "process_to_end_s": time.time() - a["t_spawn"],
            "steps": trainer.state.global_step, "rows": len(ds), "trained_tokens": trained,
            "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses), "losses": losses,
            "gradient_checkpointing": args.gradient_checkpointing, "peak_rss_mb": rss_mb()}


def worker_dpo_jax(a: dict) -> dict:
    """One epoch of ``jaxgpt.train.train`` with objective dpo; a row holds a pair (two sequences)."""
    import math

    from jaxgpt.data import DataConfig, build_preference_datasets
    from jaxgpt.tokenizer import load_tokenizer

    data = {"sources": [a["data"]], "seq_len": 2 * a["seq"], "pack": a["pack"]}
    ds = build_preference_datasets(DataConfig(**data), load_tokenizer(a["model"]))[0]
    rows = ds.num_rows
    steps = math.ceil(rows / a["batch"])
    wall, records, losses = train_epoch(a, data, steps, {"model": {"name_or_path": a["model"]},
                                                         "objective": {"name": "dpo"}})
    # pairs: the epoch's; the last batch wraps to the next epoch's first rows, also computed (pairs_computed)
    return {"train_wall_s": wall, "steps": steps, "rows": rows, "pairs": ds.num_pairs,
            "pairs_computed": int(sum(r.get("pairs", 0) for r in records)),
            "mean_loss": sum(losses) / len(losses), "peak_rss_mb": rss_mb()}


def worker_dpo_trl(a: dict) -> dict:
    """One epoch of TRL's DPOTrainer with its defaults (a reference copy of the model), CPU float32."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a["model"])
    model = GPT2LMHeadModel.from_pretrained(a["model"], dtype=torch.float32)
    args = DPOConfig(output_dir=a["out"], num_train_epochs=1, max_length=a["seq"], learning_rate=a["lr"],
                     per_device_train_batch_size=a["batch"], use_cpu=True, bf16=False, logging_steps=1,
                     save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    pairs = [json.loads(x) for x in Path(a["data"]).read_text().splitlines() if x.strip()]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_wall_s": wall, "steps": trainer.state.global_step, "pairs": len(trainer.train_dataset),
            "mean_loss": sum(losses) / len(losses), "peak_rss_mb": rss_mb()}


WORKERS = {"train_jax": worker_train_jax, "train_torch": worker_train_torch,
           "finetune_jax": worker_finetune_jax, "finetune_trl": worker_finetune_trl,
           "dpo_jax": worker_dpo_jax, "dpo_trl": worker_dpo_trl}


def run_worker(name: str, args: dict, timeout: float | None = None, cpu: bool = False,
               malloc: str = "as_cli") -> dict:
    """Run one worker in a fresh Python process; returns its result dict (or {"error": ...}).
    ``cpu``: both libraries see the CPU only (the CPU sections; on a GPU host jax would take the GPU
    and run float32 matmuls in TF32, torch in true float32).
    ``malloc``: "as_cli" runs a jaxgpt worker with the glibc malloc settings jaxgpt's CLIs give
    themselves on a CPU host (jaxgpt/host_memory.py) and a PyTorch one with the defaults, as each is
    run; "tuned" gives any worker those settings (PyTorch too, for the like-for-like row)."""
    from jaxgpt import host_memory

    args = {**args, "t_spawn": time.time()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-args", json.dumps(args)]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # it would win over "off"
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true",
                "JAXGPT_COMPILE_CACHE": "off"})  # cold starts: every jaxgpt worker compiles (unless it says otherwise)
    if cpu:
        env.update({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    if (malloc == "tuned" or name.endswith("_jax")) and host_memory.why_not(env) is None:
        env["GLIBC_TUNABLES"] = host_memory.TUNABLES
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["process_wall_s"] = time.time() - t0
            out["glibc_tunables"] = env.get("GLIBC_TUNABLES")
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"{name} exited {proc.returncode}: " + " | ".join(tail)}


def run_cpu_worker(name: str, args: dict, malloc: str = "as_cli") -> dict:
    """A worker of the CPU sections: the GPU hidden, and a hung worker reported instead of waited for."""
    return run_worker(name, args, timeout=CPU_WORKER_TIMEOUT, cpu=True, malloc=malloc)


# ----------------------------------------------------------------------------- sections

def write_init_model(folder: Path, arch: dict, chat: bool) -> Path:
    """A random-init GPT-2 (seed 0) as an HF folder both sides load; with chat tokens if ``chat``."""
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.weights import resize_token_embeddings
    from jaxgpt.tokenizer import add_chat_template, load_tokenizer
    from jaxgpt.weights import save_pretrained

    if (folder / "model.safetensors").exists():
        return folder
    tok = load_tokenizer()
    if chat:
        add_chat_template(tok)
    model = GPT2(GPT2Config(**arch), rngs=nnx.Rngs(0))
    if len(tok) > model.config.vocab_size:
        model = resize_token_embeddings(model, len(tok))
    save_pretrained(model, folder, tokenizer=tok)
    return folder


def section_train(work: Path, quick: bool, steps: int, warmup: int, rounds: int = 1) -> list[dict]:
    arch = TINY if quick else GPT2_124M
    folder = write_init_model(work / ("init-tiny" if quick else "init-124m"), arch, chat=False)
    shapes = [(4, 64)] if quick else [(4, 256), (8, 128)]
    rows = []
    for b, t in shapes:
        # segments=False: plain causal attention, as PyTorch's side (a packing mask would be jaxgpt's work only)
        args = {"model": str(folder), "batch": b, "seq": t, "steps": steps, "warmup": warmup, "segments": False}
        # Rounds alternate the sides (jaxgpt, PyTorch eager, PyTorch compiled, PyTorch eager with
        # jaxgpt's malloc settings: the like-for-like row), so a shared machine's slow minutes fall on
        # all; the row's top-level results are round 1's, its medians are over all rounds.
        res = {"rounds": []}
        for i in range(rounds):
            one = {side: run_cpu_worker(f"train_{side}", args) for side in ("jax", "torch")}
            one["torch_compiled"] = run_cpu_worker("train_torch", {**args, "compile": True})
            one["torch_tuned_malloc"] = run_cpu_worker("train_torch", args, malloc="tuned")
            res["rounds"].append(one)
            if rounds > 1:
                print(f"  train {b}x{t}: round {i + 1}/{rounds}: {round_ratios(one)}", flush=True)
        res.update(res["rounds"][0])
        res.update(median_ratios(res["rounds"], "jax", TRAIN_PEERS, "tokens_per_s"))
        # Start-up again with the compiled step in a persistent cache (filled by a first run).
        cache = str(work / f"xla-cache-{b}x{t}")
        shutil.rmtree(cache, ignore_errors=True)
        for _ in range(2):
            res["jax_warm_cache"] = run_cpu_worker("train_jax", {**args, "steps": 1, "compile_cache": cache})
        rows.append({"shape": f"{b}x{t}", **res})
        print_train_row(rows[-1])
    return rows


# The train section's ratios: jaxgpt's tokens/s over each PyTorch side's (name: side).
TRAIN_PEERS = {"ratio": "torch", "ratio_compiled": "torch_compiled", "ratio_tuned_malloc": "torch_tuned_malloc"}
TRAIN_PEER_LABELS = {"ratio": "eager", "ratio_compiled": "compiled", "ratio_tuned_malloc": "eager, same malloc"}


def print_train_row(row: dict) -> None:
    j = row["jax"]
    if "error" in j:
        print(f"  train {row['shape']}: jaxgpt {j['error']}")
        return
    fpt = j["flops_per_token"]  # the same model on every side: 6N + attention (jaxgpt.metrics.flops_per_token)
    print(f"  train {row['shape']}: jaxgpt {j['tokens_per_s']:,.0f} tok/s ({j['tokens_per_s'] * fpt / 1e9:.0f} GFLOP/s), "
          f"peak RSS {j['peak_rss_mb']:,.0f} MB, first step after {j['time_to_first_step_s']:.1f}s, "
          f"loss@1 {j['first_loss']:.4f}")
    for side, label in (("torch", "torch eager"), ("torch_compiled", "torch.compile"),
                        ("torch_tuned_malloc", "torch eager with jaxgpt's malloc settings")):
        p = row.get(side)
        if p is None:
            continue
        if "error" in p:
            print(f"  train {row['shape']}: {label}: {p['error']}")
            continue
        line = f"  train {row['shape']}: {label} {p['tokens_per_s']:,.0f} tok/s -> jaxgpt {j['tokens_per_s'] / p['tokens_per_s']:.2f}x"
        if side == "torch_tuned_malloc":
            print(line + ("" if p.get("glibc_tunables") else " (the settings do not apply here)"))
            continue
        if p.get("compile"):
            line += f" | {compile_label(p['compile'])}"
        print(line + f" ({p['tokens_per_s'] * fpt / 1e9:.0f} GFLOP/s) | peak RSS {p['peak_rss_mb']:,.0f} MB | first "
              f"step after {p['time_to_first_step_s']:.1f}s | loss@1 {p['first_loss']:.4f}"
              + ("" if abs(j["first_loss"] - p["first_loss"]) <= 1e-3 else "  ** LOSSES DIFFER: not like for like **"))
    if len(row.get("rounds", [])) > 1:
        medians = [f"{TRAIN_PEER_LABELS[name]} {row[f'median_{name}']:.2f}x "
                   f"({', '.join(f'{r:.2f}' for r in row[f'{name}_per_round'])})"
                   for name in TRAIN_PEERS if row.get(f"median_{name}") is not None]
        print(f"  train {row['shape']}: median over {len(row['rounds'])} rounds, jaxgpt / torch: " + "; ".join(medians))
    w = row.get("jax_warm_cache", {})
    if "time_to_first_step_s" in w:
        print(f"  train {row['shape']}: jaxgpt first step after {w['time_to_first_step_s']:.1f}s with a warm "
              f"compilation cache")


def compile_label(info: dict) -> str:
    """Which torch.compile settings ran, and any that failed before them."""
    failed = "".join(f"; failed: {f['settings']} ({f['error'][:120]})" for f in info["failed"])
    return f"torch.compile {info['settings'] or 'defaults'}{failed}"


def _ratio(one: dict, side: str, ref: str, key: str) -> float | None:
    """``one[side][key] / one[ref][key]`` for one round, or None where a worker failed."""
    a, b = one.get(side, {}), one.get(ref, {})
    return a[key] / b[key] if key in a and key in b else None


def round_ratios(one: dict) -> str:
    ratios = {name: _ratio(one, "jax", ref, "tokens_per_s") for name, ref in TRAIN_PEERS.items()}
    return "jaxgpt / torch " + ", ".join(f"{TRAIN_PEER_LABELS[name]} " + (f"{r:.2f}x" if r else "error")
                                         for name, r in ratios.items())


def median_ratios(rounds: list[dict], side: str, refs: dict[str, str], key: str) -> dict:
    """For each ``name: ref`` of ``refs``, the per-round ratios of ``side``'s ``key`` over ``ref``'s
    (``{name}_per_round``) and their median (``median_{name}``)."""
    out = {}
    for name, ref in refs.items():
        ratios = [r for r in (_ratio(one, side, ref, key) for one in rounds) if r is not None]
        out[f"{name}_per_round"] = ratios
        out[f"median_{name}"] = statistics.median(ratios) if ratios else None
    return out


# The lora section's jaxgpt settings: the defaults, and the least memory on a CPU (blocks scanned and
# recomputed whole: XLA:CPU drops remat's barriers in unrolled blocks, so only the scan saves memory).
LEAN = {"scan_layers": True, "remat": "full"}


def section_lora(work: Path, quick: bool, steps: int, warmup: int, rank: int = 16) -> dict:
    """LoRA (rank 16, alpha 32, every projection) in jaxgpt vs jaxgpt's full fine-tuning vs PEFT + PyTorch
    (eager), GPT-2 124M, float32, 4x256: tokens/s, peak RSS and optimizer-state bytes, each in its own
    process; jaxgpt's sides also at the LEAN settings."""
    arch = TINY if quick else GPT2_124M
    folder = write_init_model(work / ("init-tiny" if quick else "init-124m"), arch, chat=False)
    args = {"model": str(folder), "batch": 4, "seq": 64 if quick else 256, "steps": steps, "warmup": warmup,
            "segments": False}
    lora = {**args, "lora_rank": rank}
    sides = {"jax_lora": ("train_jax", lora), "jax_full": ("train_jax", args), "peft": ("train_torch", lora),
             "jax_lora_lean": ("train_jax", {**lora, **LEAN}), "jax_full_lean": ("train_jax", {**args, **LEAN})}
    res = {name: run_cpu_worker(worker, a) for name, (worker, a) in sides.items()}
    res["rank"] = rank
    failed = [name for name in sides if "error" in res[name]]
    if failed:
        print("  lora: failed: " + "; ".join(f"{n}: {res[n]['error']}" for n in failed))
        return res
    for name in sides:
        r = res[name]
        print(f"  lora {name:13s} {r['tokens_per_s']:8,.0f} tok/s  peak RSS {r['peak_rss_mb']:7,.0f} MB  "
              f"optimizer state {r['opt_state_bytes'] / 2**20:8.1f} MiB  trainable {r['trainable_params']:,}")
    res["tokens_per_s_vs_peft"] = res["jax_lora"]["tokens_per_s"] / res["peft"]["tokens_per_s"]
    res["lean_tokens_per_s_vs_peft"] = res["jax_lora_lean"]["tokens_per_s"] / res["peft"]["tokens_per_s"]
    res["rss_vs_full"] = res["jax_lora"]["peak_rss_mb"] / res["jax_full"]["peak_rss_mb"]
    res["lean_rss_vs_full"] = res["jax_lora_lean"]["peak_rss_mb"] / res["jax_full"]["peak_rss_mb"]
    res["lean_rss_vs_full_lean"] = res["jax_lora_lean"]["peak_rss_mb"] / res["jax_full_lean"]["peak_rss_mb"]
    print(f"  lora: jaxgpt LoRA = {res['tokens_per_s_vs_peft']:.2f}x PEFT's tokens/s ({res['lean_tokens_per_s_vs_peft']:.2f}x "
          f"lean), peak RSS {res['rss_vs_full']:.2f}x jaxgpt full fine-tuning's ({res['lean_rss_vs_full']:.2f}x lean; "
          f"{res['lean_rss_vs_full_lean']:.2f}x with both lean)")
    return res


def section_finetune(work: Path, quick: bool, threads: int, seq: int, batch: int, rounds: int = 1) -> dict:
    if not OASST.exists():
        return {"error": f"skipped: {OASST} not found (the ../shared checkout)"}
    arch = TINY if quick else GPT2_124M
    folder = write_init_model(work / ("init-tiny-chat" if quick else "init-124m-chat"), arch, chat=True)
    data = work / f"oasst_{threads}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_threads(str(OASST), threads)))
    common = {"model": str(folder), "data": str(data), "threads": threads, "seq": seq, "batch": batch, "lr": 2e-5}
    res = {"threads": threads, "seq": seq, "batch": batch,
           "jaxgpt": run_cpu_worker("finetune_jax", {**common, "out": str(work / "ft-jax")}),  # remat auto: minimal on a CPU
           # (not in --quick: a third jaxgpt run of the same epoch)
           "jaxgpt_no_remat": ({"error": "skipped in --quick"} if quick else
                               run_cpu_worker("finetune_jax", {**common, "remat": "none", "out": str(work / "ft-jax-none")})),
           # TRL checkpoints gradients by default: this run makes the memory comparison like for like
           "jaxgpt_full_remat": run_cpu_worker("finetune_jax", {**common, "remat": "full", "out": str(work / "ft-jax-full")}),
           "trl_defaults": run_cpu_worker("finetune_trl", {**common, "packing": False, "out": str(work / "ft-trl")}),
           "trl_packing": run_cpu_worker("finetune_trl", {**common, "packing": True, "out": str(work / "ft-trl-pack")})}
    for jname, name in (("jaxgpt", "trl_defaults"), ("jaxgpt", "trl_packing"), ("jaxgpt_no_remat", "trl_defaults"),
                        ("jaxgpt_full_remat", "trl_defaults")):
        j, t = res[jname], res[name]
        if "error" in j or "error" in t:
            print(f"  finetune {jname} vs {name}: jax {j.get('error', 'ok')} | trl {t.get('error', 'ok')}")
            continue
        print(f"  finetune epoch ({threads} threads, seq {seq}): {jname} {j['train_wall_s']:.0f}s vs {name} "
              f"{t['train_wall_s']:.0f}s -> {j['train_wall_s'] / t['train_wall_s']:.2f}x time | peak RSS "
              f"{j['peak_rss_mb']:,.0f} vs {t['peak_rss_mb']:,.0f} MB | trained tokens {j['trained_tokens']:,} vs "
              f"{t['trained_tokens']:,} | final loss {j['final_loss']:.3f} vs {t['final_loss']:.3f} | steps "
              f"{j['steps']} vs {t['steps']}")
    # More rounds of the target's pair (jaxgpt's defaults, TRL's defaults), alternating; round 1 is the run above.
    res["rounds"] = [{"jaxgpt": res["jaxgpt"], "trl_defaults": res["trl_defaults"]}]
    for i in range(1, rounds):
        res["rounds"].append({"jaxgpt": run_cpu_worker("finetune_jax", {**common, "out": str(work / "ft-jax")}),
                              "trl_defaults": run_cpu_worker("finetune_trl", {**common, "packing": False,
                                                                              "out": str(work / "ft-trl")})})
    res.update(median_ratios(res["rounds"], "jaxgpt", {"time_ratio": "trl_defaults"}, "train_wall_s"))
    ratios = res["time_ratio_per_round"]
    if rounds > 1 and ratios:
        walls = ", ".join(f"{r['jaxgpt'].get('train_wall_s', float('nan')):.0f}s / "
                          f"{r['trl_defaults'].get('train_wall_s', float('nan')):.0f}s" for r in res["rounds"])
        print(f"  finetune epoch, jaxgpt / TRL defaults over {rounds} rounds ({walls}): "
              f"median {res['median_time_ratio']:.2f}x time ({', '.join(f'{r:.2f}' for r in ratios)})")
    return res


def section_dpo(work: Path, quick: bool, n_pairs: int, seq: int) -> dict:
    trees = OASST.parent / "oasst_en100_trees.jsonl"
    if not trees.exists():
        return {"error": f"skipped: {trees} not found (the ../shared checkout)"}
    oasst = _tool("oasst_pairs")
    pairs = [p for line in trees.read_text().splitlines() if line.strip()
             for p in oasst.pairs_of(json.loads(line))][:n_pairs]
    data = work / f"oasst_pairs_{n_pairs}.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    folder = write_init_model(work / ("init-tiny-chat" if quick else "init-124m-chat"), TINY if quick else GPT2_124M,
                              chat=True)
    common = {"model": str(folder), "data": str(data), "seq": seq, "lr": 1e-6}  # DPOConfig's default lr
    res = {"pairs": len(pairs), "seq": seq,
           "jaxgpt_packed": run_cpu_worker("dpo_jax", {**common, "pack": True, "batch": 4, "out": str(work / "dpo-jax")}),
           "jaxgpt_padded": run_cpu_worker("dpo_jax", {**common, "pack": False, "batch": 8,
                                                        "out": str(work / "dpo-jax-pad")}),
           "trl_defaults": run_cpu_worker("dpo_trl", {**common, "batch": 8, "out": str(work / "dpo-trl")})}
    t = res["trl_defaults"]
    for name in ("jaxgpt_packed", "jaxgpt_padded"):
        j = res[name]
        if "error" in j or "error" in t:
            print(f"  dpo {name} vs TRL: jax {j.get('error', 'ok')} | trl {t.get('error', 'ok')}")
            continue
        res[f"{name}_time_ratio"] = j["train_wall_s"] / t["train_wall_s"]
        print(f"  dpo epoch ({len(pairs)} pairs, seq {seq}): {name} {j['train_wall_s']:.0f}s vs TRL defaults "
              f"{t['train_wall_s']:.0f}s -> {res[f'{name}_time_ratio']:.2f}x time | peak RSS {j['peak_rss_mb']:,.0f} vs "
              f"{t['peak_rss_mb']:,.0f} MB | pairs {j['pairs']} vs {t['pairs']} | steps {j['steps']} vs {t['steps']}")
    return res


def _tool(name: str):
    """tools/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def section_generate(work: Path, quick: bool) -> dict:
    """tools/bench_generate.py (the sampling module's benchmark), run as a library."""
    mod = _tool("bench_generate")
    # --quick: w8a8 only, with its PyTorch peer (each layout adds processes; tests cover the others' paths)
    return mod.run(work, quick=quick, decoding_dtypes=("w8a8",) if quick else ("bfloat16", "int8", "w8a8"),
                   **({"new_tokens": 32, "repeats": 2} if quick else {}))


def section_serve(work: Path, quick: bool) -> dict:
    """tools/bench_serve.py: jaxgpt.serve vs transformers serve --continuous-batching, run as a library."""
    return _tool("bench_serve").run(work, quick=quick, **({"levels": (1, 8), "requests": 8} if quick else {}))


# jaxgpt settings the --gpu run tries, one process each: (label, worker settings)
GPU_VARIANTS = [
    ("einsum attention, blocks scanned", dict(attention="einsum", scan_layers=True, loss_chunks=1)),
    ("cudnn attention, blocks scanned", dict(attention="cudnn", scan_layers=True, loss_chunks=1)),
    ("cudnn attention, vocab padded to 128, blocks scanned",
     dict(attention="cudnn", vocab_multiple=128, scan_layers=True, loss_chunks=1)),
    ("cudnn attention, vocab padded to 128, blocks scanned, no packing mask",
     dict(attention="cudnn", vocab_multiple=128, scan_layers=True, loss_chunks=1, segments=False)),
    ("cudnn attention, vocab padded to 128, blocks unrolled, loss in one piece",
     dict(attention="cudnn", vocab_multiple=128, scan_layers=False, loss_chunks=1)),
    # model.loss_chunks: null (the default) is 8 on a GPU.
    ("the GPU defaults: cudnn attention, vocab padded to 128, blocks unrolled, loss in 8 sequence chunks, Pallas kernels",
     dict(attention="cudnn", vocab_multiple=128, scan_layers=False)),
    # Not run on a GPU yet: the CPU's default (faster and smaller there); on a GPU it recomputes GELU / LayerNorm.
    ("the GPU defaults, model.remat: minimal", dict(attention="cudnn", vocab_multiple=128, scan_layers=False, remat="minimal")),
    ("cudnn attention, blocks unrolled, vocab not padded, loss in one piece",
     dict(attention="cudnn", scan_layers=False, loss_chunks=1)),
    # Batches without packing segment ids: causal attention only, no mask bias (as the PyTorch side).
    ("the GPU defaults, no packing mask", dict(attention="cudnn", vocab_multiple=128, scan_layers=False, segments=False)),
    # model.kernels: auto (the default) is jaxgpt.kernels' Pallas kernels on a GPU; these are XLA's fusions.
    ("the GPU defaults, model.kernels: xla", dict(attention="cudnn", vocab_multiple=128, scan_layers=False, kernels="xla")),
    ("the GPU defaults, model.kernels: xla, no packing mask",
     dict(attention="cudnn", vocab_multiple=128, scan_layers=False, kernels="xla", segments=False)),
    # Like for like with the PyTorch side: 50257 rows, no packing mask (jaxgpt's own chunked loss kept).
    ("the GPU defaults, vocab not padded, no packing mask", dict(attention="cudnn", scan_layers=False, segments=False)),
    # jaxgpt.flash: the packing mask from the segment ids, tile by tile, instead of cuDNN's [B, 1, T, T] bias.
    ("the GPU defaults, flash attention", dict(attention="flash", vocab_multiple=128, scan_layers=False)),
    ("the GPU defaults, flash attention, no packing mask",
     dict(attention="flash", vocab_multiple=128, scan_layers=False, segments=False)),
]


# The variants a plain --gpu run measures: jaxgpt's defaults on packed SFT rows (the packing
# mask) and on causal rows, as the PyTorch sides train, and packed rows with flash attention
# (which of the two attentions model.attention: auto picks there). --gpu-variants all: every variant.
GPU_HEADLINE = ("the GPU defaults: cudnn attention, vocab padded to 128, blocks unrolled, loss in 8 sequence chunks, "
                "Pallas kernels", "the GPU defaults, no packing mask", "the GPU defaults, flash attention")
# The PyTorch sides of the GPU section (--gpu-torch): label and worker settings.
GPU_TORCH = {"compiled": ("torch.compile + fused AdamW + bf16 autocast", {"compile": True}),
             "eager": ("torch eager + bf16 autocast", {})}


def loss_at(r: dict, step: int) -> float:
    """The loss of training step ``step`` (1-based), or nan where the run was shorter."""
    losses = r.get("losses", [])
    return losses[step - 1] if len(losses) >= step else float("nan")


def format_gpu_step(r: dict) -> str:
    """One GPU train worker's result in a line (and its profile's summary, if it has one)."""
    nan = float("nan")
    line = (f"{r['tokens_per_s_pipelined']:,.0f} tok/s, MFU {100 * r.get('mfu_pipelined', nan):.1f}%, step "
            f"{r['step_s_pipelined'] * 1e3:.1f} ms as jaxgpt.train runs")
    if "step_s_no_readback" in r:
        line += f" (nothing read back: {r['step_s_no_readback'] * 1e3:.1f} ms)"
    line += (f"; waiting for each step: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r.get('mfu', nan):.1f}%, "
             f"{r['step_s'] * 1e3:.1f} ms; first step after {r['time_to_first_step_s']:.0f} s, peak device memory "
             f"{r.get('peak_device_mb') or nan:,.0f} MiB, loss at step 1 {loss_at(r, 1):.4f}, step 10 {loss_at(r, 10):.4f}")
    if r.get("dry_run"):
        line += f" [dry run: {r['dry_run']}]"
    if "profile" in r:
        from trace_summary import format_summary

        line += "\n" + format_summary(r["profile"])
    return line


def run_gpu(args, work: Path) -> dict:
    """GPT-2 124M at seq 1024 in bfloat16 (float32 master weights) on one accelerator: each chosen
    jaxgpt variant, then each PyTorch side with bf16 autocast, the same weights and batches.
    --quick: the tiny model at seq 128 (on a CPU, a dry run of this path: cuDNN's attention runs as XLA's,
    the flash kernel in Pallas' interpreter)."""
    import jax

    from jaxgpt.model import GPT2Config
    from jaxgpt.metrics import flops_per_token

    # This process only writes the initial weights: on the GPU, jax would take 75% of its memory
    # for the whole run and leave the measured processes the rest.
    jax.config.update("jax_platforms", "cpu")
    arch, seq = (TINY, 128) if args.quick else (GPT2_124M, 1024)
    folder = write_init_model(work / ("init-tiny" if args.quick else "init-124m"), arch, chat=False)
    common = {"model": str(folder), "batch": args.batch, "seq": seq, "steps": args.steps or 10,
              "warmup": max(args.warmup, 2), "dtype": "bfloat16", "pipelined": True}
    res = {"batch": args.batch, "seq": seq, "peak_flops": args.peak_flops, "jaxgpt": {}, "torch": {}}

    def save():
        if args.out:  # after every run: a killed benchmark keeps what it measured
            args.out.write_text(json.dumps({"gpu": res}, indent=2) + "\n")

    if args.gpu_variants == "all":
        chosen = GPU_VARIANTS
    elif args.gpu_variants:
        chosen = [GPU_VARIANTS[int(i)] for i in args.gpu_variants.split(",")]
    else:
        chosen = [v for v in GPU_VARIANTS if v[0] in GPU_HEADLINE]
    for n, (label, settings) in enumerate(chosen):
        extra = {"profile_dir": str(args.profile / f"variant{n}")} if args.profile else {}
        r = run_worker("train_jax", {**common, **settings, **extra, "peak_flops": args.peak_flops},
                       timeout=args.worker_timeout)
        res["jaxgpt"][label] = r
        save()
        if "error" in r:
            print(f"  gpu jaxgpt ({label}): {r['error']}", flush=True)
            continue
        print(f"  gpu {r['device_kind']} jaxgpt ({label}), batch {args.batch} x {seq}: {format_gpu_step(r)}", flush=True)
    for side in [s.strip() for s in args.gpu_torch.split(",") if s.strip()]:
        label, settings = GPU_TORCH[side]
        t = res["torch"][label] = run_worker("train_torch", {**common, **settings}, timeout=args.worker_timeout)
        save()
        if "error" in t:
            print(f"  gpu {label}: {t['error']}", flush=True)
            continue
        # MFU as jaxgpt's: the same model's training FLOPs per token (6N + attention)
        fpt = flops_per_token(GPT2Config(**arch), t["n_params"], seq)
        t.update(flops_per_token=fpt, mfu=t["tokens_per_s"] * fpt / args.peak_flops,
                 mfu_pipelined=t["tokens_per_s_pipelined"] * fpt / args.peak_flops)
        save()
        compiled = f" ({compile_label(t['compile'])})" if t.get("compile") else ""
        print(f"  gpu {t.get('device_kind', '')} {label}{compiled}, batch {args.batch} x {seq}: {format_gpu_step(t)}",
              flush=True)
    for label, r in res["jaxgpt"].items():
        for tlabel, t in res["torch"].items():
            if "error" not in r and "error" not in t:
                print(f"  jaxgpt ({label}) / {tlabel}: {r['tokens_per_s_pipelined'] / t['tokens_per_s_pipelined']:.2f}x "
                      f"(waiting for each step: {r['tokens_per_s'] / t['tokens_per_s']:.2f}x); loss at step 1 "
                      f"{loss_at(r, 1):.4f} vs {loss_at(t, 1):.4f}, step 10 {loss_at(r, 10):.4f} vs {loss_at(t, 10):.4f}",
                      flush=True)
    return res


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke of every section")
    p.add_argument("--gpu", action="store_true", help="GPU: GPT-2 124M, seq 1024, bf16 tokens/s and MFU")
    p.add_argument("--sections", default="train,finetune,generate")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 5); tokens/s from the median step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one compiles)")
    p.add_argument("--rounds", type=int, default=1,
                   help="train, finetune: run the sides N times, alternating, and report the median ratio (a "
                        "shared machine's speed drifts by 10-20%% over minutes); finetune repeats jaxgpt's and "
                        "TRL's defaults only")
    p.add_argument("--threads", type=int, default=None,
                   help="oasst threads for the fine-tuning epoch, pairs for the dpo epoch (64; quick 8)")
    p.add_argument("--batch", type=int, default=None, help="batch rows: fine-tuning (8) / --gpu (32)")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK, help="--gpu: peak FLOP/s for MFU")
    p.add_argument("--gpu-variants", default=None,
                   help="--gpu: which jaxgpt variants, as indices into GPU_VARIANTS, or all (default: GPU_HEADLINE, "
                        "jaxgpt's defaults on packed and on causal rows)")
    p.add_argument("--gpu-torch", default="compiled,eager", help="--gpu: which PyTorch sides (compiled, eager)")
    p.add_argument("--worker-timeout", type=float, default=None, help="--gpu: seconds one run may take")
    p.add_argument("--profile", type=Path, default=None,
                   help="--gpu: trace two more steps of each jaxgpt variant into this folder and print where "
                        "the device time goes (tools/trace_summary.py)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = WORKERS[args.worker](json.loads(args.worker_args))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the first step compiles, and is never timed")
    unknown = sorted({s.strip() for s in args.gpu_torch.split(",") if s.strip()} - set(GPU_TORCH))
    if unknown:
        p.error(f"--gpu-torch: unknown {', '.join(unknown)} (choose from {', '.join(GPU_TORCH)})")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"train", "finetune", "dpo", "generate", "serve", "lora"})
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)} (choose from train, finetune, dpo, generate, serve, lora)")
    steps = args.steps or 5
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="jaxgpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "quick": args.quick, "steps": steps, "warmup": args.warmup}
    t0 = time.time()
    print(f"jaxgpt bench ({'quick' if args.quick else 'full'}) on {results['machine']['cpu']} "
          f"({results['machine']['cores']} cores); scratch {work}")
    if args.gpu:
        args.batch = args.batch or 32  # as jaxgpt/configs/gpt2-chat.yaml
        results["gpu"] = run_gpu(args, work)
        sections = []  # the GPU run writes --out as it goes; the whole record follows below
    runs = {"train": lambda: section_train(work, args.quick, steps, args.warmup, args.rounds),
            "finetune": lambda: section_finetune(work, args.quick, args.threads or (8 if args.quick else 64),
                                                 seq=128 if args.quick else 512, batch=args.batch or 8,
                                                 rounds=args.rounds),
            "dpo": lambda: section_dpo(work, args.quick, args.threads or (8 if args.quick else 64),
                                       seq=128 if args.quick else 512),
            "generate": lambda: section_generate(work, args.quick),
            "lora": lambda: section_lora(work, args.quick, steps, args.warmup),
            "serve": lambda: section_serve(work, args.quick)}
    for name in sections:
        try:
            results[name] = runs[name]()
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: failed: {results[name]['error']}")
        if args.out:  # after every section: a later failure or Ctrl-C keeps what was measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["wall_s"] = time.time() - t0
    print(f"done in {results['wall_s']:.0f}s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results -> {args.out}")
    return 0


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import platform

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
