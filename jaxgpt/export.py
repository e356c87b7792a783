"""Export a jaxgpt checkpoint to a Hugging Face PyTorch folder, and prove it.

    python -m jaxgpt.export --checkpoint OUTPUT_DIR[/STEP] --out HF_DIR \
        [--dtype float32|bfloat16] [--merge] [--adapter PEFT_DIR] [--push-to-hub USER/REPO]

A LoRA run (``lora.rank`` > 0) exports as a PEFT adapter folder (``jaxgpt.peft_io``; checked
by ``PeftModel`` on the base), or with ``--merge`` as the full merged model; ``--adapter`` puts
a PEFT adapter on an HF source first.

The folder holds ``model.safetensors`` (padded vocab rows stripped, added chat
tokens kept), ``config.json``, ``generation_config.json`` (end-of-turn
``<|im_end|>`` and ``<|endoftext|>`` both stop generation) and the tokenizer
with its chat template, so ``pipeline("text-generation", HF_DIR)`` chats.

The source (read by ``jaxgpt.loader``) may be a training output dir (latest step), one step
dir (any mesh: restored onto one device), or an HF GPT-2 folder
(re-export, e.g. to bfloat16). The folder is written next to ``--out`` first
and only moved into place once transformers' ``GPT2LMHeadModel`` loads it and
its logits match jaxgpt's (max abs diff and top-k agreement are printed).

``--out`` is never the source run, a folder holding it, a folder among its checkpoints or
the current folder, and ``--overwrite`` replaces only an earlier export: never a folder
holding checkpoints or metrics.

Without torch (it is not a dependency of jaxgpt) the written safetensors are read
back into jaxgpt's model instead, and the line says which check ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import compile_cache, lora
from jaxgpt.inputs import Range
from jaxgpt.model import GPT2
from jaxgpt.loader import load_model
from jaxgpt.paths import check_remote, descendants, is_hf_folder, is_url, upath, upload_folder
from jaxgpt.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from jaxgpt.tokenizer import end_of_turn_id
from jaxgpt.weights import load_pretrained, save_pretrained

# Verification prompts: a chat turn (when the tokenizer has a template) and plain text.
CHECK_CHATS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What can you do?"}, {"role": "assistant", "content": "I can answer questions."},
     {"role": "user", "content": "Can I load you in PyTorch?"}],
]
CHECK_TEXTS = ["The quick brown fox jumps over the lazy dog.", "JAX and PyTorch"]


class ExportError(ValueError):
    """The checkpoint cannot be exported, or the exported folder does not match it."""


@dataclass
class Check:
    reference: str  # what computed the exported folder's logits
    max_abs_diff: float
    tolerance: float
    top1_agreement: float  # fraction of positions whose argmax agrees
    topk_overlap: float  # mean |top-k(jax) & top-k(torch)| / k at each prompt's last position
    k: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        return (f"check vs {self.reference}: max |logits diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e}), "
                f"top-1 agreement {self.top1_agreement:.1%}, top-{self.k} overlap {self.topk_overlap:.1%}")


# ----------------------------------------------------------------------------- loading

def load_source(path: str | Path, adapter: str | Path | None = None):
    """(model in float32, training layout; tokenizer) from an HF folder or a jaxgpt checkpoint; a LoRA
    run's model (or the HF model with ``adapter`` on it) keeps its adapters unmerged."""
    loaded = load_model(path, decoding=False, hub=False, adapter=adapter, merge=False)
    if loaded.kind == "hf":  # a checkpoint's are checked as it is read; not a "logits mismatch" later: name the tensor
        from jaxgpt.checkpoint import nonfinite_tensor

        bad = nonfinite_tensor(nnx.state(loaded.model, nnx.Param))
        if bad is not None:
            raise ExportError(f"{path}: parameter {bad} holds NaN or infinity; nothing exported")
    return loaded.model, loaded.tokenizer


def generation_config(tok) -> dict:
    """Stop at end-of-turn (chat; listed first) and at end-of-text (plain LM use)."""
    eos = list(dict.fromkeys(i for i in (end_of_turn_id(tok), tok.eos_token_id) if i is not None))
    gen = {"eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None)}
    if tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    return {k: v for k, v in gen.items() if v is not None}


# ----------------------------------------------------------------------------- verification

def check_prompts(tok, n_positions: int) -> list[list[int]]:
    prompts = []
    if getattr(tok, "chat_template", None):
        for msgs in CHECK_CHATS:
            prompts.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]))
    prompts += [tok(t)["input_ids"] for t in CHECK_TEXTS]
    return [p[:n_positions] for p in prompts if p]


def rounded(model: GPT2, dtype: str) -> GPT2:
    """``model`` with its parameters rounded to ``dtype`` and back: what the exported file holds."""
    if dtype == "float32":
        return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(dtype).astype(jnp.float32), params)
    return nnx.merge(graphdef, params, rest)


def verify(model: GPT2, hf_dir: Path, tok, *, dtype: str = "float32", atol: float = 1e-3, rtol: float = 1e-5,
           k: int = 5) -> Check:
    """Logits of the folder ``hf_dir`` vs jaxgpt's ``model`` (both float32 maths). The folder runs in
    transformers' GPT2LMHeadModel where torch is installed; without torch, jaxgpt reads it back
    (config.json and model.safetensors), which proves the file, not transformers' reading of it.

    Tolerance = atol + rtol * max|logit|: float32 matmuls in XLA and in torch
    sum in different orders, so differences grow with the logits' scale. jaxgpt's side runs
    with float32 matmul precision: on a GPU, jax's default lets float32 matmuls run in TF32,
    which puts the logits outside the tolerance.
    """
    if torch_installed():
        reference, exported = "transformers GPT2LMHeadModel", _torch_logits(hf_dir)
    else:
        reference = "the written safetensors re-read by jaxgpt (no torch)"
        exported = _jax_logits(load_pretrained(hf_dir)[0])  # float32, unpadded vocab, as transformers holds it
    return _compare(model, _jax_logits(rounded(model, dtype)), exported, reference, tok, atol, rtol, k)


def verify_adapter(model: GPT2, folder: Path, tok, *, atol: float = 1e-3, rtol: float = 1e-5, k: int = 5) -> Check:
    """Logits of PEFT's ``PeftModel`` with the adapter folder on the base (resized to the tokenizer)
    vs jaxgpt's LoRA ``model``, after checking that PEFT loaded every saved tensor as written (a key it
    skips leaves that adapter at zero). Without torch and peft, jaxgpt reads the folder back onto the
    base instead: its reader refuses any key PEFT would skip."""
    spec = model.lora
    if torch_installed() and importlib.util.find_spec("peft") is not None:
        reference, exported = "peft PeftModel on GPT2LMHeadModel", _peft_logits(folder, spec.base_path, model.config.vocab_size)
    else:
        reference = "the written adapter re-read by jaxgpt onto its base (no torch / peft)"
        base = load_pretrained(spec.base_path)[0]
        exported = _jax_logits(load_adapter(base, folder, model.config.vocab_size))
    return _compare(model, _jax_logits(model), exported, reference, tok, atol, rtol, k)


def _compare(model, jaxgpt_logits, exported, reference, tok, atol, rtol, k) -> Check:
    diffs, scale, top1, overlap = [], 0.0, [], []
    for ids in check_prompts(tok, model.config.n_positions):
        ours, theirs = jaxgpt_logits(ids), exported(ids)
        diffs.append(float(np.abs(ours - theirs).max()))
        scale = max(scale, float(np.abs(theirs).max()))
        top1.append(ours.argmax(-1) == theirs.argmax(-1))
        a, b = set(np.argsort(-ours[-1])[:k]), set(np.argsort(-theirs[-1])[:k])
        overlap.append(len(a & b) / k)
    return Check(reference, max(diffs), atol + rtol * scale, float(np.concatenate(top1).mean()),
                 float(np.mean(overlap)), k)


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_logits(hf_dir: Path):
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_model = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch_model(torch.tensor([ids])).logits[0].numpy()
    return logits


def _peft_logits(folder: Path, base_path: str, vocab_size: int):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = GPT2LMHeadModel.from_pretrained(base_path, dtype=torch.float32)
    if vocab_size > base.config.vocab_size:  # the chat tokens' rows come from the adapter
        base.resize_token_embeddings(vocab_size, mean_resizing=False)
    try:
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    except Exception as e:  # noqa: BLE001 - whatever PEFT raises, the folder is not what PEFT loads
        raise ExportError(f"{folder}: PEFT cannot load it ({type(e).__name__}: {e}); nothing exported") from e
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    for key, value in load_file(str(folder / WEIGHTS_FILE)).items():
        if key not in loaded or not np.array_equal(loaded[key].numpy(), value):
            raise ExportError(f"{folder / WEIGHTS_FILE}: PEFT did not load tensor {key} as written; nothing exported")

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return peft_model(torch.tensor([ids])).logits[0].numpy()
    return logits


def _jax_logits(model: GPT2):
    """``ids -> logits`` of a jaxgpt model in float32 matmuls, compiled once per prompt length
    (run op by op, each prompt compiled hundreds of small programs)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))

    def logits(ids: list[int]) -> np.ndarray:
        with jax.default_matmul_precision("float32"):
            return np.asarray(forward(state, jnp.asarray([ids], jnp.int32)))[0]
    return logits


# ----------------------------------------------------------------------------- where the folder goes

def _holds_run(folder: Path) -> Path | None:
    """The first checkpoint folder, step or metrics file under ``folder``: what --overwrite must never delete."""
    from jaxgpt.checkpoint import CHECKPOINT_SUBDIR, STEP_METADATA_FILE

    for path in (folder, *descendants(folder)):
        if path.name in (CHECKPOINT_SUBDIR, STEP_METADATA_FILE, "metrics.jsonl"):
            return path
    return None


def source_run(source: Path) -> Path:
    """The training run folder a checkpoint belongs to (``RUN`` for ``RUN/checkpoints/STEP``), else ``source``."""
    from jaxgpt.checkpoint import CHECKPOINT_SUBDIR

    if source.parent.name == CHECKPOINT_SUBDIR and not (source / CHECKPOINT_SUBDIR).is_dir():
        return source.parent.parent  # a step dir
    if source.name == CHECKPOINT_SUBDIR:
        return source.parent
    return source


def check_out(checkpoint: str | Path, out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """(``out``, its staging folder beside it), absolute, once export may write them; ExportError otherwise.

    Everything is written to the staging folder and moved into ``out`` only when verified (a failed
    export never replaces a good folder), so neither may be or hold the source run, nor lie among its
    checkpoints (``RUN/hf`` is fine, as the demo writes it); ``--overwrite`` replaces only an earlier
    export, never a folder holding checkpoints or metrics.
    """
    from jaxgpt.checkpoint import CHECKPOINT_SUBDIR

    given = out
    for path in (checkpoint, out):
        check_remote(path)
    # A folder in a bucket is written locally first (a temporary staging folder) and uploaded when verified.
    out = upath(out) if is_url(out) else Path(out).expanduser().resolve()
    if not is_url(out) and (out == Path.cwd() or out in Path.cwd().parents):  # `--out .` would replace the folder the user is in
        raise ExportError(f"--out {given}: is the current folder{'' if out == Path.cwd() else ' or holds it'}; "
                          "export writes a new folder and moves it into place: name one, e.g. --out hf")
    staging = (Path(tempfile.mkdtemp(prefix="jaxgpt-export-")) / out.name if is_url(out)
               else out.with_name(out.name + ".partial"))
    source = upath(checkpoint) if is_url(checkpoint) else Path(checkpoint).expanduser().resolve()
    run = source_run(source)
    inside = {run / CHECKPOINT_SUBDIR, source} - {run}
    for folder in (out, staging):
        how = "is" if folder == run else "holds" if folder in run.parents else None
        if how is None and any(folder == f or f in folder.parents for f in inside):
            how = "lies among the checkpoints of"
        if how:
            raise ExportError(f"--out {given}: {folder} {how} the source {run}; export into a new folder, "
                              f"e.g. {run}-hf")
    if out.exists() and not out.is_dir():  # --overwrite replaces a folder, never a file
        raise ExportError(f"{given}: is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{given}: already exists and is not empty (pass --overwrite to replace it)")
        if not is_hf_folder(out) and not (out / CONFIG_FILE).is_file():
            raise ExportError(f"{given}: is not a Hugging Face model or PEFT adapter folder; --overwrite "
                              "replaces only an earlier export: choose a new or empty --out")
        held = _holds_run(out)
        if held is not None:
            raise ExportError(f"{given}: holds training output ({held}); --overwrite never deletes checkpoints or "
                              "metrics: choose another --out")
    return out, staging


# ----------------------------------------------------------------------------- export

def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", verify_logits: bool = True,
           overwrite: bool = False, push_to_hub: str | None = None, atol: float = 1e-3, rtol: float = 1e-5,
           merge: bool = False, adapter: str | Path | None = None, log=print) -> Path:
    """Write ``out`` as an HF GPT-2 folder, or for a LoRA model (a LoRA run, or ``adapter`` on an HF
    model) as a PEFT adapter folder unless ``merge``; returns its path. Raises ExportError on any mismatch."""
    if dtype not in ("float32", "bfloat16"):
        raise ExportError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        Range(0).check(name, value, ExportError)  # an infinite or NaN tolerance passes or fails any export
    out, staging = check_out(checkpoint, out, overwrite)
    model, tok = load_source(checkpoint, adapter)
    spec = getattr(model, "lora", None)
    if spec and merge:
        model = lora.merged(model)
    if not getattr(tok, "chat_template", None):
        log(f"note: {checkpoint} has no chat template; exporting the tokenizer as is")
    shutil.rmtree(staging, ignore_errors=True)
    cfg = model.config
    if spec and not merge:  # the adapter alone, float32 (PEFT's own default), for the public base
        if dtype != "float32":
            log(f"note: --dtype {dtype} applies to full exports (--merge); the adapter is written in float32")
        save_adapter(model, staging, tok, spec.base_name)
        log(f"wrote {staging} (PEFT LoRA adapter of {spec.base_name}: r={spec.rank}, alpha={spec.alpha:g}, "
            f"{', '.join(spec.targets)}; load it on GPT2LMHeadModel resized to {cfg.vocab_size} tokens)")
    else:
        save_pretrained(model, staging, tokenizer=tok, dtype=dtype, generation_config=generation_config(tok))
        log(f"wrote {staging} ({cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}, {dtype})")
    if verify_logits:
        check = (verify_adapter(model, staging, tok, atol=atol, rtol=rtol) if spec and not merge
                 else verify(model, staging, tok, dtype=dtype, atol=atol, rtol=rtol))
        log(str(check))
        if not check.ok:
            raise ExportError(f"{staging}: exported logits differ from jaxgpt's ({check}); folder left for inspection")
    if is_url(out):
        if out.exists():
            out.rmtree()
        upload_folder(staging, out)
        log(f"exported {checkpoint} -> {out}")
        if push_to_hub:
            push(staging, push_to_hub, log=log)
        shutil.rmtree(staging.parent)
        return out
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log(f"exported {checkpoint} -> {out}")
    if push_to_hub:
        push(out, push_to_hub, log=log)
    return out


def push(folder: Path, repo_id: str, log=print) -> None:
    """Upload ``folder`` to the hub repo ``repo_id`` (created if missing); the token is the hub's usual
    (``HF_TOKEN`` or ``huggingface-cli login``). Any failure is an ExportError; the folder stays."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from jaxgpt.export")
    # Not only HTTP errors: without a network, huggingface_hub 1.x+ raises httpx's ConnectError,
    # which is no OSError. Whatever it is, the user gets one line and keeps the verified folder.
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {e}); "
                          f"the folder is saved at {folder}") from e
    log(f"pushed {folder} to https://huggingface.co/{repo_id}")


def main(argv=None, *, prog: str = "python -m jaxgpt.export", positional: bool = False) -> None:
    """The CLI; ``positional``: CHECKPOINT and OUT as positional arguments (tools/convert_to_pytorch.py)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    where = "training output_dir (latest step), a step dir, or an HF folder"
    if positional:
        p.add_argument("checkpoint", help=where)
        p.add_argument("out", help="HF folder to write")
    else:
        p.add_argument("--checkpoint", required=True, help=where)
        p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA model: write the full merged GPT2LMHeadModel folder instead of the PEFT adapter")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT LoRA adapter folder to put on the source model")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the verified folder to this hub repo")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the logits check (against transformers; without torch, of the re-read file)")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    compile_cache.enable()
    try:
        export(args.checkpoint, args.out, dtype=args.dtype, verify_logits=not args.no_verify, overwrite=args.overwrite,
               push_to_hub=args.push_to_hub, atol=args.atol, rtol=args.rtol, merge=args.merge, adapter=args.adapter)
    except ValueError as e:  # ExportError, WeightsError and the checkpoint's errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
