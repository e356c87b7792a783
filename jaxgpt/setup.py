"""A run's parts, built in the order the data flows: tokenizer -> data (which adds the chat
template and tokens) -> model, created or loaded directly into its shards -> optax AdamW and its
state -> the objective. The demo, the tools and ``jaxgpt.train`` build runs with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxgpt import sharding
from jaxgpt.config import Config, ConfigError
from jaxgpt.model import SETTINGS, GPT2, GPT2Config, abstract_model
from jaxgpt.objectives import SFT, Objective
from jaxgpt.step import make_optimizer

log = logging.getLogger("jaxgpt.train")  # warnings under the command that trains


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



def load_tokenizer_for(cfg: Config):
    """The tokenizer named by the config (the data adds its chat template later)."""
    from jaxgpt.tokenizer import has_tokenizer, load_tokenizer
    from jaxgpt.paths import PathError, check_remote, is_local_path, missing_folder, upath

    for key in ("name_or_path", "tokenizer"):  # a mistyped folder: one line naming the key, before any hub lookup
        value = getattr(cfg.model, key)
        try:
            check_remote(value or "")
        except PathError as e:
            raise ConfigError(f"model.{key}={e}") from None
        if value is not None and is_local_path(str(value)) and not upath(value).exists():
            raise ConfigError(f"model.{key}={missing_folder(str(value))}")
    name = cfg.model.tokenizer
    if name is None and cfg.model.name_or_path:
        from jaxgpt.paths import WeightsError, resolve

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


def make_data(cfg: Config, tokenizer, mesh):
    """(train iterator, held-out dataset or None); gives ``tokenizer`` the data's chat template."""
    from jaxgpt.data import DataIterator, build_datasets, build_preference_datasets

    build = build_preference_datasets if cfg.objective.name == "dpo" else build_datasets
    train_set, eval_set = build(cfg.data, tokenizer)
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


def _warn_unsplit(gcfg: GPT2Config, mesh) -> None:
    """The rules replicate a dimension the tensor axis does not divide: say so, rather than let a
    user believe attention (say gpt2-xl's 25 heads) is split when it is not."""
    tp = mesh.shape["tensor"]
    dims = {"n_head": gcfg.n_head, "the MLP width": gcfg.inner_dim, "the vocabulary rows": gcfg.padded_vocab_size}
    unsplit = [f"{name} ({n})" for name, n in dims.items() if tp > 1 and n % tp]
    if unsplit:
        log.warning("mesh.tensor=%d does not divide %s: those weights are replicated over the tensor axis, not "
                    "split (model.vocab_multiple pads the vocabulary)", tp, ", ".join(unsplit))


@dataclass
class Setup:
    """Everything a run trains with; ``state`` = {"params", "opt_state"} as the train step takes it."""

    cfg: Config
    mesh: Any
    tokenizer: Any
    model_config: GPT2Config
    graphdef: Any
    rest: nnx.State
    state: dict
    state_shardings: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    objective: Objective
    train_data: Any  # jaxgpt.data.DataIterator
    eval_set: Any  # a held-out dataset, or None
    rng: np.ndarray  # the run's key data: each step folds its number in
    start: int = 0  # optimizer steps already done (a resumed run)
    lora_base: dict | None = None  # a LoRA run's base (jaxgpt.lora.base_reference); params are the adapters

    @property
    def n_params(self) -> int:
        """The model's parameters, a LoRA run's frozen base included (``n_trainable``: what trains)."""
        from jaxgpt.lora import Frozen

        frozen = sum(v.size for _, v in nnx.to_flat_state(self.rest) if isinstance(v, Frozen))
        return self.n_trainable + frozen

    @property
    def n_trainable(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state["params"]))

    def abstract_state(self) -> dict:
        """``state`` as shapes, dtypes and shardings: what a checkpoint restores onto."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def resume(self, restored: dict) -> None:
        """Continue from a restored checkpoint: its state, step, data position and rng."""
        saved = restored["config"].get("lora_base") or {}
        if self.lora_base is not None and saved != self.lora_base:  # the adapter belongs to the base it was trained on
            why = ("changed since the checkpoint was saved (fingerprint differs)" if saved.get("path") == self.lora_base["path"]
                   else f"is not the base the checkpoint's adapter was trained on ({saved.get('path')})")
            raise ConfigError(f"model.name_or_path={self.cfg.model.name_or_path}: {why}")
        self.state = {"params": restored["params"], "opt_state": restored["opt_state"]}
        self.start = int(restored["step"])
        self.train_data.restore(restored["data_state"])
        self.rng = np.asarray(restored["rng"], np.uint32)

    def run_config(self) -> dict:
        """The saved config: the run's sections plus the final GPT2Config (after any vocab resize)."""
        lora = {"lora_base": self.lora_base} if self.lora_base else {}
        return {**self.cfg.to_dict(), "model_config": dataclasses.asdict(self.model_config), **lora}


