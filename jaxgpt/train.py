"""Train GPT-2 (SFT or from scratch): ``python -m jaxgpt.train --config gpt2-chat key=value ...``.

Reads top to bottom like the run it performs:

  config -> (multi-host init) -> mesh -> tokenizer -> model, created or loaded
  directly into its shards -> optax AdamW -> data -> resume from the latest
  checkpoint -> loop { jitted train step, logs, eval, checkpoint } -> plots.

The hot path is one ``jax.jit``-compiled function over plain pytrees
(``nnx.split`` state, not ``nnx.jit``) with the train state donated. The loss is
the float32 mean cross-entropy over trained tokens (``loss_mask``); gradient
accumulation sums token losses over micro-batches and divides once, so it
equals one large batch exactly. A step whose loss or gradient is not finite is
not applied; ``train.max_nonfinite`` of them in a row stop the run.

The library entry point is ``train(cfg) -> TrainResult``; ``main(argv)`` is the CLI.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":  # the CLI on a CPU host restarts once, before jax loads, with malloc settings
    from jaxgpt.host_memory import reexec_with_cpu_malloc  # that make XLA:CPU's steps ~10% faster

    reexec_with_cpu_malloc()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import compile_cache, host_memory, kernels, sharding
from jaxgpt.backend import Policy
from jaxgpt.config import Config, ConfigError, help_text, load_config, shipped_configs, validate
from jaxgpt.loss import chunked_cross_entropy
from jaxgpt.model import SETTINGS, GPT2, GPT2Config, abstract_model, num_params

log = logging.getLogger("jaxgpt.train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps); the message says why."""


# ----------------------------------------------------------------------------- multi-host

