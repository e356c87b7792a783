"""Hugging Face GPT-2 weights in and out: ``load_pretrained`` / ``save_pretrained``.

HF PyTorch GPT-2 uses ``Conv1D`` layers whose weights are stored ``[in, out]``,
which is already ``x @ W`` order, so every jaxgpt parameter is a plain reshape
of its HF tensor (heads get their own axis). HF's old Flax checkpoints
(``flax_model.msgpack``) store kernels ``[out, in]``: those are transposed.
``lm_head.weight`` is tied to ``wte`` and never stored separately.

GPT-2 variants that jaxgpt's model does not compute are refused with the config key,
never loaded as something else: an untied head (``tie_word_embeddings=false``, or a
stored ``lm_head.weight`` that differs from ``wte``), ``scale_attn_weights=false``,
``scale_attn_by_inverse_layer_idx`` and ``reorder_and_upcast_attn``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import DTYPES, GPT2, GPT2Config, abstract_model
from jaxgpt.paths import WEIGHT_FILES, WeightsError, resolve


# HF name (without the "transformer." prefix) -> jaxgpt parameter path. "{i}" is the layer.
HF_TO_JAXGPT = {
    "wte.weight": "wte",
    "wpe.weight": "wpe",
    "ln_f.weight": "ln_f.scale",
    "ln_f.bias": "ln_f.bias",
}
HF_LAYER_TO_JAXGPT = {
    "h.{i}.ln_1.weight": "h.{i}.ln_1.scale",
    "h.{i}.ln_1.bias": "h.{i}.ln_1.bias",
    "h.{i}.attn.c_attn.weight": "h.{i}.attn.c_attn.kernel",  # [E, 3E] -> [E, 3, H, D]
    "h.{i}.attn.c_attn.bias": "h.{i}.attn.c_attn.bias",  # [3E] -> [3, H, D]
    "h.{i}.attn.c_proj.weight": "h.{i}.attn.c_proj.kernel",  # [E, E] -> [H, D, E]
    "h.{i}.attn.c_proj.bias": "h.{i}.attn.c_proj.bias",
    "h.{i}.ln_2.weight": "h.{i}.ln_2.scale",
    "h.{i}.ln_2.bias": "h.{i}.ln_2.bias",
    "h.{i}.mlp.c_fc.weight": "h.{i}.mlp.c_fc.kernel",
    "h.{i}.mlp.c_fc.bias": "h.{i}.mlp.c_fc.bias",
    "h.{i}.mlp.c_proj.weight": "h.{i}.mlp.c_proj.kernel",
    "h.{i}.mlp.c_proj.bias": "h.{i}.mlp.c_proj.bias",
}
# Present in some HF files but not parameters (causal-mask buffers, the tied head).
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

# HF config keys jaxgpt reads; everything else in config.json is ignored.
ARCH_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
             "layer_norm_epsilon", "activation_function", "bos_token_id", "eos_token_id")


def name_map(cfg: GPT2Config) -> dict[str, str]:
    """Every HF tensor name of a GPT-2 with this config -> its jaxgpt parameter path."""
    out = dict(HF_TO_JAXGPT)
    for i in range(cfg.n_layer):
        out.update({k.format(i=i): v.format(i=i) for k, v in HF_LAYER_TO_JAXGPT.items()})
    return out


def hf_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The shape transformers' GPT2LMHeadModel gives each tensor of this config."""
    e, i = cfg.n_embd, cfg.inner_dim
    shapes = {"wte.weight": (cfg.vocab_size, e), "wpe.weight": (cfg.n_positions, e),
              "ln_f.weight": (e,), "ln_f.bias": (e,)}
    per_layer = {"ln_1.weight": (e,), "ln_1.bias": (e,), "attn.c_attn.weight": (e, 3 * e),
                 "attn.c_attn.bias": (3 * e,), "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
                 "ln_2.weight": (e,), "ln_2.bias": (e,), "mlp.c_fc.weight": (e, i), "mlp.c_fc.bias": (i,),
                 "mlp.c_proj.weight": (i, e), "mlp.c_proj.bias": (e,)}
    for n in range(cfg.n_layer):
        shapes.update({f"h.{n}.{k}": v for k, v in per_layer.items()})
    return shapes


# ----------------------------------------------------------------------------- config

