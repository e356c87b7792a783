"""Generation speed: jaxgpt's compiled KV-cache loop vs transformers' PyTorch ``generate``, eager and compiled.

    python tools/bench_generate.py                # GPT-2 124M random init, CPU, batch 1 and 8, 128 new tokens
    python tools/bench_generate.py --quick        # tiny model, a smoke run
    python tools/bench_generate.py --decoding-dtypes bfloat16,int8,w8a8
                                                  # also jaxgpt's decoding layouts (and transformers in bf16,
                                                  # and with torch's dynamic int8 quantisation)

Both sides load the same weights: a random-init jaxgpt GPT-2 (config only, no
download) written once with ``save_pretrained`` and read by
``GPT2LMHeadModel.from_pretrained`` and ``jaxgpt.sample.load_model`` (on a CPU, jaxgpt's float32
side is its float32 decoding layout: the same weights stored [out, in]). Greedy,
no stop token (every row makes exactly ``--new-tokens``), random prompts of
``--prompt-len`` tokens. Each measurement runs in its own fresh process (so
thread pools and allocators of the two frameworks never meet); one untimed call
first (jaxgpt compiles there), then the median of ``--repeats`` timed calls.
tokens/s = batch * new tokens / wall time of one ``generate`` call, prefill
included, end to end from host token ids to host token ids. transformers runs twice: eager, as
``generate`` runs by default, and compiled, as its docs make it fast (``cache_implementation="static"``
and the model's forward under ``torch.compile``, inductor; the first call compiles and is not timed;
tools/bench.py's ``COMPILE_TRIES`` in order until one works, recorded in ``torch_compile``).

The greedy tokens of both sides are compared too (same weights -> same tokens,
up to float near-ties). With ``--decoding-dtypes`` jaxgpt also runs with each
``param_dtype`` given (bfloat16, int8, w8a8: the decoding layouts, ``jaxgpt.decoding.for_decoding``),
scored against its float32 run: free-running token agreement, and teacher-forced
top-1 agreement (argmax at every generated position of the float32 sequence). The PyTorch
peers of the layouts: with bfloat16, transformers also runs with its model in
``torch.bfloat16``; with w8a8, with ``torch.ao.quantization.quantize_dynamic`` (int8 weights
and activations, PyTorch's CPU recipe; ``dynamic_int8``). Weight-only int8 has no such peer.

``tools/bench.py`` calls ``run(work_dir, quick=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
TINY = dict(n_layer=2, n_head=2, n_embd=128, n_positions=512)
RESULT_TAG = "BENCH_GENERATE "


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, length)).tolist()


def write_model(folder: Path, arch: dict) -> Path:
    """A random-init GPT-2 (seed 0) as an HF folder that both sides load."""
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.weights import save_pretrained

    if not (folder / "model.safetensors").exists():
        save_pretrained(GPT2(GPT2Config(**arch), rngs=nnx.Rngs(0)), folder)
    return folder


# ----------------------------------------------------------------------------- one side, in its own process

def side_jax(a: dict) -> dict:
    import jax

    from jaxgpt.sample import generate, load_model

    model, _ = load_model(a["model"], param_dtype=a["param_dtype"])
    ids = prompts(model.config.vocab_size, a["batch"], a["prompt_len"])

    def call():
        return generate(model, ids, max_new_tokens=a["new_tokens"])

    out, first_s, times = timed(call, a["repeats"])  # the first call compiles
    res = {"times_s": times, "first_call_s": first_s, "tokens": out, "backend": jax.default_backend()}
    if a.get("reference_tokens"):  # teacher-forced top-1 agreement with the float32 greedy sequences
        import jax.numpy as jnp
        import numpy as np

        seqs = np.array([p + t for p, t in zip(ids, a["reference_tokens"])], np.int32)
        pred = np.asarray(jnp.argmax(model(jnp.asarray(seqs[:, :-1])), -1))[:, a["prompt_len"] - 1:]
        res["teacher_forced_top1"] = float((pred == seqs[:, a["prompt_len"]:]).mean())
    return res


def timed(call, repeats: int):
    """(last output, seconds of the first call, seconds of each of ``repeats`` further calls)."""
    t0 = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return out, first_s, times


def side_torch(a: dict) -> dict:
    """transformers' ``generate``; with ``compile``, as transformers' docs make it fast: a static
    KV cache and the model's forward under ``torch.compile`` (inductor)."""
    if a.get("compile"):
        from bench import fresh_inductor_cache

        fresh_inductor_cache()
    import torch
    from transformers import GenerationConfig, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(a["model"], dtype=getattr(torch, a.get("torch_dtype", "float32")),
                                            attn_implementation="sdpa").eval()
    if a.get("dynamic_int8"):
        model = dynamic_int8(model)
    # greedy, no stop token: every row makes exactly new_tokens, like the jaxgpt side
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=a["new_tokens"], eos_token_id=None,
                                               pad_token_id=0,
                                               cache_implementation="static" if a.get("compile") else None)
    ids = torch.tensor(prompts(model.config.vocab_size, a["batch"], a["prompt_len"]))
    mask = torch.ones_like(ids)

    def call():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask)

    res = {"torch_threads": torch.get_num_threads()}
    if a.get("compile"):  # the first call compiles the prefill's and the decoding step's shapes
        from bench import compile_with_fallback

        eager_forward = model.forward

        def first_call(forward):
            model.forward = forward
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0

        _, first_s, res["compile"] = compile_with_fallback(eager_forward, first_call)
        out, _, times = timed(call, a["repeats"])
    else:
        out, first_s, times = timed(call, a["repeats"])
    return {**res, "times_s": times, "first_call_s": first_s, "tokens": out[:, ids.shape[1]:].tolist()}