def init_distributed(dc) -> None:
    """``jax.distributed.initialize`` when configured (config, else JAX_* environment)."""
    address = dc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = dc.num_processes if dc.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = dc.process_id if dc.process_id is not None else _env_int("JAX_PROCESS_ID")
    enabled = dc.enabled if dc.enabled is not None else address is not None
    if dc.cpu_devices_per_process:
        jax.config.update("jax_num_cpu_devices", dc.cpu_devices_per_process)
    if not enabled:
        return
    from jax._src import distributed as _dist  # noqa: PLC0415 - only to make a second call a no-op

    if _dist.global_state.client is not None:
        return
    # On TPU pods (and SLURM / Open MPI) all three may be None: JAX detects them.
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   initialization_timeout=dc.initialization_timeout)
    except ValueError as e:
        if address is not None or "coordinator_address" not in str(e):
            raise
        raise ConfigError(f"distributed.enabled=true, but JAX found no cluster to join ({e}): only TPU pods, SLURM "
                          "and Open MPI are detected; elsewhere give distributed.coordinator_address, num_processes "
                          "and process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


# ----------------------------------------------------------------------------- optimizer

def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to ``min_lr_ratio * lr``, or constant."""
    s, lr = cfg.schedule, cfg.optimizer.lr
    total = s.decay_steps or cfg.train.steps
    # A warmup longer than the run keeps its slope (lr * step / warmup_steps) and the run ends
    # before the peak, as in transformers; it is not squeezed into the run.
    warmup = s.warmup_steps
    end = lr * s.min_lr_ratio
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end_value=end)
    decay = max(total - warmup, 1)
    after = (optax.linear_schedule(lr, end, decay) if s.name == "linear" else optax.constant_schedule(lr))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _map_with_path(fn, state: nnx.State) -> nnx.State:
    flat = [(path, var.replace(fn(path, var))) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def make_optimizer(cfg: Config, params: nnx.State) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optimizer
    schedule = make_schedule(cfg)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=_map_with_path(lambda p, v: _decays(p, v, o.decay_embeddings), params)))
    return optax.chain(*parts), schedule


def _decays(path, var, decay_embeddings: bool) -> bool:
    name = str(path[-1])
    if name in ("wte", "wpe"):
        return decay_embeddings
    return len(var.shape) >= 2 and not name.endswith("bias")


def applied_steps(opt_state) -> jax.Array:
    """The schedule's step counter (optimizer updates actually applied)."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)):
        if isinstance(leaf, optax.ScaleByScheduleState):
            return leaf.count
    raise ValueError("optimizer state has no schedule counter")


# ----------------------------------------------------------------------------- the step

def loss_terms(graphdef, params, rest, batch, *, mesh=None, train: bool = True, rng=None):
    """(sum of float32 token losses over trained tokens, number of trained tokens)."""
    with kernels.on_mesh(mesh):  # model.kernels' Pallas kernels run on each device's shard
        return _loss_terms(graphdef, params, rest, batch, mesh, train, rng)


def _loss_terms(graphdef, params, rest, batch, mesh, train, rng):
    # Fresh non-parameter Variables in this trace (nnx.remat / Dropout update them in place).
    rest = reseeded(rest, rng)
    model = nnx.merge(graphdef, params, rest)
    if not train:
        model.eval()
    constrain = None if mesh is None else (lambda x, *axes: sharding.constrain(x, mesh, *axes))
    # segment_ids (packing) are optional: without them attention is causal only.
    inputs = dict(positions=batch["positions"], segment_ids=batch.get("segment_ids"), constrain=constrain)
    mask = batch["loss_mask"].astype(jnp.float32)
    chunks = model.policy.loss_chunks_for(batch["input_ids"].shape[1])
    if chunks > 1:  # the head one sequence chunk at a time (config.validate: seq_len divides by it)
        h = model.hidden(batch["input_ids"], **inputs)
        ce_sum = chunked_cross_entropy(h, model.wte[...].astype(h.dtype), batch["targets"], mask,
                                       model.config.vocab_size, chunks, model.policy.logsumexp)
        return ce_sum, jnp.sum(mask)
    logits = model(batch["input_ids"], **inputs)
    if mesh is not None:  # the largest activation: keep it split on batch and vocab
        logits = sharding.constrain(logits, mesh, "batch", "seq", "vocab")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(ce * mask), jnp.sum(mask)


def reseeded(rest: nnx.State, key=None) -> nnx.State:
    """A copy of the non-parameter state as fresh Variables of the current trace (not
    ``.replace``, which keeps the old trace), so Dropout / nnx.remat may update them.

    With ``key``, the dropout RNG streams restart from it: one stream per module path, so
    each layer draws its own masks and a step's masks depend only on (seed, step, micro-batch).
    """
    flat = []
    for path, var in nnx.to_flat_state(rest):
        if key is None:
            value = var.get_value()
        elif isinstance(var, nnx.RngKey):
            value = jax.random.fold_in(key, sharding.path_seed(path))
        elif isinstance(var, nnx.RngCount):
            value = jnp.zeros(var.shape, var.dtype)
        else:
            value = var.get_value()
        flat.append((path, type(var)(value, **var.get_metadata())))
    return nnx.from_flat_state(flat)


def make_train_step(graphdef, rest, tx, *, mesh=None, dropout: bool = False,
                    state_shardings=None) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)``, jitted, ``state`` donated.

    state = {"params", "opt_state"}; batch arrays are [grad_accum, micro_batch, T].
    """

    def step(state, batch, rng):
        params, opt_state = state["params"], state["opt_state"]
        grad_fn = jax.value_and_grad(
            lambda p, mb, k: loss_terms(graphdef, p, rest, mb, mesh=mesh, rng=k), has_aux=True)

        def micro(carry, xs):
            g_sum, l_sum, n_sum = carry
            mb, i = xs
            k = jax.random.fold_in(jax.random.wrap_key_data(rng), i) if dropout else None
            (l, n), g = grad_fn(params, mb, k)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        n_micro = batch["input_ids"].shape[0]
        if n_micro == 1:  # no accumulation loop for one micro-batch (XLA folds the zero accumulator away)
            first = jax.tree.map(lambda a: a[0], batch)
            (g_sum, l_sum, n_sum), _ = micro((zeros, jnp.float32(0), jnp.float32(0)), (first, 0))
        else:
            (g_sum, l_sum, n_sum), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                                    (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(n_sum, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        loss = l_sum / denom
        grad_norm = optax.tree.norm(grads)
        grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr_step = applied_steps(opt_state)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # Finite gradients can still give non-finite parameters (an infinite or huge learning rate):
        # the new parameters are checked too, a reduction XLA fuses with the update (on a mesh, each
        # shard's, then one all-reduce of a flag), read back with the other metrics.
        params_ok = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
        ok = grads_ok & params_ok
        # A non-finite step changes nothing (not even the optimizer's counters).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, opt_state)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "params_ok": params_ok, "trained_tokens": n_sum,
                   "lr_step": lr_step}
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def make_eval_step(graphdef, rest, *, mesh=None) -> Callable:
    """``eval_step(params, batch) -> (sum loss, tokens)`` for one [B, T] batch, dropout off."""

    def eval_step(params, batch):
        return loss_terms(graphdef, params, rest, batch, mesh=mesh, train=False)

    return jax.jit(eval_step)


# ----------------------------------------------------------------------------- model + tokenizer

def load_tokenizer_for(cfg: Config):
    """The tokenizer named by the config (the data adds its chat template later)."""
    from jaxgpt.tokenizer import has_tokenizer, load_tokenizer
    from jaxgpt.weights import is_local_path, missing_folder

    for key in ("name_or_path", "tokenizer"):  # a mistyped folder: one line naming the key, before any hub lookup
        value = getattr(cfg.model, key)
        if value is not None and is_local_path(str(value)) and not Path(value).expanduser().exists():
            raise ConfigError(f"model.{key}={missing_folder(str(value))}")
    name = cfg.model.tokenizer
    if name is None and cfg.model.name_or_path:
        from jaxgpt.weights import WeightsError, resolve

        try:  # the model's folder (downloaded for a hub id): its tokenizer, if it has one
            folder = resolve(cfg.model.name_or_path)
        except WeightsError as e:
            raise ConfigError(f"model.name_or_path={e}") from None
        if has_tokenizer(folder):
            name = str(folder)
    return load_tokenizer(name)


def model_config(cfg: Config, vocab_size: int) -> GPT2Config:
    """The architecture to train (from the HF config.json, or the from-scratch keys), before any weights."""
    m = cfg.model
    numerics = {k: getattr(m, k) for k in SETTINGS}
    if m.name_or_path is None:
        try:
            return GPT2Config(vocab_size=m.vocab_size or vocab_size, n_positions=m.n_positions, n_embd=m.n_embd,
                              n_layer=m.n_layer, n_head=m.n_head, **numerics)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    from jaxgpt import weights

    defaults = {f.name: f.default for f in dataclasses.fields(m)}
    ignored = [f"model.{k}={getattr(m, k)!r}" for k in FROM_SCRATCH_KEYS if getattr(m, k) != defaults[k]]
    if ignored:
        log.warning("%s ignored: fine-tuning %s keeps its own architecture and weights", ", ".join(ignored),
                    m.name_or_path)
    return weights.config_from_hf(weights.resolve(m.name_or_path) / "config.json", **numerics)


FROM_SCRATCH_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "init_seed")


def build_model(cfg: Config, vocab_size: int, mesh, gcfg: GPT2Config | None = None
                ) -> tuple[Any, nnx.State, nnx.State, GPT2Config]:
    """(graphdef, params, rest, model config) with every parameter created or loaded in its shards.

    The embedding grows to ``vocab_size`` (the tokenizer, incl. added chat tokens);
    the returned config records the new size. ``gcfg``: ``model_config(cfg, ...)`` if already read.
    """
    m = cfg.model
    gcfg = gcfg or model_config(cfg, vocab_size)
    if m.name_or_path is None:
        if m.vocab_size is None and vocab_size:  # from scratch: the tokenizer's final size, chat tokens included
            gcfg = gcfg.replace(vocab_size=vocab_size)
        graphdef, params, rest = sharding.init_sharded(lambda: GPT2(gcfg, rngs=nnx.Rngs(m.init_seed)), mesh)
    else:
        from jaxgpt import weights

        tensors, source = weights.read_hf_tensors(weights.resolve(m.name_or_path))
        if vocab_size > gcfg.vocab_size:  # added chat tokens: grown on the host, before the model is built
            tensors, gcfg = weights.grow_vocab(gcfg, tensors, vocab_size, str(source))
        graphdef, abstract, rest = abstract_model(gcfg, m.init_seed)
        # The non-parameter state (dropout RNG streams): one replicated array on the whole mesh.
        rest = sharding.from_host(rest, sharding.replicated(mesh))
        params = weights.params_from_hf(gcfg, tensors, abstract, source=str(source),
                                        place=sharding.make_place(abstract, mesh))
    if vocab_size > gcfg.vocab_size:
        from jaxgpt.weights import resize_token_embeddings

        model = resize_token_embeddings(nnx.merge(graphdef, params, rest), vocab_size)
        gcfg = model.config
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = sharding.param_shardings(jax.tree.map(lambda x: x, params), mesh)
    params = jax.device_put(params, shardings)  # a no-op unless the vocab resize moved wte
    return graphdef, params, rest, gcfg


# ----------------------------------------------------------------------------- data

def make_data(cfg: Config, tokenizer, mesh):
    """(train iterator, held-out dataset or None); gives ``tokenizer`` the data's chat template."""
    from jaxgpt.data import DataIterator, build_datasets

    train_set, eval_set = build_datasets(cfg.data, tokenizer)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    pi, pc = jax.process_index(), jax.process_count()
    # The iterator gives process p the p-th contiguous block of rows: the mesh must agree.
    rows = sharding.process_batch_rows(mesh, micro)
    if rows != (pi * micro // pc, (pi + 1) * micro // pc):
        raise ConfigError(f"mesh {dict(mesh.shape)}: process {pi} holds batch rows {rows}, not its contiguous "
                          f"share; put 'tensor' within a host")
    it = DataIterator(train_set, micro, process_index=pi, process_count=pc, seed=cfg.data.seed,
                      shuffle=cfg.data.shuffle)
    return it, eval_set


# ----------------------------------------------------------------------------- metrics

PEAK_BF16_FLOPS = {  # per chip, dense bf16
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def peak_flops(cfg: Config) -> float | None:
    if cfg.logging.peak_flops_per_device:
        return cfg.logging.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None  # CPUs: no meaningful peak


def flops_per_token(gcfg: GPT2Config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (PaLM appendix B)."""
    n = n_params - gcfg.n_positions * gcfg.n_embd  # position embeddings do no matmuls
    return 6 * n + 12 * gcfg.n_layer * gcfg.n_embd * seq_len


def _summary_writer():
    """tensorboardX's ``SummaryWriter``, imported with torch hidden unless torch is loaded already.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors: 1.15-1.33 s
    and ~180 MB of every run's start-up. jaxgpt logs floats.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # meanwhile `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:  # a dependency of jaxgpt, but an image may lack it
        raise ConfigError(f"logging.tensorboard=true needs tensorboardX ({e}): pip install tensorboardX, "
                          "or set logging.tensorboard=false") from None
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl + TensorBoard + the progress bar, on process 0 only."""

    def __init__(self, cfg: Config, out: Path, start_step: int):
        self.cfg, self.out = cfg, out
        self.main = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            self.tb = _summary_writer()(str(out / "tensorboard"))
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict, line: str | None = None):
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        if line:
            self.print(line)

    def text(self, tag: str, text: str, step: int):
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def print(self, text: str):
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def progress(self, n: int, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def logged_losses(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss, eval loss) by step from ``out/metrics.jsonl``, every run of it (a step a resume
    logged again keeps its last value)."""
    losses, evals = {}, {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "loss" in r:
            losses[r["step"]] = r["loss"]
        if "eval_loss" in r:
            evals[r["step"]] = r["eval_loss"]
    return dict(sorted(losses.items())), dict(sorted(evals.items()))


def plot_losses(out: Path, losses: dict[int, float], evals: dict[int, float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(losses), list(losses.values()), label="train", lw=1)
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    graphdef: Any
    params: nnx.State
    rest: nnx.State
    model_config: GPT2Config
    tokenizer: Any
    step: int  # optimizer steps done (incl. skipped non-finite ones)
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss (this process's run)
    evals: dict[int, dict] = field(default_factory=dict)  # step -> {"eval_loss", "eval_ppl"}
    skipped: list[int] = field(default_factory=list)  # steps whose update was not applied
    preempted: bool = False  # stopped early by SIGTERM or Ctrl-C, after saving
    interrupted: bool = False  # ... by Ctrl-C
    output_dir: Path | None = None

    @property
    def model(self) -> GPT2:
        return nnx.merge(self.graphdef, self.params, self.rest)


def run_config(cfg: Config, gcfg: GPT2Config) -> dict:
    """The saved config: the run's sections plus the final GPT2Config (after any vocab resize)."""
    return {**cfg.to_dict(), "model_config": dataclasses.asdict(gcfg)}


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    cache_dir = compile_cache.enable()  # before anything compiles: a rerun loads the compiled step
    init_distributed(cfg.distributed)
    mesh_shape = validate(cfg, jax.device_count(), jax.process_count())
    out = Path(cfg.train.output_dir).expanduser()
    from jaxgpt.checkpoint import RunLock

    with RunLock(out):  # a second training into the same folder is refused, naming the first
        return _train(cfg, out, sharding.make_mesh(mesh_shape), cache_dir)


def _train(cfg: Config, out: Path, mesh, cache_dir) -> TrainResult:
    from jaxgpt.checkpoint import CheckpointError, checkpoint_dir, nonfinite_tensor

    t = cfg.train
    micro = t.batch_size // t.grad_accum
    if cfg.checkpoint.enabled and not cfg.checkpoint.resume:
        _refuse_old_checkpoints(out)
    if cfg.checkpoint.enabled and cfg.checkpoint.resume:
        _refuse_only_set_aside(out)
    if not cfg.checkpoint.resume:
        _keep_old_metrics_apart(out)

    tokenizer = load_tokenizer_for(cfg)
    arch = model_config(cfg, len(tokenizer))
    if cfg.data.seq_len > arch.n_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's n_positions={arch.n_positions}")
    train_data, eval_set = make_data(cfg, tokenizer, mesh)  # adds chat tokens to the tokenizer
    graphdef, params, rest, gcfg = build_model(cfg, len(tokenizer), mesh, arch)
    _warn_unsplit(gcfg, mesh)
    tx, schedule = make_optimizer(cfg, params)
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    abs_opt = jax.eval_shape(tx.init, params)
    o_shard = sharding.opt_state_shardings(tx, abs_opt, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    state = {"params": params, "opt_state": opt_state}
    state_shardings = {"params": p_shard, "opt_state": o_shard}

    rng = jax.random.key_data(jax.random.key(t.seed))

    ckpt, start = _checkpointer(cfg, out), 0
    if ckpt is not None and cfg.checkpoint.resume and ckpt.latest_step() is not None:
        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        try:
            restored = ckpt.restore(abstract_params=abstract(params), abstract_opt_state=abstract(opt_state))
        except CheckpointError:
            _refuse_only_set_aside(out)  # every step was just set aside: say what to do next
            raise
        state = {"params": restored["params"], "opt_state": restored["opt_state"]}
        start = int(restored["step"])
        train_data.restore(restored["data_state"])
        rng = np.asarray(restored["rng"], np.uint32)
        if start >= t.steps:
            log.warning("train.steps=%d, and %s is already at step %d: nothing to train (raise train.steps to "
                        "continue; the schedule then stretches to the new length)", t.steps, out, start)
    # Every applied update keeps the parameters finite (make_train_step); so must the start.
    bad = nonfinite_tensor(state["params"])
    if bad is not None:
        source = (f"checkpoint step {start} in {checkpoint_dir(out)}" if start else
                  f"model.name_or_path={cfg.model.name_or_path}" if cfg.model.name_or_path else "the initialisation")
        raise TrainingError(f"{source}: parameter {bad} holds NaN or infinity; training from it would only save "
                            f"more of it" + (" (move that step folder away to resume from an earlier one)" if start else ""))
    if cfg.schedule.warmup_steps >= t.steps:
        log.warning("schedule.warmup_steps=%d is not shorter than train.steps=%d: the learning rate rises by "
                    "lr / warmup_steps a step and does not reach optimizer.lr=%g in this run",
                    cfg.schedule.warmup_steps, t.steps, cfg.optimizer.lr)

    step_fn = make_train_step(graphdef, rest, tx, mesh=mesh, dropout=gcfg.dropout > 0,
                              state_shardings=state_shardings)
    eval_fn = make_eval_step(graphdef, rest, mesh=mesh) if (eval_set is not None and t.eval_every) else None
    n_params = num_params(nnx.merge(graphdef, state["params"], rest))
    tokens_per_step = t.batch_size * cfg.data.seq_len
    fpt = flops_per_token(gcfg, n_params, cfg.data.seq_len)
    peak = peak_flops(cfg)
    logger = MetricsLog(cfg, out, start)
    logger.print(f"jaxgpt: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
                 f"global batch {t.batch_size} x {cfg.data.seq_len} tokens ({t.grad_accum} micro-batches), "
                 f"steps {start}->{t.steps}, output {out}, compilation cache {cache_dir or 'off'}")
    rows = t.batch_size // t.grad_accum * cfg.data.seq_len  # one micro-batch's positions (what the model sees)
    logger.print(f"model: {gcfg.dtype} compute, {gcfg.param_dtype} weights, "
                 f"{Policy.resolve(gcfg).describe(rows, cfg.data.seq_len)}"
                 + (f", host malloc: {host_memory.describe()}" if jax.default_backend() == "cpu" else ""))
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run_config(cfg, gcfg), indent=2) + "\n")
    _report_data(logger, out, train_data, eval_set)

    result = TrainResult(graphdef, state["params"], rest, gcfg, tokenizer, start, output_dir=out)
    key = jax.random.wrap_key_data(jnp.asarray(rng))
    guard = _preemption_guard()
    bad_in_a_row, pending = 0, None
    window_t0, window_tokens = time.perf_counter(), 0

    def finish(step, m) -> None:
        """Read one step's metrics back (one step behind dispatch, so the host never idles the device)."""
        nonlocal bad_in_a_row, window_t0, window_tokens
        m = jax.device_get(m)  # waits for the step to finish
        now = time.perf_counter()  # windows tile wall time: logging below belongs to the next window
        loss, ok = float(m["loss"]), bool(m["ok"])
        result.losses[step] = loss
        window_tokens += tokens_per_step
        if not ok:
            bad_in_a_row += 1
            result.skipped.append(step)
            grad_norm = float(m["grad_norm"])
            what = ("non-finite loss/gradient" if not (math.isfinite(loss) and math.isfinite(grad_norm))
                    else "the update would make parameters non-finite")
            logger.print(f"step {step}: {what} (loss={loss}, grad_norm={grad_norm}); update skipped "
                         f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= t.max_nonfinite:
                last = ckpt.latest_step() if ckpt is not None else None
                # Every applied update was checked finite: so is every checkpoint (not necessarily good).
                raise TrainingError(
                    f"stopping at step {step}: {bad_in_a_row} non-finite steps in a row (train.max_nonfinite="
                    f"{t.max_nonfinite}); parameters are those of the last applied step (finite); last checkpoint: "
                    f"{'step ' + str(last) if last is not None else 'none'} in {out}. "
                    f"Lower optimizer.lr or check the data.")
        else:
            bad_in_a_row = 0
        logger.progress(1)
        if step % cfg.logging.log_every == 0 or step == t.steps:
            dt = now - window_t0
            tps = window_tokens / dt if dt > 0 else 0.0
            mfu = (tps * fpt / (peak * jax.device_count())) if peak else None
            record = {"step": step, "loss": loss, "lr": float(schedule(int(m["lr_step"]))),
                      "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps, "mfu": mfu,
                      "trained_tokens": float(m["trained_tokens"])}
            logger.write(record, f"step {step:>6} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                                 f"grad_norm {record['grad_norm']:.3f} | {tps:,.0f} tok/s"
                         + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""))
            if logger.bar is not None:
                logger.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            window_t0, window_tokens = now, 0

    try:
        with guard:
            for step in range(start + 1, t.steps + 1):
                local = [next(train_data) for _ in range(t.grad_accum)]
                batch = _global_batch(local, mesh, micro)
                step_key = jax.random.key_data(jax.random.fold_in(key, step))
                state, metrics = step_fn(state, batch, step_key)
                if pending is not None:
                    finish(*pending)
                pending = (step, metrics)
                result.step = step
                evaluate = eval_fn is not None and (step % t.eval_every == 0 or step == t.steps)
                stop = guard.should_stop(step) if guard is not None else False
                if evaluate or stop or step == t.steps or (ckpt is not None and ckpt.should_save(step)):
                    finish(*pending)  # never checkpoint or evaluate past an unchecked step
                    pending = None
                if evaluate:
                    result.evals[step] = _evaluate(cfg, eval_fn, eval_set, state["params"], mesh, micro)
                    e = result.evals[step]
                    logger.write({"step": step, **e}, f"step {step:>6} | eval_loss {e['eval_loss']:.4f} | "
                                                      f"eval_ppl {e['eval_ppl']:.2f}")
                    _samples(cfg, logger, graphdef, state["params"], rest, tokenizer, step)
                if ckpt is not None:
                    ckpt.save(step, params=state["params"], opt_state=state["opt_state"],
                              data_state=train_data.state(), rng=rng, config=run_config(cfg, gcfg),
                              tokenizer=tokenizer, force=stop or step == t.steps)
                if stop:
                    result.preempted = True
                    result.interrupted = guard.received == signal.SIGINT
                    if not result.interrupted:
                        logger.print(f"preempted: saved step {step}, exiting")
                    break
            if pending is not None:
                finish(*pending)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; a save in flight is never committed
        ckpt = None
        raise
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
        if jax.process_index() == 0 and _streaming(train_data):
            _write_data_stats(out, train_data, eval_set)  # streaming: what was read by now
    result.params = state["params"]
    if jax.process_index() == 0 and cfg.logging.plot and result.losses:
        # the whole run across resumes: earlier runs' logged steps, then every step of this one
        before, before_evals = logged_losses(out)
        plot_losses(out, dict(sorted({**before, **result.losses}.items())),
                    dict(sorted({**before_evals, **{s: e["eval_loss"] for s, e in result.evals.items()}}.items())))
    return result


def _global_batch(local: list[dict], mesh, micro: int) -> dict[str, jax.Array]:
    """grad_accum process-local micro-batches -> global [grad_accum, micro, T] arrays on (data, fsdp)."""
    stacked = {k: np.stack([b[k] for b in local]).astype(np.int32) for k in local[0]}
    spec = jax.sharding.PartitionSpec(None, sharding.RULES["batch"], None)
    s = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(s, v, (v.shape[0], micro) + v.shape[2:])
            for k, v in stacked.items()}


def _evaluate(cfg: Config, eval_fn, eval_set, params, mesh, micro: int) -> dict:
    """Token-weighted loss over the first ``train.eval_batches`` held-out batches (the same each time)."""
    from jaxgpt.data import eval_batches

    total, count = 0.0, 0.0
    batches = eval_batches(eval_set, micro, process_index=jax.process_index(), process_count=jax.process_count())
    for i, local in enumerate(batches):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        batch = {k: v[0] for k, v in _global_batch([local], mesh, micro).items()}
        l, n = jax.device_get(eval_fn(params, batch))
        total, count = total + float(l), count + float(n)
    loss = total / count if count else float("nan")  # no trained token held out: no number to report
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _samples(cfg: Config, logger: MetricsLog, graphdef, params, rest, tokenizer, step: int) -> None:
    prompts = cfg.logging.sample_prompts
    if not prompts or importlib.util.find_spec("jaxgpt.sample") is None:
        return
    from jaxgpt.sample import generate
    from jaxgpt.tokenizer import stop_token_ids

    model = nnx.merge(graphdef, params, rest)
    if tokenizer.chat_template:  # a chat model: each prompt is a user turn
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
        ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    else:  # plain-text training (no template): each prompt is text to continue
        ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, max_new_tokens=cfg.logging.sample_max_new_tokens, stop_ids=stop_token_ids(tokenizer))
    for i, (p, o) in enumerate(zip(prompts, outs)):
        reply = tokenizer.decode(o, skip_special_tokens=True)
        logger.print(f"step {step} sample | {p!r} -> {reply!r}")
        logger.text(f"sample_{i}", f"**{p}**\n\n{reply}", step)


def _checkpointer(cfg: Config, out: Path):
    if not cfg.checkpoint.enabled:
        return None
    from jaxgpt.checkpoint import Checkpointer, checkpoint_dir

    c = cfg.checkpoint
    return Checkpointer(checkpoint_dir(out), save_every=c.save_every, keep=c.keep, async_save=c.async_save,
                        log_file=out / "checkpoint.log")


def _warn_unsplit(gcfg: GPT2Config, mesh) -> None:
    """The rules replicate a dimension the tensor axis does not divide: say so, rather than let a
    user believe attention (say gpt2-xl's 25 heads) is split when it is not."""
    tp = mesh.shape["tensor"]
    dims = {"n_head": gcfg.n_head, "the MLP width": gcfg.inner_dim, "the vocabulary rows": gcfg.padded_vocab_size}
    unsplit = [f"{name} ({n})" for name, n in dims.items() if tp > 1 and n % tp]
    if unsplit:
        log.warning("mesh.tensor=%d does not divide %s: those weights are replicated over the tensor axis, not "
                    "split (model.vocab_multiple pads the vocabulary)", tp, ", ".join(unsplit))


def _refuse_old_checkpoints(out: Path) -> None:
    """checkpoint.resume=false where checkpoints exist: the new run would skip saving every step the
    old run already has, and export / chat would then load the old model. Refuse, touching nothing."""
    from jaxgpt.checkpoint import checkpoint_dir, saved_steps

    folder = checkpoint_dir(out)
    steps = saved_steps(folder)  # an old run's, complete or not
    if steps:
        raise ConfigError(f"checkpoint.resume=false, but {folder.absolute()} already holds checkpoints (steps "
                          f"{', '.join(map(str, steps))}): set train.output_dir to a new folder, "
                          f"or move that one away, to start a fresh run")


def _refuse_only_set_aside(out: Path) -> None:
    """Every checkpoint was set aside as corrupt: resuming would silently start over at step 0 and
    append a second series to metrics.jsonl. Refuse, with the ways forward."""
    from jaxgpt.checkpoint import checkpoint_dir, saved_steps, set_aside_steps

    folder = checkpoint_dir(out)
    aside = set_aside_steps(folder)
    if aside and not saved_steps(folder):
        from jaxgpt.checkpoint import CheckpointError

        raise CheckpointError(f"{folder.absolute()}: every checkpoint was set aside as incomplete or corrupt "
                              f"({', '.join(aside)}; details in {out / 'checkpoint.log'}): nothing to resume from. "
                              f"Set checkpoint.resume=false to start over (the old metrics are kept apart), or "
                              f"rename a step folder you trust back to its step number")


def _keep_old_metrics_apart(out: Path) -> None:
    """checkpoint.resume=false starts a new series: an earlier run's metrics (and TensorBoard) move to
    ``metrics.<time>.jsonl`` (``tensorboard.<time>``) instead of mixing with it."""
    if jax.process_index() != 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, moved in (("metrics.jsonl", f"metrics.{stamp}.jsonl"), ("tensorboard", f"tensorboard.{stamp}")):
        if (out / name).exists():
            (out / name).rename(out / moved)
            log.warning("checkpoint.resume=false: starting over; the earlier %s is kept as %s", name, out / moved)


def _report_data(logger: MetricsLog, out: Path, train_data, eval_set) -> None:
    """What training reads: one line per set in the start-up output (skips with their file:line),
    all of it in ``data_stats.json``."""
    stats = train_data.dataset.stats
    if _streaming(train_data):
        logger.print(f"data: streaming; statistics are counted as it is read, into {out / 'data_stats.json'}")
    else:
        logger.print(f"data: {stats.brief()} ({out / 'data_stats.json'})")
    for reason in stats.skip_reasons[:3]:
        logger.print(f"  skipped {reason}")
    if eval_set is not None:
        logger.print(f"eval data: {eval_set.stats.brief()}")
    if jax.process_index() == 0:
        _write_data_stats(out, train_data, eval_set)


def _streaming(train_data) -> bool:
    from jaxgpt.data import StreamingDataset

    return isinstance(train_data.dataset, StreamingDataset)


def _write_data_stats(out: Path, train_data, eval_set) -> None:
    stats = {"train": train_data.dataset.stats.to_dict()}
    if eval_set is not None:
        stats["eval"] = eval_set.stats.to_dict()
    (out / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _preemption_guard():
    from jaxgpt.checkpoint import PreemptionGuard

    return PreemptionGuard()


# ----------------------------------------------------------------------------- CLI

USAGE = """usage: python -m jaxgpt.train [--config FILE.yaml | NAME] [section.key=value ...]

Train GPT-2 with JAX. --config takes a YAML file or the name of a shipped config
({configs}; in jaxgpt/configs/);
without it, runs demo. Overrides are read as YAML values, e.g.:
optimizer.lr=3e-5 train.steps=200 mesh.fsdp=-1
On a CPU host the command restarts itself once, before jax loads, with glibc malloc
settings that make XLA:CPU's steps faster (JAXGPT_MALLOC=default: it does not;
docs/training.md, "Host memory on a CPU").

keys (type = default):
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(configs=", ".join(shipped_configs())) + help_text())
        return 0
    path, overrides = None, []
    while argv:
        arg = argv.pop(0)
        if arg == "--config":
            if not argv:
                print("error: --config needs a YAML file or a shipped config's name", file=sys.stderr)
                return 2
            path = argv.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"error: unknown option {arg!r} (see --help)", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # orbax/absl: warnings only
    logging.getLogger("jaxgpt").setLevel(logging.INFO)
    cfg = None
    try:
        cfg = load_config(path, overrides)
        result = train(cfg)
    except (ValueError, TrainingError) as e:  # ConfigError, WeightsError, CheckpointError, data errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C twice, or once before the loop: stop now, keep what is committed
        print(f"interrupted: stopped at once; {_committed(cfg)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not waiting for a save in flight (never committed; the next run removes it)
    if result.interrupted:
        print(f"interrupted at step {result.step}: {_committed(cfg)}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    if result.preempted:
        print(f"preempted at step {result.step}; rerun the same command to resume", file=sys.stderr)
    return 0


def _committed(cfg: Config | None) -> str:
    """Which checkpoint a rerun resumes from, read from the folder."""
    if cfg is None or not cfg.checkpoint.enabled:
        return "nothing saved (checkpoint.enabled=false)" if cfg is not None else "nothing saved"
    from jaxgpt.checkpoint import checkpoint_dir, saved_steps

    folder = checkpoint_dir(Path(cfg.train.output_dir).expanduser())
    steps = saved_steps(folder)
    return f"last checkpoint step {steps[-1]} in {folder}" if steps else f"no checkpoint in {folder}"


if __name__ == "__main__":
    sys.exit(main())
