"""One way in for a model to use: ``load_model(path_or_hub_id)`` -> ``Loaded``.

What a name means is decided here, and only here:

- a folder with ``config.json`` and weights (``jaxgpt.paths.is_hf_folder``): a Hugging Face folder;
- any other folder: a jaxgpt training run, its output_dir (the latest complete step) or one step
  dir (``load_for_inference``);
- anything else: a hub id, fetched into the Hugging Face cache (``jaxgpt.paths.resolve``, which
  names a file or a mistyped local folder instead), unless ``hub=False``.

sample, chat, export and serve load through it (``jaxgpt.sample.load_model`` gives the same, as a pair).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from transformers import PreTrainedTokenizerBase

from jaxgpt.decoding import DECODING_LAYOUTS, INT8_DECODING, for_decoding
from jaxgpt.model import GPT2, GPT2Config, abstract_model
from jaxgpt.paths import WEIGHT_FILES, absolute, WeightsError, check_remote, is_hf_folder, resolve, upath
from jaxgpt.tokenizer import has_tokenizer, load_tokenizer, stop_token_ids
from jaxgpt import lora, weights
from jaxgpt.peft_io import load_adapter

log = logging.getLogger("jaxgpt.loader")

MAX_STOP_IDS = 8  # jaxgpt.sample pads stop ids to this count, so the set never changes the compiled shape


class LoadError(ValueError):
    """A model cannot be loaded as asked (the path's own problems raise the checkpoint's or weights' error)."""


@dataclass(frozen=True)
class Loaded:
    model: GPT2
    tokenizer: PreTrainedTokenizerBase  # the source's own, else the vendored GPT-2 one
    kind: str  # "hf" (a local folder or a hub id) or "checkpoint" (a jaxgpt training run)
    folder: Path  # the HF folder (a hub id's cached snapshot) or the run / step folder read
    stop_ids: list[int]  # where generation ends (stop_ids_for)


def locate(path_or_hub_id: str | os.PathLike, *, hub: bool = True) -> tuple[str, Path]:
    """(kind, folder) of a source; nothing is read but folder listings (and the hub for a hub id)."""
    check_remote(path_or_hub_id)
    path = upath(path_or_hub_id)
    if path.is_dir():  # a training run's output_dir has its own config.json, but no weights
        if is_hf_folder(path):
            return "hf", resolve(path)  # a folder in a bucket: its local copy
        return "checkpoint", path
    if hub:
        return "hf", resolve(path_or_hub_id)
    return "checkpoint", path  # load_for_inference names a missing path or a file


def load_model(path_or_hub_id: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
               decoding: bool = True, hub: bool = True, adapter: str | os.PathLike | None = None,
               merge: bool = True) -> Loaded:
    """The model and its tokenizer from an HF folder, a hub id or a jaxgpt training checkpoint.

    ``decoding`` (for sampling): ``param_dtype`` "bfloat16", "int8" or "w8a8" gives the model in that
    decoding layout (``jaxgpt.decoding.for_decoding``; int8 and w8a8 quantised from the float32
    weights), and float32 on a CPU the float32 one (the same numbers, kernels stored [out, in],
    faster products). Such models sample and evaluate; they cannot be trained, saved or exported.
    ``decoding=False`` keeps the training layout (export). ``hub=False``: local sources only.
    ``adapter``: a PEFT LoRA folder to put on the model (its tokenizer, if it has one, replaces the
    model's). A LoRA model (an adapter, or a LoRA run's checkpoint) is merged into plain weights
    unless ``merge=False`` (export writes its adapter).
    """
    if param_dtype not in DECODING_LAYOUTS or (not decoding and param_dtype in INT8_DECODING):
        choices = DECODING_LAYOUTS if decoding else ("float32", "bfloat16")
        raise LoadError(f"param_dtype {param_dtype!r}: choose from {', '.join(choices)}")
    layout = None
    if decoding:
        on_cpu = jax.default_backend() == "cpu"
        layout = param_dtype if param_dtype != "float32" else "float32" if dtype == "float32" and on_cpu else None
    if layout in INT8_DECODING:
        param_dtype = "float32"  # quantised from the float32 weights
    kind, folder = locate(path_or_hub_id, hub=hub)
    if kind == "hf":
        model, _ = weights.load_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
        # The folder's own tokenizer (it may carry a chat template), else the vendored GPT-2 one.
        tokenizer = load_tokenizer(folder if has_tokenizer(folder) else None)
    else:
        model, tokenizer = _from_checkpoint(folder, dtype, param_dtype)
    if adapter is not None:  # onto the full-precision model, before any decoding layout
        model, tokenizer = with_adapter(model, adapter, str(path_or_hub_id), folder, tokenizer)
    if merge and getattr(model, "lora", None):
        model = lora.merged(model)
    elif layout and getattr(model, "lora", None):
        raise LoadError("a LoRA model (merge=False) has no decoding layout")
    if layout:
        model = for_decoding(model, layout)
    return Loaded(model, tokenizer, kind, folder, stop_ids_for(tokenizer, model, folder))


def with_adapter(model: GPT2, adapter: str | os.PathLike, base_name: str, base_folder: Path, tokenizer):
    """(``model`` with the PEFT LoRA adapter folder on it, the adapter's tokenizer if it has one)."""
    if not Path(adapter).is_dir():
        raise LoadError(f"--adapter {adapter}: no such folder")
    if getattr(model, "lora", None):
        raise LoadError(f"--adapter {adapter}: the model already carries LoRA adapters (a LoRA run's checkpoint)")
    own = has_tokenizer(adapter)  # its tokenizer sets the vocabulary (chat tokens); else the token rows it holds
    if own:
        tokenizer = load_tokenizer(adapter)
    model = load_adapter(model, adapter, len(tokenizer) if own else None)
    model.lora = dataclasses.replace(model.lora, base_name=base_name, base_path=str(base_folder))
    return model, tokenizer


def load_pretrained(name_or_path: str | os.PathLike, *, adapter: str | os.PathLike | None = None, **kwargs):
    """``jaxgpt.weights.load_pretrained``: (model, config) of an HF folder or hub id; with ``adapter``
    (a PEFT LoRA folder) the model carries it, unmerged (``jaxgpt.lora.merged`` folds it in)."""
    model, cfg = weights.load_pretrained(name_or_path, **kwargs)
    if adapter is None:
        return model, cfg
    model, _ = with_adapter(model, adapter, str(name_or_path), resolve(name_or_path), None)
    return model, model.config


def _from_checkpoint(folder: Path, dtype: str, param_dtype: str):
    from jaxgpt.checkpoint import NoCheckpointError  # orbax: imported for checkpoints only

    try:
        return load_for_inference(folder, dtype=dtype, param_dtype=param_dtype)
    except NoCheckpointError as e:
        if (folder / "config.json").is_file():  # the commands take an HF folder too: say why this is none
            raise NoCheckpointError(f"{e}; nor a Hugging Face model folder (config.json, but none of "
                                    f"{', '.join(WEIGHT_FILES)})") from None
        raise


# ----------------------------------------------------------------------------- training checkpoints

def load_for_inference(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None):
    """(GPT2, tokenizer) from a training output_dir (latest complete step) or a step dir.

    Restores the parameters only (no optimizer state) onto one device, cast to
    ``param_dtype`` (default: ``dtype``); dropout off, remat, attention and kernels
    "auto" (whatever this device and dtype run; training may have used cuDNN's). For an
    output_dir, an incomplete or corrupt latest step is reported and the
    previous one used.
    """
    from jaxgpt.checkpoint import CheckpointError, NonFiniteError

    step_dirs, explicit = _candidates(absolute(path))  # orbax needs absolute paths
    for step_dir in step_dirs:
        try:
            return _load_step(step_dir, dtype, param_dtype or dtype)
        except NonFiniteError:
            raise  # readable, but garbage: an older step is the user's choice to make, by naming it
        except CheckpointError as e:
            if explicit:
                raise
            log.warning("checkpoint is incomplete or corrupt: %s; using the previous one", e)
    raise CheckpointError(f"{path}: no complete jaxgpt checkpoint found (every step is incomplete or corrupt)")


def _load_step(step_dir: Path, dtype: str, param_dtype: str):
    from jaxgpt.checkpoint import (NonFiniteError, nonfinite_tensor, read_config, read_params, read_tokenizer,
                                   saved_steps)

    config = read_config(step_dir)
    cfg = model_config_from(config, str(step_dir / "config"))
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, dropout=0.0, remat="auto", attention="auto", kernels="auto")
    # The rest (dropout RNG streams) as a fresh init makes it; the parameters as shapes, to restore into.
    if (config.get("lora") or {}).get("rank"):  # a LoRA run saved its adapter: restored onto its base
        graphdef, abs_params, rest = nnx.split(lora.restore_target(config, cfg, str(step_dir)), nnx.Param, ...)
    else:
        graphdef, abs_params, rest = abstract_model(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.to_pure_dict(abs_params))
    pure = read_params(step_dir, abs_pure)
    bad = nonfinite_tensor(pure)
    if bad is not None:
        older = [s for s in saved_steps(step_dir.parent) if s < int(step_dir.name)] if step_dir.name.isdigit() else []
        raise NonFiniteError(f"{step_dir}: parameter {bad} holds NaN or infinity; this checkpoint is unusable"
                             + (f" (earlier steps: {', '.join(map(str, older))}; name one, e.g. "
                                f"{step_dir.parent / str(older[-1])})" if older else ""))
    nnx.replace_by_pure_dict(abs_params, pure)
    model = nnx.merge(graphdef, abs_params, rest)
    tokenizer = read_tokenizer(step_dir)
    if tokenizer is None:
        log.warning("%s has no tokenizer; using the vendored GPT-2 tokenizer", step_dir)
        tokenizer = load_tokenizer()
    return model, tokenizer


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """(step dirs to try, newest first; whether ``path`` named one step) for an output_dir, root or step dir."""
    from jaxgpt.checkpoint import CHECKPOINT_SUBDIR, STEP_METADATA_FILE, CheckpointError, NoCheckpointError, saved_steps

    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (training output_dir or a step dir), got a file")
    if (path / "params").is_dir() or (path / STEP_METADATA_FILE).exists():
        return [path], True
    root = path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path
    steps = saved_steps(root)[::-1]
    if not steps:
        raise NoCheckpointError(f"{path}: no jaxgpt checkpoint found (looked in {root})")
    return [root / str(s) for s in steps], False


