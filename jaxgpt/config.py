"""The run configuration: typed sections, YAML files, ``key=value`` overrides, validation.

One ``Config`` holds every knob of a training run, grouped in sections
(``model``, ``data``, ``objective``, ``optimizer``, ``schedule``, ``mesh``, ``train``,
``checkpoint``, ``logging``, ``distributed``, ``lora``). A run is described by a YAML
file holding only what differs from the defaults, plus dotted overrides::

    python -m jaxgpt.train --config gpt2-chat optimizer.lr=3e-5 train.steps=200

``--config`` takes a YAML path or the name of a config shipped in the package
(``jaxgpt/configs/``: ``demo``, ``gpt2-chat``, ``gpt2-{medium,large,xl}-pod``, and LoRA's
``demo-lora``, ``gpt2-chat-lora``, ``gpt2-xl-lora-pod``).

Everything is checked before JAX compiles anything; each problem is one line
naming the file and key (``ConfigError``; ``DataError`` for the data section, which
``jaxgpt.data`` reads). A key's value is checked in one place, ``jaxgpt.config_keys.check_key`` (its
choices, float range or integer minimum), as it is read; the rules between keys are ``validate``'s.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxgpt.config_keys import (FLOAT_RANGES, FORMATS, ConfigError, DataError, build, check_key, field_types,
                                help_field, suggest, type_name)
from jaxgpt.inputs import Range

PACKAGE = Path(__file__).resolve().parent
SHIPPED = PACKAGE / "configs"  # package data, so that an installed jaxgpt has them too
DEFAULT_CONFIG = SHIPPED / "demo.yaml"

_f = help_field


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "HF folder or hub id to fine-tune; null = train from scratch with the architecture below")
    tokenizer: str | None = _f(None, "tokenizer folder or hub id; null = the model folder's, else the vendored GPT-2 tokenizer")
    n_layer: int = _f(2, "from scratch only: transformer blocks")
    n_head: int = _f(4, "from scratch only: attention heads")
    n_embd: int = _f(128, "from scratch only: width")
    n_positions: int = _f(1024, "from scratch only: maximum sequence length (GPT-2's 1024, as data.seq_len)")
    vocab_size: int | None = _f(None, "from scratch only: vocabulary rows; null = the tokenizer's size")
    init_seed: int = _f(0, "from scratch only: parameter init seed")
    dtype: str = _f("float32", "compute dtype (float32 | bfloat16); master weights stay in param_dtype")
    param_dtype: str = _f("float32", "parameter / optimizer-state dtype")
    vocab_multiple: int = _f(1, "pad the embedding rows to a multiple (128 on TPU/GPU, and for tensor parallelism)")
    remat: bool | str = _f("auto", "what the backward pass recomputes: none | minimal (keep the weight matmuls' outputs, recompute LayerNorm, GELU, attention softmax) | full (each block from its input) | auto (minimal for scanned blocks on a CPU, where it is faster and smaller; none elsewhere). true / false = full / none")
    scan_layers: bool | None = _f(None, "run the blocks as one lax.scan: compile time independent of depth, less memory; null = on, except on a GPU (unrolled is faster there) and on a CPU for micro-batches of at most 2,048 positions (unrolled is faster there)")
    attention: str = _f("auto", "auto (cudnn on a GPU in bf16/fp16 without dropout, else einsum) | einsum (jaxgpt's own) | cudnn (fused flash attention) | xla | flash (jax's Pallas flash kernel with packed rows' segment ids; a GPU, elsewhere its interpreter, slow)")
    dropout: float = _f(0.0, "dropout rate on embeddings, attention and residuals (0 = off)")
    kernels: str = _f("auto", "LayerNorm, bias + GELU and the chunked loss's log-sum-exp: xla (jax.numpy, fused by XLA) | pallas (jaxgpt.kernels' Pallas kernels: NVIDIA GPUs) | auto (pallas on NVIDIA GPUs, A100 or later, in bf16 / fp16, else xla)")
    loss_chunks: int | None = _f(None, "compute the LM head + cross-entropy in this many sequence chunks, never holding the whole [batch, seq, vocab] logits (less memory; data.seq_len must divide by it); null = 8 on a GPU (faster there), 1 elsewhere")


@dataclass
class DataSource:
    """One dataset: a local file / folder, or a hub dataset id with config ``name`` and ``split``.

    ``weight`` scales this source's share of an epoch: 2.0 repeats every example
    twice, 0.5 keeps a seeded random half.
    """

    path: str
    name: str | None = None
    split: str = "train"
    weight: float = 1.0
    format: str | None = None  # None: DataConfig.format

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"data source path must be a non-empty string, got {self.path!r}")
        self.weight = Range(0, low_open=True).check(f"{self.path}: weight", self.weight, DataError)
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"{self.path}: format={self.format!r}: choose from {', '.join(FORMATS)}")


@dataclass
class DataConfig:
    """Data knobs (the ``data:`` section of a run config)."""

    sources: list[DataSource] = _f([], "files, folders or hub ids, or {path, name, split, weight, format} each")
    format: str = _f("auto", "auto (from each file's first record) | messages | sharegpt | prompt_completion | "
                     "alpaca | text")
    template: str = _f("chatml", "chatml | plain (no new tokens) | tokenizer (its own template, as is)")
    seq_len: int = _f(1024, "tokens per row (model inputs); a conversation fits if it has <= seq_len + 1 tokens")
    loss_on: str = _f("assistant", "assistant | all | completion (only the final assistant turn / the completion)")
    truncation: str = _f("truncate", "truncate | drop conversations longer than a row")
    skip_invalid: bool = _f(False, "skip and count bad records instead of raising")
    pack: bool = _f(True, "pack several conversations per row; false = one per row (to compare efficiency)")
    seed: int = _f(0, "packing tie-break, eval split, weights and epoch order")
    shuffle: bool = _f(True, "shuffle the rows every epoch")
    eval_fraction: float = _f(0.0, "hold out this share of each source's examples for eval")
    eval_sources: list[DataSource] = _f([], "separate eval data (as sources; weights ignored)")
    max_examples: int | None = _f(None, "read at most this many records per source (smoke runs)")
    streaming: bool = _f(False, "read lazily and pack stream_window examples at a time (data larger than memory)")
    stream_window: int = _f(4096, "examples per packing window when streaming")

    def __post_init__(self):
        self.sources = [_as_source(s, "sources") for s in _as_list(self.sources)]
        self.eval_sources = [_as_source(s, "eval_sources") for s in _as_list(self.eval_sources)]
        for key in ("format", "template", "loss_on", "truncation"):
            check_key(f"data.{key}", getattr(self, key), DataError)
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise DataError(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        check_key("data.eval_fraction", self.eval_fraction, DataError)
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"data.max_examples must be >= 1, got {self.max_examples!r}")
        if self.stream_window < 1:
            raise DataError(f"data.stream_window must be >= 1, got {self.stream_window!r}")
        if self.streaming and self.eval_fraction:
            raise DataError("data.eval_fraction needs the whole dataset; with streaming give data.eval_sources")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(x):
    if x is None:
        return []
    return [x] if isinstance(x, (str, dict, DataSource)) else list(x)


def _as_source(s, key: str) -> DataSource:
    if isinstance(s, DataSource):
        return s
    if isinstance(s, str):
        return DataSource(path=s)
    if isinstance(s, dict):
        unknown = sorted(set(s) - {f.name for f in dataclasses.fields(DataSource)})
        if unknown:
            raise DataError(f"data.{key}: unknown key(s) {unknown} in {s!r}")
        return DataSource(**s)
    raise DataError(f"data.{key}: expected a path or a mapping, got {s!r}")


@dataclass
class ObjectiveConfig:
    """What training minimises (jaxgpt.objectives); the dpo keys are TRL DPOConfig's (docs/dpo.md)."""

    name: str = _f("sft", "sft (next-token cross-entropy on chats) | dpo (preference pairs: prompt/chosen/rejected)")
    beta: float = _f(0.1, "dpo: strength of the pull toward the reference model (IPO's tau)")
    loss: str = _f("sigmoid", "dpo: sigmoid (DPO) | ipo | hinge (SLiC) | robust (uses label_smoothing)")
    label_smoothing: float = _f(0.0, "dpo, loss=robust: the assumed share of flipped preference labels")
    precompute_reference: bool = _f(False, "dpo: score the pairs with the starting weights once, before training, "
                                    "and keep only those numbers (one model in memory, not two)")


