"""GPU probe of jaxgpt.kernels (Pallas LayerNorm, bias + GELU, log-sum-exp), one device call.

1. Each op alone, GPT-2 124M's shapes at 32 x 1024 in bf16: LayerNorm [32768, 768] and bias + GELU
   [32768, 3072], forward and forward + backward, as the model runs them with XLA against the
   kernels at a few tilings, each result's largest error against float32 math on the same inputs;
   the log-sum-exp of one loss chunk's float32 logits [4096, 50304].
2. The train step (tools/bench.py's GPU worker: GPT-2 124M, batch 32 x 1024, bf16) with
   ``model.kernels`` xla and pallas, with and without the packing mask, each in its own process,
   the kernels at the best tiling of part 1, timed as jaxgpt.train runs it (``pipelined``).

    python tools/probe_kernels_gpu.py --out probe.json [--quick]   # --quick: tiny shapes (a dry run; CPU: interpreter)
    python tools/probe_kernels_gpu.py --micro ln,lse --variants 0,1,2,3   # a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

# Tilings tried (the first of each is jaxgpt.kernels' default):
LN_TILINGS = [(4, 8, 4, 2), (2, 32, 4, 1), (2, 8, 4, 1), (2, 32, 4, 3), (1, 16, 2, 3)]  # rows, blocks, warps, stages
GELU_TILINGS = [(16, 256, 8, 4), (8, 512, 8, 4), (4, 1024, 16, 4), (8, 1024, 8, 8)]  # rows, cols, blocks, warps
LSE_TILINGS = [(1, 2048, 8, 2), (1, 1024, 4, 2), (2, 1024, 4, 3), (4, 512, 4, 2), (1, 4096, 8, 1)]  # rows, cols, warps, stages


def set_tiling(ln=None, gelu=None, approx=None, lse=None):
    from jaxgpt import kernels

    if ln:
        kernels.LN_ROWS, kernels.LN_BLOCKS, kernels.LN_WARPS, kernels.LN_STAGES = ln
    if gelu:
        kernels.GELU_ROWS, kernels.GELU_COLS, kernels.GELU_BLOCKS, kernels.GELU_WARPS = gelu
    if approx is not None:
        kernels.APPROX_TANH = approx
    if lse:
        kernels.LSE_ROWS, kernels.LSE_COLS, kernels.LSE_WARPS, kernels.LSE_STAGES = lse


def time_loop(fn, x, iters):
    """Median seconds per iteration of ``x = fn(x)``, run ``iters`` times in one jitted loop."""
    import jax

    run = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda _, v: fn(v), x))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def micro(quick: bool, ops: set) -> dict:
    import jax
    import jax.numpy as jnp
    from check_gpu import rel_err as err

    from jaxgpt import kernels

    interpret = jax.default_backend() != "gpu"
    rows, e = (256, 96) if quick else (32768, 768)
    iters = 2 if quick else 20
    k = jax.random.split(jax.random.key(0), 6)
    x = (jax.random.normal(k[0], (rows, e)) * 2 + 0.5).astype(jnp.bfloat16)
    w = 1 + 0.1 * jax.random.normal(k[1], (e,))
    b = 0.1 * jax.random.normal(k[2], (e,))
    y4 = (jax.random.normal(k[3], (rows, 4 * e)) * 1.5).astype(jnp.bfloat16)
    b4 = 0.2 * jax.random.normal(k[4], (4 * e,))
    dy = jax.random.normal(k[5], (rows, e)).astype(jnp.bfloat16)
    dh = jax.random.normal(k[5], (rows, 4 * e)).astype(jnp.bfloat16)
    eps = 1e-5
    out = {"ln": {}, "gelu": {}, "lse": {}}

    ln_xla = lambda x, w, b: kernels.reference_layer_norm(x, w, b, eps)
    ln_truth = jax.vjp(lambda x, w, b: kernels.reference_layer_norm(x.astype(jnp.float32), w, b, eps), x, w, b)
    ln_truth = (ln_truth[0], ln_truth[1](dy.astype(jnp.float32)))
    gelu_xla = jax.checkpoint(kernels.reference_bias_gelu)  # as jaxgpt.model.MLP runs it
    gelu_truth = jax.vjp(lambda y, b: kernels.reference_bias_gelu(y.astype(jnp.float32), b), y4, b4)
    gelu_truth = (gelu_truth[0], gelu_truth[1](dh.astype(jnp.float32)))

    def measure(kind, label, fn, args, cot, truth):
        try:
            val, vjp = jax.jit(lambda *a: jax.vjp(fn, *a))(*args)
            grads = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cot))(*args)
            r = {"err_out": err(val, truth[0]), "err_grads": [err(g, t) for g, t in zip(grads, truth[1])]}
            rest = args[1:]
            r["fwd_us"] = 1e6 * time_loop(lambda v: fn(v, *rest), args[0], iters)

            def fwd_bwd(v):
                o, f = jax.vjp(lambda v, *p: fn(v, *p), v, *rest)
                g = f(o)
                return g[0] + 0 * sum(jnp.sum(p).astype(v.dtype) for p in g[1:])
            r["fwd_bwd_us"] = 1e6 * time_loop(fwd_bwd, args[0], iters)
        except Exception as exc:  # a failing variant is reported, and the probe goes on
            r = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        out[kind][label] = r
        print(f"{kind} {label}: {json.dumps(r)}", flush=True)

    if "ln" in ops:
        measure("ln", "xla", ln_xla, (x, w, b), dy, ln_truth)
        for t in LN_TILINGS:
            set_tiling(ln=t)
            measure("ln", f"pallas {t}", lambda x, w, b: kernels.layer_norm(x, w, b, eps, interpret=interpret),
                    (x, w, b), dy, ln_truth)
    if "gelu" in ops:
        measure("gelu", "xla", gelu_xla, (y4, b4), dh, gelu_truth)
        for approx in (True, False):
            for t in GELU_TILINGS if approx else GELU_TILINGS[:1]:
                set_tiling(gelu=t, approx=approx)
                measure("gelu", f"pallas {t} approx_tanh={approx}",
                        lambda y, b: kernels.bias_gelu(y, b, interpret=interpret), (y4, b4), dh, gelu_truth)
    if "lse" in ops:  # one chunk of the loss's float32 logits: [B * T / 8, 50304], 50257 of them real
        from jaxgpt import loss

        n, valid = (1000, 900) if quick else (50304, 50257)
        logits = jax.random.normal(k[0], (rows // 8, n)) * 4
        want = jax.nn.logsumexp(logits[:, :valid], axis=-1)
        masked = lambda v: jnp.where(jnp.arange(n) < valid, v, jnp.finfo(jnp.float32).min)
        # x = fn(x) would not keep the shape: each iteration adds the result to one column.
        loop = lambda fn: (lambda v: v.at[:, 0].add(fn(v) * 1e-30))
        for label, fn in [("xla two passes", lambda v: jax.nn.logsumexp(masked(v), axis=-1)),
                          ("xla one pass", lambda v: loss._logsumexp(masked(v)))] + [
                (f"pallas {t}", (lambda t: lambda v: (set_tiling(lse=t), kernels.logsumexp(v, valid, interpret=interpret))[1])(t))
                for t in LSE_TILINGS]:
            try:
                r = {"err": float(jnp.abs(jax.jit(fn)(logits) - want).max()),
                     "us": 1e6 * time_loop(loop(fn), logits, iters)}
            except Exception as exc:  # reported; the probe goes on
                r = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            out["lse"][label] = r
            print(f"lse {label}: {json.dumps(r)}", flush=True)
    return out


def best(results: dict, prefix: str, key: str = "fwd_bwd_us"):
    ok = {k: v for k, v in results.items() if k.startswith(prefix) and "error" not in v}
    return min(ok, key=lambda k: ok[k][key]) if ok else None


def child(spec: dict) -> None:
    """One train-step variant in this process: spec = worker args + tilings + patches."""
    import os

    if "xla_flags" in spec:  # before jax starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + spec.pop("xla_flags")).strip()
    import bench
    import jax

    from jaxgpt import backend, kernels

    if jax.default_backend() != "gpu" and spec.get("kernels") == "pallas":  # a dry run: the interpreter
        backend.fused_kernels = lambda cfg: cfg.kernels == "pallas"
        ln, add_ln, gelu, lse = kernels.layer_norm, kernels.add_layer_norm, kernels.bias_gelu, kernels.logsumexp
        kernels.layer_norm = lambda x, w, b, eps, interpret=False: ln(x, w, b, eps, interpret=True)
        kernels.add_layer_norm = lambda x, d, w, b, eps, interpret=False: add_ln(x, d, w, b, eps, interpret=True)
        kernels.bias_gelu = lambda y, b, interpret=False: gelu(y, b, interpret=True)
        kernels.logsumexp = lambda x, valid=None, interpret=False: lse(x, valid, interpret=True)
    set_tiling(spec.pop("ln_tiling", None), spec.pop("gelu_tiling", None), spec.pop("approx", None),
               spec.pop("lse_tiling", None))
    if spec.pop("xla_gelu", False):  # LayerNorm kernels only: the model's own bias + GELU
        kernels.bias_gelu = lambda y, b, interpret=False: jax.checkpoint(kernels.reference_bias_gelu)(y, b)
    if spec.pop("xla_ln", False):
        kernels.layer_norm = lambda x, w, b, eps, interpret=False: kernels.reference_layer_norm(x, w, b, eps)
        kernels.add_layer_norm = lambda x, d, w, b, eps, interpret=False: kernels.reference_add_layer_norm(x, d, w, b, eps)
    if spec.pop("unfused_add", False):  # the residual add by XLA, then the LayerNorm kernel
        kernels.add_layer_norm = lambda x, d, w, b, eps, interpret=False: (x + d, kernels.layer_norm(x + d, w, b, eps))
    print(bench.RESULT_TAG + json.dumps(bench.worker_train_jax(spec)), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("probe_kernels.json"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "train_jax", from bench.run_worker
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    p.add_argument("--micro", default="ln,gelu,lse", help="which ops to time alone ('' for none)")
    p.add_argument("--variants", default="0,1,2,3,4,5", help="which train-step variants, as indices")
    p.add_argument("--profile", type=Path, help="trace the pallas step (packed) into this folder")
    p.add_argument("--timeout", type=float, default=240)
    args = p.parse_args()
    if args.worker:
        child(json.loads(args.worker_args))
        return 0
    import bench
    import jax

    res = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()]}
    save = lambda: args.out.write_text(json.dumps(res, indent=2) + "\n")
    if args.micro:
        res["micro"] = micro(args.quick, set(args.micro.split(",")))
        save()
    ln_best = best(res.get("micro", {}).get("ln", {}), "pallas")
    gelu_best = best(res.get("micro", {}).get("gelu", {}), "pallas")
    tiling = {}
    if ln_best:
        tiling["ln_tiling"] = json.loads(ln_best.split(" ", 1)[1].replace("(", "[").replace(")", "]"))
    if gelu_best:
        tiling["gelu_tiling"] = json.loads(gelu_best.split(" ", 1)[1].split(" approx")[0].replace("(", "[").replace(")", "]"))
        tiling["approx"] = gelu_best.endswith("True")
    lse_best = best(res.get("micro", {}).get("lse", {}), "pallas", "us")
    if lse_best:
        tiling["lse_tiling"] = json.loads(lse_best.split(" ", 1)[1].replace("(", "[").replace(")", "]"))
    print("tiling for the step:", tiling, flush=True)

    on_gpu = jax.default_backend() == "gpu"
    jax.config.update("jax_platforms", "cpu")  # this process writes the weights only
    arch, seq = (bench.TINY, 128) if args.quick else (bench.GPT2_124M, 1024)
    folder = bench.write_init_model(Path("/tmp/probe-kernels") / ("tiny" if args.quick else "124m"), arch, chat=False)
    common = {"model": str(folder), "batch": 4 if args.quick else 32, "seq": seq, "steps": 10, "warmup": 2,
              "dtype": "bfloat16", "attention": "cudnn" if on_gpu else "xla", "vocab_multiple": 128, "scan_layers": False,
              "peak_flops": bench.H200_BF16_PEAK, "pipelined": True}
    pallas = {"kernels": "pallas", **tiling}
    prof = {"profile_dir": str(args.profile)} if args.profile else {}
    variants = [
        ("kernels: pallas, packed", {**pallas, **prof}),
        ("kernels: pallas, no packing mask", {**pallas, "segments": False}),
        ("kernels: pallas, packed, batch 64", {**pallas, "batch": 64}),
        ("kernels: xla, packed", {"kernels": "xla"}),
        ("kernels: pallas, LayerNorm only, packed", {**pallas, "xla_gelu": True}),
        ("kernels: pallas, GELU only, packed", {**pallas, "xla_ln": True}),
        # Where does the gap between the trace's busy time and the pipelined step go (docs/benchmarks.md)?
        ("kernels: pallas, packed, no command buffers", {**pallas, "xla_flags": "--xla_gpu_enable_command_buffer="}),
        ("kernels: pallas, packed, residual add not fused into LayerNorm", {**pallas, "unfused_add": True}),
    ]
    variants = [variants[int(i)] for i in args.variants.split(",")]
    res["steps"] = {}
    for label, extra in variants:
        r = res["steps"][label] = bench.run_worker("train_jax", {**common, **extra}, timeout=args.timeout,
                                                   script=Path(__file__).resolve())
        save()  # after every variant: a killed probe keeps what it measured
        print(f"step {label}: {r['error'] if 'error' in r else bench.format_gpu_step(r)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