def prepare(cfg: Config, mesh) -> Setup:
    """Build the run ``cfg`` describes on ``mesh``, at step 0."""
    tokenizer = load_tokenizer_for(cfg)
    arch = model_config(cfg, len(tokenizer))
    if cfg.data.seq_len > arch.n_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's n_positions={arch.n_positions}")
    train_data, eval_set = make_data(cfg, tokenizer, mesh)  # adds chat tokens to the tokenizer
    graphdef, params, rest, gcfg = build_model(cfg, len(tokenizer), mesh, arch)
    lora_base = None
    if cfg.lora.rank:
        graphdef, params, rest, lora_base = with_adapters(cfg, graphdef, params, rest, arch.vocab_size, mesh)
    _warn_unsplit(gcfg, mesh)
    tx, schedule = make_optimizer(cfg, params)
    state, state_shardings = init_state(tx, params, mesh)
    rng = jax.random.key_data(jax.random.key(cfg.train.seed))
    objective = SFT(mesh)
    if cfg.objective.name == "dpo":
        from jaxgpt.reference import dpo_objective

        objective = dpo_objective(cfg, mesh, graphdef, rest, params, train_data.dataset, eval_set)
    return Setup(cfg, mesh, tokenizer, gcfg, graphdef, rest, state, state_shardings, tx, schedule, objective,
                 train_data, eval_set, rng, lora_base=lora_base)


def with_adapters(cfg: Config, graphdef, params, rest, base_vocab: int, mesh):
    """LoRA (``cfg.lora``): (graphdef, adapters, rest with the frozen base, base reference). The adapters
    (and added tokens' rows) are the trainable params; every array is placed by its logical axes."""
    from jaxgpt import lora
    from jaxgpt.paths import resolve

    if cfg.model.name_or_path is None:
        raise ConfigError(f"lora.rank={cfg.lora.rank}: LoRA adapts a pretrained model; set model.name_or_path")
    spec = dataclasses.replace(lora.LoRASpec.from_config(cfg.lora), base_name=str(cfg.model.name_or_path))
    model = lora.apply(nnx.merge(graphdef, params, rest), spec, base_vocab=base_vocab, seed=cfg.train.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, sharding.param_shardings(jax.tree.map(lambda x: x, params), mesh))
    rest = jax.device_put(rest, sharding.param_shardings(jax.tree.map(lambda x: x, rest), mesh))
    return graphdef, params, rest, lora.base_reference(str(cfg.model.name_or_path), resolve(cfg.model.name_or_path))


def init_state(tx: optax.GradientTransformation, params: nnx.State, mesh) -> tuple[dict, dict]:
    """(state, its shardings): the optimizer state placed beside the parameters it updates, so the
    step's outputs match its inputs and its second call reuses the first one's program."""
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    o_shard = sharding.opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    return {"params": params, "opt_state": opt_state}, {"params": p_shard, "opt_state": o_shard}