@dataclass
class OptimizerConfig:
    lr: float = _f(3e-4, "peak learning rate")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay on matrices (never on biases and LayerNorm)")
    decay_embeddings: bool = _f(False, "also decay the token / position embeddings")
    grad_clip: float | None = _f(1.0, "clip gradients by global norm; null = no clipping")


@dataclass
class ScheduleConfig:
    name: str = _f("cosine", "learning-rate schedule: cosine | linear | constant (each after a linear warmup)")
    warmup_steps: int = _f(0, "steps of linear warmup from 0 to optimizer.lr")
    decay_steps: int | None = _f(None, "steps until the end of the decay; null = train.steps")
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of optimizer.lr (cosine, linear)")


@dataclass
class MeshConfig:
    data: int = _f(1, "data-parallel axis size (-1 = the rest of the devices)")
    fsdp: int = _f(-1, "FSDP axis size: shards parameters and optimizer state (-1 = the rest)")
    tensor: int = _f(1, "tensor-parallel axis size: splits heads, MLP and vocab (-1 = the rest)")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(8, "global batch in sequences per optimizer step (all processes together)")
    grad_accum: int = _f(1, "micro-batches per step; each holds batch_size / grad_accum sequences")
    seed: int = _f(0, "seed for dropout (the data order has data.seed)")
    eval_every: int = _f(100, "evaluate on the held-out split every N steps (0 = never)")
    eval_batches: int | None = _f(8, "held-out batches per evaluation (null = the whole held-out set)")
    max_nonfinite: int = _f(5, "stop after this many non-finite steps in a row")
    output_dir: str = _f("runs/demo", "checkpoints, metrics.jsonl, TensorBoard events and plots go here")


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "write checkpoints to train.output_dir/checkpoints")
    save_every: int = _f(500, "save every N steps (and always at the end)")
    keep: int = _f(3, "keep the last K checkpoints")
    async_save: bool = _f(True, "write checkpoints in the background")
    resume: bool = _f(True, "continue from the latest checkpoint in train.output_dir (false: train from the start; refused where checkpoints exist, so two runs never mix)")