def config_from_hf(config_path: str | os.PathLike, **overrides) -> GPT2Config:
    path = Path(config_path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type != "gpt2":
        raise WeightsError(f"{path}: model_type is {model_type!r}, but jaxgpt only loads GPT-2 (model_type 'gpt2')")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(key):
            raise WeightsError(f"{path}: {key}=true is not supported by jaxgpt")
    if raw.get("scale_attn_weights", True) is False:
        raise WeightsError(f"{path}: scale_attn_weights=false is not supported by jaxgpt (it always scales "
                           f"attention scores by 1/sqrt(head_dim), as GPT-2 does)")
    if raw.get("tie_word_embeddings", True) is False:
        raise WeightsError(f"{path}: tie_word_embeddings=false (a separate lm_head) is not supported by jaxgpt, "
                           f"whose output head is the token embedding wte, as in GPT-2")
    kw = {k: raw[k] for k in ARCH_KEYS if k in raw and raw[k] is not None}
    for key in ("bos_token_id", "eos_token_id"):  # some configs list several; the first is the model's own
        if isinstance(kw.get(key), list):
            ids = kw.pop(key)
            if ids:
                kw[key] = ids[0]
    if "n_positions" not in kw and "n_ctx" in raw:
        kw["n_positions"] = raw["n_ctx"]
    kw.update(overrides)
    try:
        return GPT2Config(**kw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: {e}") from None


def config_to_hf(cfg: GPT2Config) -> dict:
    """config.json contents for transformers' GPT2LMHeadModel (dropout off, tied head)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        **{k: getattr(cfg, k) for k in ARCH_KEYS},
        "n_ctx": cfg.n_positions, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        "summary_first_dropout": 0.1, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "dtype": "float32",
    }


# ----------------------------------------------------------------------------- reading files

def _strip(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def _read_safetensors_index(path: Path) -> dict[str, np.ndarray]:
    try:
        index = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"{path}: not a safetensors index (needs a 'weight_map'): {e}") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index.values())):
        shard_path = path.parent / shard
        if not shard_path.exists():
            raise WeightsError(f"{path}: names shard {shard!r}, which is missing from {path.parent}")
        tensors.update(_read_safetensors(shard_path))
    return tensors


def _read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types for a bad file
        raise WeightsError(f"{path}: cannot read Flax msgpack file (truncated or corrupt?): {e}") from None
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(tree).items()}
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        leaf = parts[-1]
        if leaf == "kernel":  # Flax Dense: [out, in] as HF's Flax GPT-2 stored it -> Conv1D [in, out]
            value, leaf = value.T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join(parts[:-1] + [leaf])] = value
    return out


def _flatten(tree, prefix=()):
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading pytorch_model.bin needs torch; convert it to safetensors or install torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        raise WeightsError(f"{path}: cannot read PyTorch file (truncated or corrupt, or not loadable with weights_only=True?): {e}") from None
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


READERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "model.safetensors.index.json": _read_safetensors_index,
    "model.safetensors": _read_safetensors,
    "flax_model.msgpack": _read_flax_msgpack,
    "pytorch_model.bin": _read_torch_bin,
}


def read_hf_tensors(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], Path]:
    """All tensors of the preferred weight file in ``folder``, keyed by HF name without prefix."""
    folder = Path(folder)
    for fname in WEIGHT_FILES:
        if (folder / fname).exists():
            raw = READERS[fname](folder / fname)
            return {_strip(k): v for k, v in raw.items()}, folder / fname
    raise WeightsError(f"{folder}: no GPT-2 weights found (looked for {', '.join(WEIGHT_FILES)})")


# ----------------------------------------------------------------------------- load / save

def tensors_to_state(cfg: GPT2Config, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """HF-named numpy tensors -> {jaxgpt path: array in jaxgpt's shape}, with full checking."""
    names, shapes = name_map(cfg), hf_shapes(cfg)
    unexpected = [k for k in tensors if k not in names and not k.endswith(IGNORED_HF_SUFFIXES)]
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensors for a {cfg.n_layer}-layer GPT-2: {', '.join(sorted(unexpected)[:8])}")
    missing = [k for k in names if k not in tensors]
    if missing:
        raise WeightsError(f"{source}: missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise WeightsError(f"{source}: lm_head.weight differs from wte.weight; jaxgpt's output head is tied to "
                           f"the token embedding, as in GPT-2, so this untied model cannot be loaded")
    out = {}
    for hf_name, path in names.items():
        value = tensors[hf_name]
        if tuple(value.shape) != shapes[hf_name]:
            raise WeightsError(
                f"{source}: tensor {hf_name} has shape {tuple(value.shape)}, but the config expects {shapes[hf_name]}"
            )
        out[path] = value
    return out


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    vocab_multiple: int = 1,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    **config_overrides,
) -> tuple[GPT2, GPT2Config]:
    """Load a GPT-2 from a hub id or a local HF folder.

    ``place(path, array)`` puts each parameter on its devices (default: the
    default device); ``jaxgpt.sharding`` passes one that writes straight into
    shards, so no full copy is ever made on one device.
    """
    folder = resolve(name_or_path)
    cfg = config_from_hf(folder / "config.json", dtype=dtype, param_dtype=param_dtype,
                         vocab_multiple=vocab_multiple, **config_overrides)
    tensors, source = read_hf_tensors(folder)
    model = from_hf_tensors(cfg, tensors, source=str(source), place=place)
    return model, cfg


def from_hf_tensors(cfg: GPT2Config, tensors: dict[str, np.ndarray], *, source: str = "checkpoint",
                    place: Callable[[str, np.ndarray], jax.Array] | None = None) -> GPT2:
    graphdef, abstract, rest = abstract_model(cfg)
    return nnx.merge(graphdef, params_from_hf(cfg, tensors, abstract, source=source, place=place), rest)


def grown_embedding(wte, vocab_size: int, new_size: int, padded_size: int | None = None):
    """The first ``vocab_size`` rows of ``wte`` (numpy or jax) and ``new_size - vocab_size`` more at
    their mean, then zero rows up to ``padded_size``: ``resize_token_embeddings``' rule, so the added
    (chat) tokens' logits start at the average, not at random."""
    if new_size < vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {vocab_size} to {new_size}")
    xp = jnp if isinstance(wte, jax.Array) else np
    real = wte[:vocab_size]
    rows = [real, xp.repeat(real.mean(0, keepdims=True), new_size - vocab_size, 0)]
    if padded_size is not None:
        rows.append(xp.zeros((padded_size - new_size, wte.shape[1]), wte.dtype))
    return xp.concatenate(rows)


def grow_vocab(cfg: GPT2Config, tensors: dict[str, np.ndarray], vocab_size: int, source: str = "checkpoint"
               ) -> tuple[dict[str, np.ndarray], GPT2Config]:
    """(tensors, config) with ``vocab_size`` token rows (``grown_embedding``), on the host arrays before
    any model is built. The tensors are checked against ``cfg`` (the checkpoint's own) first."""
    tensors_to_state(cfg, tensors, source)
    grown = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # tied to wte: checked equal above
    grown["wte.weight"] = grown_embedding(tensors["wte.weight"].astype(np.float32, copy=False), cfg.vocab_size,
                                          vocab_size)
    return grown, cfg.replace(vocab_size=vocab_size)


def resize_token_embeddings(model: GPT2, vocab_size: int) -> GPT2:
    """A copy of ``model`` with ``vocab_size`` real token rows (``grown_embedding``), padded as its config pads."""
    cfg = model.config
    new_cfg = cfg.replace(vocab_size=vocab_size)
    old = nnx.state(model)
    new_wte = grown_embedding(old["wte"][...], cfg.vocab_size, vocab_size, new_cfg.padded_vocab_size)
    # Left where jax puts it (on a mesh: replicated). Placing it is the caller's job: the old layout
    # may not divide the new row count (jaxgpt.setup.build_model places it by the sharding rules).
    old["wte"] = old["wte"].replace(new_wte)
    return nnx.merge(abstract_model(new_cfg)[0], old)


def params_from_hf(cfg: GPT2Config, tensors: dict[str, np.ndarray], abstract: nnx.State, *,
                   source: str = "checkpoint", place: Callable[[str, np.ndarray], jax.Array] | None = None
                   ) -> nnx.State:
    """The parameters (``abstract``: ``abstract_model(cfg)``'s) filled from HF tensors, each put on
    its devices by ``place(path, array)``."""
    hf_state = tensors_to_state(cfg, tensors, source)
    pdtype = DTYPES[cfg.param_dtype]
    place = place or (lambda _path, x: jax.device_put(x))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        key = ".".join(str(p) for p in path)
        value = np.asarray(hf_state[key])
        if key == "wte" and value.shape[0] < var.shape[0]:  # padded vocab rows: zeros, masked from logits
            value = np.concatenate([value, np.zeros((var.shape[0] - value.shape[0], value.shape[1]), value.dtype)])
        value = value.reshape(var.shape).astype(pdtype, copy=False)  # place() copies it onto its devices
        flat.append((path, var.replace(place(key, value))))
    return nnx.from_flat_state(flat)


def to_hf_tensors(model: GPT2, dtype: str | None = None) -> dict[str, np.ndarray]:
    """{HF name: numpy array in HF's shape}; padded vocab rows dropped. Gathers shards."""
    if model.decoding_layout:
        raise ValueError("this model is in the decoding layout (jaxgpt.decoding.for_decoding, e.g. loaded with "
                         "param_dtype='bfloat16', 'int8' or 'w8a8' for sampling): save or export the model it was made from")
    cfg = model.config
    shapes = hf_shapes(cfg)
    params = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for hf_name, path in name_map(cfg).items():
        arr = params[path][...]
        if not arr.is_fully_addressable:
            from jax.experimental import multihost_utils
            arr = multihost_utils.process_allgather(arr, tiled=True)
        value = np.asarray(jax.device_get(arr))
        if hf_name == "wte.weight":
            value = value[: cfg.vocab_size]
        value = value.reshape(shapes[hf_name])
        if dtype is not None:
            value = value.astype(DTYPES[dtype])
        out["transformer." + hf_name] = np.ascontiguousarray(value)
    return out


def save_pretrained(model: GPT2, out_dir: str | os.PathLike, tokenizer=None, *, dtype: str | None = None,
                    generation_config: dict | None = None) -> Path:
    """Write an HF folder that ``GPT2LMHeadModel.from_pretrained(out_dir)`` loads."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    tensors = to_hf_tensors(model, dtype)  # collective on multi-host: every process calls it
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    (out_dir / "model.safetensors").chmod(0o666 & ~umask)  # safetensors writes 0600; the other files follow the umask
    hf_cfg = config_to_hf(model.config)
    if dtype is not None:
        hf_cfg["dtype"] = dtype
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    gen.update(generation_config or {})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        if tokenizer.pad_token_id is not None:
            hf_cfg["pad_token_id"] = gen.setdefault("pad_token_id", tokenizer.pad_token_id)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir
