"""PEFT's adapter folder, both ways, without torch: ``adapter_config.json`` + ``adapter_model.safetensors``.

GPT-2's projections are ``Conv1D`` in transformers, so PEFT writes ``fan_in_fan_out: true`` and keys
``base_model.model.transformer.h.N.attn.c_attn.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]
(``y += scaling * x A^T B^T``): jaxgpt's ``lora_a`` [*in, r] is ``A^T``, ``lora_b`` [r, *out] is ``B^T``.
Tokens added to the base vocabulary travel as PEFT's ``trainable_token_indices`` (their rows, in
``transformer.wte.token_adapter.trainable_tokens_delta``; PEFT ties them into the head), for a base
resized to the tokenizer (``model.resize_token_embeddings(len(tokenizer))``). A key without the
``base_model.model.`` prefix is one PEFT would skip with a warning, leaving that adapter at zero: the
reader here refuses it, naming the key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from jaxgpt.config import LORA_PROJECTIONS
from jaxgpt.lora import GrownEmbedding, LoRAError, LoRALinear, LoRASpec, apply
from jaxgpt.model import GPT2

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TOKENS_KEY = PREFIX + "transformer.wte.token_adapter.trainable_tokens_delta"
_KEY = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight")
# PEFT settings that change what the tensors mean: refused unless at their no-op value.
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layer_replication": (None,),
                "lora_bias": (False, None), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
                "target_parameters": (None, [])}


def _target_modules(targets: tuple[str, ...]) -> list[str]:
    """PEFT's ``target_modules`` for jaxgpt's projections (module-name suffixes, as PEFT matches them)."""
    names = []
    for p in targets:
        short = p.split(".")[1]
        both_c_proj = short == "c_proj" and {"attn.c_proj", "mlp.c_proj"} <= set(targets)
        names.append(short if short != "c_proj" or both_c_proj else p)
    return sorted(set(names))


def adapter_config(spec: LoRASpec, base_name_or_path: str | None, token_indices: list[int]) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path,
        "auto_mapping": None, "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": _target_modules(spec.targets), "fan_in_fan_out": True, "bias": "none",
        "use_rslora": spec.rslora, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "trainable_token_indices": token_indices or None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def to_peft(model: GPT2, base_name_or_path: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT-named float32 tensors, adapter_config.json contents) of a LoRA model (``jaxgpt.lora.apply``)."""
    spec = model.lora
    tensors = {}
    for i, block in enumerate(model.h):
        for target in spec.targets:
            owner, name = target.split(".")
            lin = getattr(getattr(block, owner), name)
            a, b = (np.asarray(m, np.float32) for m in lin._ab(np.float32))
            key = f"{PREFIX}transformer.h.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)
    indices = []
    if isinstance(model.wte, GrownEmbedding):
        first, end = model.wte.base_rows, model.config.vocab_size
        indices = list(range(first, end))
        tensors[TOKENS_KEY] = np.asarray(model.wte.added[...], np.float32)[: end - first]
    return tensors, adapter_config(spec, base_name_or_path, indices)