@dataclass
class LoggingConfig:
    log_every: int = _f(10, "log line + metrics.jsonl record every N steps")
    progress_bar: bool = _f(True, "show a tqdm progress bar")
    tensorboard: bool = _f(True, "write TensorBoard event files to train.output_dir")
    plot: bool = _f(True, "write loss.png at the end")
    sample_prompts: list[str] = _f([], "user prompts to generate replies for at each evaluation")
    sample_max_new_tokens: int = _f(48, "tokens generated per sample")
    peak_flops_per_device: float | None = _f(None, "peak FLOP/s of one device for MFU; null = known TPUs/GPUs only")


@dataclass
class DistributedConfig:
    enabled: bool | None = _f(None, "call jax.distributed.initialize(); null = when a coordinator is configured (or JAX_COORDINATOR_ADDRESS is set)")
    coordinator_address: str | None = _f(None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS); null on TPU pods = automatic")
    num_processes: int | None = _f(None, "number of processes (env JAX_NUM_PROCESSES)")
    process_id: int | None = _f(None, "this process's index (env JAX_PROCESS_ID)")
    initialization_timeout: int = _f(300, "seconds to wait for all processes")
    cpu_devices_per_process: int | None = _f(None, "CPU only: simulated devices per process (jax_num_cpu_devices)")


