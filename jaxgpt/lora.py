"""LoRA: low-rank adapters on a frozen GPT-2, as PEFT's ``LoraConfig`` builds them.

``apply(model, spec)`` replaces each targeted projection (``jaxgpt.model.Linear``) with a
``LoRALinear``: ``y = x W + b + scaling * dropout(x) A B`` with ``A`` [*in, r] (kaiming-uniform, as
PEFT initialises ``lora_A``) and ``B`` [r, *out] (zeros), each named with the logical axes of the
weight it adapts, so ``jaxgpt.sharding`` places it alike. Every other weight becomes ``Frozen``, a
variable type that is no ``nnx.Param``: ``nnx.split(model, nnx.Param, ...)`` gives the adapters as
the trainable state (the optimizer allocates nothing for the base) and the base as the rest. Tokens
added to a pretrained vocabulary (chat tokens) get trainable rows of their own (``GrownEmbedding``),
the rows PEFT's ``trainable_token_indices`` saves. ``merged(model)`` folds the adapters back into a
plain ``GPT2``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.backend import DTYPES
from jaxgpt.config import LORA_PROJECTIONS as PROJECTIONS, LORA_TARGETS as TARGET_NAMES
from jaxgpt.model import GPT2, Linear


class LoRAError(ValueError):
    """An adapter or LoRA setting jaxgpt cannot use, as one line naming the key or file."""


class Frozen(nnx.Variable):
    """A weight no optimizer updates (the base under the adapters): not an ``nnx.Param``."""


def resolve_targets(targets) -> tuple[str, ...]:
    """HF module names (``c_attn``, ``c_proj``, ``c_fc``, ``attn.c_proj``, ...) -> projections, in model order."""
    chosen = set()
    for t in targets if targets is not None else PROJECTIONS:  # None: every projection
        if t not in TARGET_NAMES:
            raise LoRAError(f"lora.targets: unknown target {t!r}; choose from {', '.join(TARGET_NAMES)}")
        chosen.update(TARGET_NAMES[t])
    return tuple(p for p in PROJECTIONS if p in chosen)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # projections (PROJECTIONS)
    dropout: float = 0.0
    rslora: bool = False  # scaling alpha / sqrt(rank) (PEFT's use_rslora) instead of alpha / rank
    base_dtype: str = "float32"
    base_name: str | None = None  # the base as the user named it (a hub id or folder), for adapter_config.json
    base_path: str | None = None  # its local folder, for the export's check

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, lc) -> "LoRASpec":
        """From the run config's ``lora`` section (``jaxgpt.config.LoRAConfig``)."""
        return cls(lc.rank, float(lc.alpha if lc.alpha is not None else lc.rank), resolve_targets(lc.targets),
                   lc.dropout, lc.rslora, lc.base_dtype)


def _kaiming_uniform(key, shape, dtype, fan_in):
    # torch's kaiming_uniform_(a=sqrt(5)) on lora_A [r, in], PEFT's default: U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRALinear(nnx.Module):
    """A frozen ``Linear`` (``base``) plus ``scaling * dropout(x) @ lora_a @ lora_b``; the same calls as ``Linear``."""

    trains = True

    def __init__(self, linear: Linear, spec: LoRASpec, key, param_dtype):
        in_dims = linear.kernel.ndim - linear.bias.ndim
        shape, axes = linear.kernel.shape, linear.kernel.get_metadata().get("axes") or (None,) * linear.kernel.ndim
        self.base = linear
        self.lora_a = nnx.Param(_kaiming_uniform(key, (*shape[:in_dims], spec.rank), param_dtype, linear.n_in),
                                axes=(*axes[:in_dims], None))
        self.lora_b = nnx.Param(jnp.zeros((spec.rank, *shape[in_dims:]), param_dtype), axes=(None, *axes[in_dims:]))
        self.scaling = spec.scaling
        self.dropout = nnx.Dropout(spec.dropout, rngs=nnx.Rngs(dropout=0)) if spec.dropout else None

    @property
    def bias(self):
        return self.base.bias

    def _ab(self, dtype):
        a = self.lora_a[...].astype(dtype).reshape(self.base.n_in, -1)
        return a, self.lora_b[...].astype(dtype).reshape(a.shape[1], -1)

    def product(self, x):
        a, b = self._ab(x.dtype)
        h = self.dropout(x) if self.dropout is not None else x
        delta = ((h.reshape(-1, h.shape[-1]) @ a) @ b) * jnp.asarray(self.scaling, x.dtype)
        return self.base.product(x) + delta.reshape(*x.shape[:-1], b.shape[1])

    def __call__(self, x):
        return self.product(x) + self.bias[...].astype(x.dtype).reshape(-1)

    def merged_kernel(self):
        """``kernel + scaling * A B`` in float32, in the kernel's shape (PEFT's merge)."""
        a, b = self._ab(jnp.float32)
        kernel = self.base.kernel[...]
        return kernel.astype(jnp.float32) + (self.scaling * (a @ b)).reshape(kernel.shape)