def save_adapter(model: GPT2, out_dir: str | os.PathLike, tokenizer=None, base_name_or_path: str | None = None) -> Path:
    """Write PEFT's adapter folder (and the tokenizer with its chat template) for ``model``'s adapters."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, config = to_peft(model, base_name_or_path)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------- reading

def read_adapter(folder: str | os.PathLike, n_layer: int) -> tuple[LoRASpec, dict, dict[int, np.ndarray]]:
    """(spec, {(layer, projection): (A [r, in], B [out, r])}, {token id: embedding row}) of a PEFT LoRA
    folder, every setting and key checked; LoRAError names the file and key of anything jaxgpt cannot apply."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise LoRAError(f"{folder}: no {CONFIG_FILE}; not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise LoRAError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{cfg_file}: peft_type={cfg.get('peft_type')!r}; jaxgpt loads LoRA adapters only")
    for key, fine in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in fine:
            raise LoRAError(f"{cfg_file}: {key}={cfg[key]!r} is not supported by jaxgpt (plain LoRA only)")
    base_class = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if base_class not in (None, "GPT2LMHeadModel", "GPT2Model"):
        raise LoRAError(f"{cfg_file}: an adapter for {base_class}; jaxgpt adapts GPT-2 only")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise LoRAError(f"{cfg_file}: {key} is missing or not a positive number ({cfg.get(key)!r})")
    if not weights_file.is_file():
        raise LoRAError(f"{folder}: no {WEIGHTS_FILE} (jaxgpt reads safetensors adapters)")
    pairs: dict = {}
    tokens = None
    for key, value in load_file(str(weights_file)).items():
        if key == TOKENS_KEY:
            tokens = value
            continue
        m = _KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if m is None:
            raise LoRAError(f"{weights_file}: tensor {key!r} is not a GPT-2 LoRA weight "
                            f"({PREFIX}transformer.h.N.attn.c_attn.lora_A.weight, ...)")
        layer, target, which = int(m[1]), m[2], m[3]
        if layer >= n_layer:
            raise LoRAError(f"{weights_file}: tensor {key!r} is for layer {layer}; the base has {n_layer} layers")
        pairs.setdefault((layer, target), {})[which] = value.astype(np.float32)
    for (layer, target), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{weights_file}: transformer.h.{layer}.{target} has lora_{'AB'[len(ab) == 1 and 'A' in ab]}"
                            f" but not its pair")
        if ab["A"].shape[0] != cfg["r"] or ab["B"].shape[1] != cfg["r"]:
            raise LoRAError(f"{weights_file}: transformer.h.{layer}.{target}: shapes {ab['A'].shape}, {ab['B'].shape} "
                            f"do not have rank r={cfg['r']} ({cfg_file})")
    if not pairs:
        raise LoRAError(f"{weights_file}: holds no LoRA weights")
    rows = {}
    if tokens is not None:
        indices = cfg.get("trainable_token_indices")
        indices = indices.get("wte", indices.get("transformer.wte")) if isinstance(indices, dict) else indices
        if not isinstance(indices, list) or len(indices) != tokens.shape[0]:
            raise LoRAError(f"{cfg_file}: trainable_token_indices does not list the {tokens.shape[0]} rows of {TOKENS_KEY}")
        rows = {int(i): tokens[j].astype(np.float32) for j, i in enumerate(indices)}
    targets = tuple(p for p in LORA_PROJECTIONS if any(t == p for _, t in pairs))
    spec = LoRASpec(int(cfg["r"]), float(cfg["lora_alpha"]), targets, 0.0, bool(cfg.get("use_rslora", False)))
    return spec, {k: (v["A"], v["B"]) for k, v in pairs.items()}, rows


def load_adapter(model: GPT2, folder: str | os.PathLike, vocab_size: int | None = None) -> GPT2:
    """``model`` (a plain GPT2, in place) with the PEFT adapter in ``folder`` on it, for inference.

    Layers the adapter leaves out (PEFT's ``layers_to_transform``) get zero adapters. Token rows it
    carries (``trainable_token_indices``) replace the base's, the vocabulary first grown to
    ``vocab_size`` (the adapter's tokenizer) or past the largest such index.
    """
    import jax.numpy as jnp

    from jaxgpt.weights import resize_token_embeddings

    cfg = model.config
    spec, pairs, rows = read_adapter(folder, cfg.n_layer)
    grow = max([vocab_size or 0, *(i + 1 for i in rows)])
    if grow > cfg.vocab_size:
        model = resize_token_embeddings(model, grow)
    apply(model, spec)
    where = Path(folder) / WEIGHTS_FILE
    for i, block in enumerate(model.h):
        for target in spec.targets:
            owner, name = target.split(".")
            lin: LoRALinear = getattr(getattr(block, owner), name)
            a, b = pairs.get((i, target), (None, None))
            n_out = lin.lora_b.size // spec.rank
            if a is None:
                a, b = np.zeros((spec.rank, lin.base.n_in), np.float32), np.zeros((n_out, spec.rank), np.float32)
            if a.shape != (spec.rank, lin.base.n_in) or b.shape != (n_out, spec.rank):
                raise LoRAError(f"{where}: transformer.h.{i}.{target}: lora_A {a.shape} / lora_B {b.shape}, but this "
                                f"base needs {(spec.rank, lin.base.n_in)} / {(n_out, spec.rank)} (an adapter for "
                                f"another model size)")
            lin.lora_a[...] = jnp.asarray(a.T.reshape(lin.lora_a.shape), lin.lora_a.dtype)
            lin.lora_b[...] = jnp.asarray(b.T.reshape(lin.lora_b.shape), lin.lora_b.dtype)
    if rows:
        table = np.stack(list(rows.values()))
        if table.shape[1] != cfg.n_embd:
            raise LoRAError(f"{where}: {TOKENS_KEY} has rows of width {table.shape[1]}, but this base's is {cfg.n_embd}")
        wte = model.wte[...]
        model.wte[...] = wte.at[jnp.asarray(list(rows))].set(jnp.asarray(table, wte.dtype))
    return model