def dynamic_int8(model):
    """PyTorch's own W8A8 for CPU inference: ``torch.ao.quantization.quantize_dynamic`` (int8
    weights with a scale per output channel, activations quantised per call, asymmetric) on
    every projection and the head. It handles ``nn.Linear`` only, so GPT-2's ``Conv1D``
    ([in, out] weights) become ``nn.Linear`` first."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(*child.weight.shape)
                linear.weight.data, linear.bias.data = child.weight.data.T.contiguous(), child.bias.data
                setattr(module, name, linear)
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao is its successor)
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


SIDES = {"jax": side_jax, "torch": side_torch}


def run_side(side: str, args: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--side-args", json.dumps(args)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark, on a GPU host too
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            n = args["batch"] * args["new_tokens"]
            out["tokens_per_s"] = n / statistics.median(out["times_s"])
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"{side} side exited {proc.returncode}: " + " | ".join(tail))


PEER_TIMEOUT = 300  # seconds for one same-trick PyTorch peer
# jaxgpt's decoding layout, its PyTorch same-trick peer (the row's key prefix) and that side's settings
SAME_TRICK_PEERS = (("bfloat16", "torch_bf16", {"torch_dtype": "bfloat16"}),
                    ("w8a8", "torch_dynamic_int8", {"dynamic_int8": True}))


def peer_side(args: dict) -> dict:
    """A PyTorch same-trick peer (bf16 weights, dynamic int8): its result, or {"error": why}."""
    try:
        return run_side("torch", args, timeout=PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {PEER_TIMEOUT} s"}
    except RuntimeError as e:
        return {"error": str(e)}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def run(work_dir: Path, *, quick: bool = False, batches=(1, 8), new_tokens: int = 128, prompt_len: int = 32,
        repeats: int = 3, decoding_dtypes=(), log=print) -> dict:
    """Run every measurement; returns {"config": ..., "rows": [one dict per batch size]}."""
    arch = TINY if quick else GPT2_124M
    folder = write_model(Path(work_dir) / ("gen-tiny" if quick else "gen-124m"), arch)
    rows = []
    for batch in batches:
        args = {"model": str(folder), "batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
                "repeats": repeats, "param_dtype": "float32"}
        torch_res = run_side("torch", args)
        compiled = run_side("torch", {**args, "compile": True})
        jax_res = run_side("jax", args)
        row = {"batch": batch, "jaxgpt_tok_s": jax_res["tokens_per_s"], "torch_tok_s": torch_res["tokens_per_s"],
               "ratio": jax_res["tokens_per_s"] / torch_res["tokens_per_s"],
               "jaxgpt_first_call_s": jax_res["first_call_s"], "torch_first_call_s": torch_res["first_call_s"],
               "greedy_token_agreement": agreement(jax_res["tokens"], torch_res["tokens"]),
               "torch_threads": torch_res["torch_threads"],
               # transformers with a static cache and torch.compile: PyTorch's fastest generate
               "torch_compiled_tok_s": compiled["tokens_per_s"],
               "ratio_compiled": jax_res["tokens_per_s"] / compiled["tokens_per_s"],
               "torch_compiled_first_call_s": compiled["first_call_s"], "torch_compile": compiled["compile"],
               "compiled_greedy_token_agreement": agreement(jax_res["tokens"], compiled["tokens"])}
        for dt in decoding_dtypes:
            res = run_side("jax", {**args, "param_dtype": dt, "reference_tokens": jax_res["tokens"]})
            row[f"{dt}_weights"] = {"jaxgpt_tok_s": res["tokens_per_s"], "ratio": res["tokens_per_s"] / torch_res["tokens_per_s"],
                                    "vs_f32_free_running_agreement": agreement(res["tokens"], jax_res["tokens"]),
                                    "vs_f32_teacher_forced_top1": res["teacher_forced_top1"]}
        # "ratio" above is against transformers in float32 (what `generate` runs by default); these are
        # against PyTorch doing the same trick: bf16 weights, and dynamic int8 (the same kind of product as w8a8)
        # Where a same-trick peer fails or runs past PEER_TIMEOUT (PyTorch's bf16 products on a CPU
        # without bf16 instructions), the row keeps its other numbers and says why.
        for dt, name, extra in SAME_TRICK_PEERS:
            if dt not in decoding_dtypes:
                continue
            peer = peer_side({**args, **extra})
            if "error" in peer:
                row[f"{name}_error"] = peer["error"]
                continue
            row.update({f"{name}_tok_s": peer["tokens_per_s"],
                        f"{name}_vs_f32_free_running_agreement": agreement(peer["tokens"], torch_res["tokens"])})
            row[f"{dt}_weights"][f"ratio_vs_{name}"] = row[f"{dt}_weights"]["jaxgpt_tok_s"] / peer["tokens_per_s"]
        rows.append(row)
        log(format_row(row))
    return {"config": {"arch": arch, "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats,
                       "cores": os.cpu_count()}, "rows": rows}


def format_row(r: dict) -> str:
    s = (f"  generate batch {r['batch']}: jaxgpt {r['jaxgpt_tok_s']:.1f} tok/s, transformers {r['torch_tok_s']:.1f} "
         f"tok/s -> {r['ratio']:.2f}x | first call {r['jaxgpt_first_call_s']:.1f}s vs {r['torch_first_call_s']:.1f}s"
         f" | same greedy tokens {r['greedy_token_agreement']:.1%}")
    if "torch_compiled_tok_s" in r:
        from bench import compile_label

        s += (f"\n    transformers, static cache + {compile_label(r['torch_compile'])}: {r['torch_compiled_tok_s']:.1f} "
              f"tok/s -> jaxgpt {r['ratio_compiled']:.2f}x | first call {r['torch_compiled_first_call_s']:.1f}s | "
              f"same greedy tokens {r['compiled_greedy_token_agreement']:.1%}")
    for key, d in r.items():
        if key.endswith("_weights"):  # one per --decoding-dtypes entry
            dt = key[: -len("_weights")]
            s += (f"\n    jaxgpt {dt} weights {d['jaxgpt_tok_s']:.1f} tok/s -> {d['ratio']:.2f}x transformers float32 | "
                  f"against jaxgpt float32: "
                  f"top-1 teacher-forced {d['vs_f32_teacher_forced_top1']:.1%}, free-running "
                  f"{d['vs_f32_free_running_agreement']:.1%}")
    if "torch_bf16_tok_s" in r:
        s += (f"\n    transformers in bf16 {r['torch_bf16_tok_s']:.1f} tok/s; "
              f"jaxgpt bf16 weights / it: {r['bfloat16_weights']['ratio_vs_torch_bf16']:.2f}x (same dtype)")
    for key, label in (("torch_bf16_error", "transformers in bf16"), ("torch_dynamic_int8_error", "transformers, dynamic int8")):
        if key in r:
            s += f"\n    {label}: {r[key]}"
    if "torch_dynamic_int8_tok_s" in r:
        s += (f"\n    transformers, dynamic int8 (torch quantize_dynamic) {r['torch_dynamic_int8_tok_s']:.1f} tok/s; "
              f"jaxgpt w8a8 / it: {r['w8a8_weights']['ratio_vs_torch_dynamic_int8']:.2f}x (same kind of product)")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model instead of GPT-2 124M")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoding-dtypes", default="", metavar="bfloat16,int8,w8a8",
                   help="also time jaxgpt with these decoding layouts (and transformers in bf16 with bfloat16, "
                        "with torch's dynamic int8 quantisation with w8a8)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--side-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(RESULT_TAG + json.dumps(SIDES[args.side](json.loads(args.side_args))), flush=True)
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="jaxgpt-bench-gen-"))
    res = run(work, quick=args.quick, batches=[int(b) for b in args.batches.split(",")],
              new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
              decoding_dtypes=[d for d in args.decoding_dtypes.split(",") if d])
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