class GrownEmbedding(nnx.Module):
    """``wte`` of a LoRA run whose tokenizer added tokens: the base rows frozen, the rows from
    ``base_rows`` on (the added tokens, then any padding) trainable. Read as ``wte[...]``."""

    def __init__(self, wte, base_rows: int, param_dtype):
        table = wte[...]
        self.base = nnx.Param(table[:base_rows], axes=("vocab", "embed"))  # frozen with the rest by apply
        self.added = nnx.Param(table[base_rows:].astype(param_dtype), axes=(None, "embed"))

    def __getitem__(self, index):
        added = self.added[...]
        return jnp.concatenate([self.base[...].astype(added.dtype), added])[index]

    @property
    def base_rows(self) -> int:
        return self.base.shape[0]


def _retype(model, old: type, new: type, dtype=None, weights_only: bool = False) -> None:
    """Every ``old`` variable of ``model`` (adapters and added rows aside) becomes a ``new`` one, in place;
    the floating ones (``weights_only``: the kernels and embeddings) cast to ``dtype``."""
    for _, module in list(nnx.iter_modules(model)):
        for name, var in list(vars(module).items()):
            if type(var) is old and not (isinstance(module, LoRALinear) or isinstance(module, GrownEmbedding)
                                        and name == "added"):
                value = var[...]
                weight = name in ("kernel", "wte", "wpe") or isinstance(module, GrownEmbedding)
                if dtype is not None and (weight or not weights_only) and jnp.issubdtype(value.dtype, jnp.floating):
                    value = value.astype(dtype)
                setattr(module, name, new(value, **var.get_metadata()))


def apply(model: GPT2, spec: LoRASpec, *, base_vocab: int | None = None, seed: int = 0) -> GPT2:
    """``model`` with adapters on ``spec.targets`` and everything else frozen (in place; returned), its
    matrices in ``spec.base_dtype``.

    ``base_vocab``: the base model's vocabulary before chat tokens were added; the rows from there
    on train. ``lora_a`` is drawn per projection from ``seed``.
    """
    if spec.rank <= 0:
        raise LoRAError(f"lora.rank={spec.rank}: must be > 0 for adapters")
    pd = DTYPES[model.config.param_dtype]
    key = jax.random.key(seed)
    for i, block in enumerate(model.h):
        for target in spec.targets:
            owner, name = target.split(".")
            module = getattr(block, owner)
            setattr(module, name, LoRALinear(getattr(module, name), spec,
                                             jax.random.fold_in(key, i * len(PROJECTIONS) + PROJECTIONS.index(target)), pd))
    if base_vocab is not None and base_vocab < model.config.vocab_size:
        model.wte = GrownEmbedding(model.wte, base_vocab, pd)
    _retype(model, nnx.Param, Frozen, DTYPES[spec.base_dtype], weights_only=True)  # biases and LayerNorms stay
    model.lora = spec  # static: what export and merging read
    return model


