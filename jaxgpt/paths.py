"""Where a model's files are: a local folder, or a hub id fetched into the Hugging Face cache.

jax-free, so that the tokenizer, the config checks and the loader can name a path without
importing the model code.
"""

from __future__ import annotations

import os
from pathlib import Path

# Weight files in order of preference.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "flax_model.msgpack", "pytorch_model.bin")


class WeightsError(ValueError):
    """A model folder or hub id that cannot be found, or weights that cannot be read or do not fit the model."""


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``config.json`` and one of ``WEIGHT_FILES``. A jaxgpt training output_dir has
    a ``config.json`` too (the run's), beside its checkpoints, but no weights file."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def is_local_path(name: str) -> bool:
    """True if ``name`` can only mean a local path, never a hub id ("org/name"): it starts with
    ``.``, ``/`` or ``~``, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def missing_folder(name: str) -> str:
    """The one-line error for a local path that does not exist, naming what its parent holds."""
    parent = Path(name).expanduser().parent
    try:
        have = sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) if str(parent) != "." else None
    except OSError:  # no such parent, or not listable
        have = None
    if have is None:
        return f"{name}: no such folder"
    return f"{name}: no such folder (in {parent}/: {', '.join(have[:8]) + (', ...' if len(have) > 8 else '') or 'nothing'})"


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded into the HF cache (config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path}: expected a folder holding config.json and weights, got a file")
    name = str(name_or_path)
    if is_local_path(name):
        raise WeightsError(missing_folder(name))
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    aux = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
           "chat_template.jinja", "chat_template.json"]  # transformers 5 keeps the template in its own file
    try:
        for fname in WEIGHT_FILES:
            try:
                hf_hub_download(name, fname)
            except RemoteEntryNotFoundError:  # the repo exists but lacks this file
                continue
            patterns = aux + [fname] + (["model-*.safetensors"] if fname.endswith("index.json") else [])
            return Path(snapshot_download(name, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if Path(name.split("/")[0]).is_dir():  # runs/gpt2-chta: most likely a mistyped local folder
            raise WeightsError(f"{missing_folder(name)}, and the Hugging Face Hub could not provide it either "
                               f"({type(e).__name__})") from None
        raise WeightsError(
            f"{name}: not a local folder, and the Hugging Face Hub could not provide it "
            f"(offline or unknown repo?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    raise WeightsError(f"{name}: the hub repo has none of {', '.join(WEIGHT_FILES)}")