# lora.targets: HF module names -> the projections they select (c_proj: attention's and the MLP's, as in PEFT).
LORA_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_TARGETS = {"c_attn": ("attn.c_attn",), "c_proj": ("attn.c_proj", "mlp.c_proj"), "c_fc": ("mlp.c_fc",),
                **{p: (p,) for p in LORA_PROJECTIONS}}


@dataclass
class LoRAConfig:
    rank: int = _f(0, "LoRA rank: train low-rank adapters on a frozen base (model.name_or_path); 0 = off (full fine-tuning)")
    alpha: float | None = _f(None, "LoRA alpha: the adapters' output is scaled by alpha / rank; null = rank (scale 1)")
    dropout: float = _f(0.0, "dropout on the adapters' input")
    targets: list[str] | None = _f(None, "HF module names to adapt: c_attn, c_proj (attention's and the MLP's, as in PEFT), c_fc, or attn.c_proj / mlp.c_proj; null = all")
    rslora: bool = _f(False, "scale by alpha / sqrt(rank) (rank-stabilised LoRA, PEFT's use_rslora)")
    base_dtype: str = _f("float32", "dtype of the frozen base weights: float32 | bfloat16 (half the memory)")

    def __post_init__(self):
        if self.targets is not None and self.rank <= 0:
            raise ValueError(f"lora.targets={self.targets} with lora.rank={self.rank}: set lora.rank > 0")
        if self.targets is not None and not self.targets:
            raise ValueError("lora.targets=[]: name at least one module (or null = all)")
        unknown = [t for t in self.targets or () if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: unknown target {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

def from_dict(raw: dict | None, source: str = "config") -> Config:
    """A ``Config`` from a nested dict (missing keys keep their defaults)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        for section, value in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown section {section!r}{suggest(str(section), list(SECTIONS))}")
            if value is not None and not isinstance(value, dict):  # None: every key commented out
                raise ConfigError(f"{section}: expected a mapping of keys, got {value!r}")
        return build(Config, {k: v or {} for k, v in raw.items()}, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optimizer.lr=3e-5`` -> (['optimizer', 'lr'], 3e-5); values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"command line: {text!r} is not a key=value override (e.g. optimizer.lr=3e-5)")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"command line: {key!r} should be section.key (e.g. train.steps)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def shipped_configs() -> list[str]:
    """Names of the configs in the package (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """The file ``--config`` means: a path, or else the bare name of a shipped config (``demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = shipped_configs()
    if len(path.parts) == 1 and path.stem == path.name and path.name in names:
        return SHIPPED / f"{path.name}.yaml"
    raise ConfigError(f"{path}: config file not found{suggest(path.stem, names)}; "
                      f"shipped configs, by name: {', '.join(names)}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- the YAML file or shipped config (default: ``demo``) <- ``key=value`` overrides."""
    path = config_path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    from_dict(raw, str(path))  # report the file's own mistakes against the file
    if path.resolve().parent == SHIPPED:
        _bundled_paths(raw)
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"command line: unknown section {section!r}{suggest(section, list(SECTIONS))}")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return from_dict(raw, f"{path} + command line" if overrides else str(path))


def _bundled_paths(raw: dict) -> None:
    """A shipped config names the package's data files as ``jaxgpt/assets/...``; they are taken
    from the installed package, whatever the current folder (which may hold another copy)."""
    data = raw.get("data") or {}
    for key in ("sources", "eval_sources"):
        items = data.get(key)
        items = [items] if isinstance(items, (str, dict)) else list(items or [])
        for i, item in enumerate(items):
            rel = item if isinstance(item, str) else item.get("path") if isinstance(item, dict) else None
            if isinstance(rel, str) and Path(rel).parts[:1] == (PACKAGE.name,):
                full = str(PACKAGE.parent / rel)
                items[i] = full if isinstance(item, str) else {**item, "path": full}
        if items:
            data[key] = items


# ----------------------------------------------------------------------------- checks that need devices

def resolve_mesh(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in; ConfigError if it does not cover ``num_devices``."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: axis sizes are positive, or -1 for the rest of the devices")
    auto = [n for n, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in auto)}")
    fixed = 1
    for s in sizes.values():
        fixed *= s if s != -1 else 1
    if auto:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh.{auto[0]}=-1: the other axes ({fixed} devices) do not divide the {num_devices} devices")
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {fixed} "
            f"does not match the {num_devices} devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def validate(cfg: Config, num_devices: int, num_processes: int = 1) -> tuple[int, int, int]:
    """Checks that need the device count; returns the resolved mesh shape."""
    for section, cls in field_types(Config).items():  # a Config built in Python skipped _coerce
        for f in dataclasses.fields(cls):
            check_key(f"{section}.{f.name}", getattr(getattr(cfg, section), f.name))
    data, fsdp, tensor = resolve_mesh(cfg.mesh, num_devices)
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    micro = t.batch_size // t.grad_accum
    dp = data * fsdp
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={t.batch_size}: the micro-batch of {micro} sequences (batch_size / grad_accum) "
            f"is not divisible by the data-parallel size data*fsdp = {data}*{fsdp} = {dp}")
    if micro % num_processes:
        raise ConfigError(f"train.batch_size={t.batch_size}: the micro-batch of {micro} is not divisible by "
                          f"the {num_processes} processes")
    if cfg.model.param_dtype == "float16":
        raise ConfigError("model.param_dtype=float16: the weights and AdamW state in float16 underflow (eps=1e-8 is "
                          "0 there) and turn to NaN; keep them in float32 or bfloat16 (model.dtype=float16 computes "
                          "in float16)")
    if cfg.model.attention == "cudnn" and (cfg.model.dtype == "float32" or cfg.model.dropout):
        raise ConfigError("model.attention=cudnn needs model.dtype bfloat16 or float16 and model.dropout=0 "
                          "(attention=auto picks it only where it applies)")
    if cfg.model.attention == "flash" and cfg.model.dropout:
        raise ConfigError("model.attention=flash has no attention-probability dropout: use model.dropout=0")
    if cfg.model.remat not in (True, False, "auto", "none", "minimal", "full"):
        raise ConfigError(f"model.remat={cfg.model.remat!r}: choose from auto, none, minimal, full (or true / false)")
    if cfg.model.loss_chunks is not None and (cfg.model.loss_chunks < 1 or cfg.data.seq_len % cfg.model.loss_chunks):
        raise ConfigError(f"model.loss_chunks={cfg.model.loss_chunks}: must be at least 1 and divide "
                          f"data.seq_len={cfg.data.seq_len}")
    o = cfg.objective
    if o.label_smoothing and not (o.name == "dpo" and o.loss == "robust"):
        raise ConfigError(f"objective.label_smoothing={o.label_smoothing}: only objective.loss=robust (with "
                          f"objective.name=dpo) uses it, as in TRL; this run has {o.name}, loss={o.loss}")
    if o.name == "dpo" and cfg.data.streaming:
        raise ConfigError("objective.name=dpo reads its preference pairs whole: set data.streaming=false")
    return data, fsdp, tensor


def help_text() -> str:
    """Every key with its type, default and meaning, for ``--help``."""
    lines = []
    defaults = Config()
    for section, cls in field_types(Config).items():
        lines.append(f"{section}:")
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = getattr(getattr(defaults, section), f.name)
            tip = f.metadata.get("help", "")
            if f"{section}.{f.name}" in FLOAT_RANGES:
                tip += f"; {FLOAT_RANGES[f'{section}.{f.name}']}"
            lines.append(f"  {section}.{f.name}: {type_name(hints[f.name])} = {default!r}" + (f"  # {tip}" if tip else ""))
    return "\n".join(lines)