def merged(model: GPT2) -> GPT2:
    """A plain ``GPT2`` (a copy, float32 weights) with the adapters folded in: what PEFT's
    ``merge_and_unload`` gives."""
    new = nnx.merge(*nnx.split(model))  # a copy: the caller's model keeps its adapters
    for block in new.h:
        for target in PROJECTIONS:
            owner, name = target.split(".")
            lin = getattr(getattr(block, owner), name)
            if isinstance(lin, LoRALinear):
                kernel = lin.merged_kernel()
                lin.base.kernel = Frozen(kernel, **lin.base.kernel.get_metadata())
                setattr(getattr(block, owner), name, lin.base)
    if isinstance(new.wte, GrownEmbedding):
        new.wte = Frozen(new.wte[...].astype(jnp.float32), axes=("vocab", "embed"))
    _retype(new, Frozen, nnx.Param, jnp.float32)
    new.lora = None
    new.config = new.config.replace(param_dtype="float32")
    return new


def adapter_tensors(model: GPT2) -> dict[str, jax.Array]:
    """{jaxgpt path of a trainable array: value}: the adapters and the added embedding rows."""
    return {".".join(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- the base a run adapts

def base_fingerprint(folder: str | os.PathLike) -> str:
    """A fingerprint of an HF folder's config.json and weight file: size plus SHA-256 of 1 MiB at the
    start, the end and eight places between (reading a whole gpt2-xl takes tens of seconds), enough
    to tell that a base was replaced or rewritten."""
    from jaxgpt.paths import WEIGHT_FILES

    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        return h.hexdigest()
    size, chunk = weights.stat().st_size, 1 << 20
    h.update(f"{weights.name}:{size}".encode())
    with weights.open("rb") as f:
        for k in range(10):
            f.seek(max(0, min(size - chunk, (size - chunk) * k // 9)))
            h.update(f.read(chunk))
    return h.hexdigest()


def base_reference(name: str, folder: str | os.PathLike) -> dict:
    """What a LoRA checkpoint records of its base: its name, its folder and the folder's fingerprint."""
    return {"name": name, "path": str(Path(folder).resolve()), "fingerprint": base_fingerprint(folder)}


def check_base(saved: dict | None, source: str) -> Path:
    """The base folder a LoRA run's saved config names, once its fingerprint still matches."""
    if not saved or "path" not in saved:
        raise LoRAError(f"{source}: a LoRA checkpoint without lora_base (the base model's folder)")
    folder = Path(saved["path"])
    if not (folder / "config.json").is_file():
        raise LoRAError(f"{source}: the base model {folder} is gone; the checkpoint holds only the adapter")
    if base_fingerprint(folder) != saved.get("fingerprint"):
        raise LoRAError(f"{source}: the base model {folder} changed since the run saved it (fingerprint differs); "
                        "the adapter belongs to the old weights")
    return folder


def restore_target(config: dict, gcfg, source: str) -> GPT2:
    """The model a LoRA checkpoint's adapter restores into: the run's base (checked unchanged) in
    ``gcfg``'s numerics, grown to its vocabulary, with fresh adapters as the saved config made them."""
    from jaxgpt.config import LoRAConfig
    from jaxgpt.weights import load_pretrained, resize_token_embeddings

    folder = check_base(config.get("lora_base"), source)
    model, base_cfg = load_pretrained(folder, **gcfg.settings())
    if gcfg.vocab_size > base_cfg.vocab_size:
        model = resize_token_embeddings(model, gcfg.vocab_size)
    spec = LoRASpec.from_config(LoRAConfig(**config["lora"]))
    spec = dataclasses.replace(spec, base_name=config["lora_base"].get("name"), base_path=str(folder))
    model = apply(model, spec, base_vocab=base_cfg.vocab_size)
    model.eval()  # for inference: the adapters' dropout off, as the base's
    return model