def model_config_from(config: dict, source: str) -> GPT2Config:
    """The GPT2Config saved in a run config: ``config["model_config"]`` or the first dict holding its fields."""
    from jaxgpt.checkpoint import CheckpointError

    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    need = {"vocab_size", "n_embd", "n_layer", "n_head"}

    def find(d):
        if isinstance(d, dict):
            if need <= d.keys():
                return d
            for v in d.values():
                found = find(v)
                if found is not None:
                    return found
        return None

    raw = config.get("model_config") if isinstance(config.get("model_config"), dict) else find(config)
    if raw is None:
        raise CheckpointError(f"{source}: the saved config holds no GPT-2 model config (a dict with {sorted(need)})")
    try:
        return GPT2Config(**{k: v for k, v in raw.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad model config: {e}") from None


def folder_eos_ids(name_or_path: str | os.PathLike) -> list[int]:
    """Every ``eos_token_id`` an HF folder's ``config.json`` and ``generation_config.json`` list (a hub id's
    from the local cache only; a training run's folder has none)."""
    path = upath(name_or_path)
    if path.is_dir() and not is_hf_folder(path):
        return []
    ids: list[int] = []
    for fname in ("config.json", "generation_config.json"):
        if path.is_dir():
            f = path / fname
        else:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(str(name_or_path), fname)
            f = Path(hit) if isinstance(hit, str) else None
        if f is None or not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as e:
            raise WeightsError(f"{f}: cannot read eos_token_id: {e}") from None
        ids += [int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    return list(dict.fromkeys(ids))


def stop_ids_for(tokenizer, model: GPT2, source: str | os.PathLike | None = None) -> list[int]:
    """End-of-text and end-of-turn ids (EOS, ``<|im_end|>`` with ChatML) that the model can produce;
    with ``source`` (what was loaded) also every EOS id its ``config.json`` and
    ``generation_config.json`` list, where transformers' ``generate`` stops too."""
    ids = set(stop_token_ids(tokenizer)) | {model.config.eos_token_id}
    ids = sorted(i for i in ids if i is not None and 0 <= i < model.config.vocab_size)
    if source is not None:  # the folder's own, after these, up to what the decode loop takes
        extra = [i for i in folder_eos_ids(source) if i not in ids and 0 <= i < model.config.vocab_size]
        if len(ids) + len(extra) > MAX_STOP_IDS:
            log.warning("%s lists %d end-of-sequence ids; generation stops at the first %d: %s", source,
                        len(ids) + len(extra), MAX_STOP_IDS, (ids + extra)[:MAX_STOP_IDS])
        ids = sorted((ids + extra)[:MAX_STOP_IDS])
    return ids
