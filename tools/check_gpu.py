"""Before a GPU benchmark: versions, the device, jaxgpt's Pallas kernels and cuDNN attention
checked on it.

    python tools/check_gpu.py        # exit 0 when every check holds

1. jaxgpt.kernels (LayerNorm, bias + GELU, log-sum-exp) compiled by Triton, against float32 math
   on the same bf16 inputs at GPT-2 124M's widths: outputs and input gradients within 8e-3 of the
   largest value (bf16 rounding), the scale / bias gradients (float32 sums) within 1e-3, the
   log-sum-exp within 1e-4. tests/test_kernels.py runs the same kernels in Pallas' interpreter on
   the CPU; only here do Triton's lowering and ``tanh.approx`` run.
2. A small GPT-2 (2 layers, 256 wide, seq 256, bfloat16 compute): its loss and gradients with
   ``attention="cudnn"`` (cuDNN's fused flash attention, through ``jax.nn.dot_product_attention``)
   against ``attention="einsum"``, and with ``kernels="pallas"`` against ``kernels="xla"``, with
   packed segments and without. Tolerances are bfloat16's: loss within 1% relative, every
   gradient within 5% of the largest gradient. CPU CI cannot run cuDNN; tests/test_model.py checks
   the same call with ``attention="xla"`` there. Without a GPU (a dry run) part 2 compares
   ``attention="xla"`` with ``"einsum"`` only.
   ``attention="flash"`` (jaxgpt.flash: jax's Pallas flash kernel with the segment ids, Triton)
   against ``"einsum"`` with the same tolerances; without a GPU in Pallas' interpreter (slow: a
   minute), as tests/test_attention.py runs it in float32.
"""

from __future__ import annotations

import sys


def versions() -> str:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch")
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            out.append(f"{n} -")
    return ", ".join(out)


def rel_err(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_kernels() -> bool:
    """Part 1; in Pallas' interpreter where there is no GPU (a dry run of this script)."""
    import jax
    import jax.numpy as jnp

    from jaxgpt import kernels

    interpret = jax.default_backend() != "gpu"
    rows = 256 if interpret else 4096
    k = jax.random.split(jax.random.key(0), 6)
    ok = True

    def report(name, errors, limits):
        nonlocal ok
        good = all(e <= lim for e, lim in zip(errors, limits))
        ok &= good
        print(f"kernels: {name}: errors {', '.join(f'{e:.1e}' for e in errors)} (limits "
              f"{', '.join(f'{lim:.0e}' for lim in limits)}) -> {'ok' if good else 'MISMATCH'}", flush=True)

    def both(fn, truth, args, cot):
        cot = cot.astype(jnp.bfloat16)  # the same values on both sides
        (out, vjp), (want, vjp_want) = jax.vjp(fn, *args), jax.vjp(truth, *args)
        return [rel_err(a, b) for a, b in zip((out, *vjp(cot)), (want, *vjp_want(cot.astype(jnp.float32))))]

    x = (jax.random.normal(k[0], (rows, 768)) * 2 + 0.5).astype(jnp.bfloat16)
    w, b = 1 + 0.1 * jax.random.normal(k[1], (768,)), 0.1 * jax.random.normal(k[2], (768,))
    errors = both(jax.jit(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, interpret=interpret)),
                  lambda x, w, b: kernels.reference_layer_norm(x.astype(jnp.float32), w, b, 1e-5), (x, w, b),
                  jax.random.normal(k[3], x.shape))
    report("LayerNorm [out, dx, dscale, dbias]", errors, (8e-3, 8e-3, 1e-3, 1e-3))
    y = (jax.random.normal(k[4], (rows, 3072)) * 1.5).astype(jnp.bfloat16)
    errors = both(jax.jit(lambda y, b: kernels.bias_gelu(y, b, interpret=interpret)),
                  lambda y, b: kernels.reference_bias_gelu(y.astype(jnp.float32), b), (y, 0.2 * b.repeat(4)),
                  jax.random.normal(k[5], y.shape))
    report("bias + GELU [out, dy, dbias]", errors, (8e-3, 8e-3, 1e-3))
    logits = jax.random.normal(k[0], (rows // 8, 50304)) * 4
    got = jax.jit(lambda v: kernels.logsumexp(v, 50257, interpret=interpret))(logits)
    report("log-sum-exp [absolute]", [float(jnp.abs(got - jax.nn.logsumexp(logits[:, :50257], -1)).max())], (1e-4,))
    return ok


def main() -> int:
    print(versions(), flush=True)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config

    print(f"backend {jax.default_backend()}: {jax.devices()}", flush=True)
    ok = check_kernels()
    base = dict(vocab_size=512, n_positions=256, n_embd=256, n_layer=2, n_head=4, dtype="bfloat16")
    b, t = 4, 256
    ids = jax.random.randint(jax.random.key(0), (b, t), 0, base["vocab_size"])
    packed = jnp.where(jnp.arange(t)[None] < 100 + 30 * jnp.arange(b)[:, None], 1, 2)
    # (label, settings, reference settings): each pair differs in one knob.
    pairs = [("cudnn vs einsum attention", dict(attention="cudnn", kernels="xla"), dict(attention="einsum", kernels="xla")),
             ("pallas vs xla kernels", dict(attention="cudnn", kernels="pallas"), dict(attention="cudnn", kernels="xla"))]
    flash = ("flash vs einsum attention", dict(attention="flash", kernels="xla"), dict(attention="einsum", kernels="xla"))
    pairs.append(flash)
    if jax.default_backend() != "gpu":  # a dry run: the same attention call with XLA's implementation
        pairs = [("xla vs einsum attention (dry run: cudnn needs a GPU)", dict(attention="xla", kernels="xla"),
                  dict(attention="einsum", kernels="xla")),
                 (flash[0] + " (dry run: the kernel in Pallas' interpreter)", *flash[1:])]
        print("pallas vs xla kernels: skipped (dry run: Triton needs a GPU; tests/test_kernels.py runs them "
              "in the interpreter in a train step)", flush=True)
    for seg_name, seg in (("packed segments", packed), ("causal only", None)):
        for label, settings, reference in pairs:
            res = []
            for knobs in (settings, reference):
                model = GPT2(GPT2Config(**base, **knobs), rngs=nnx.Rngs(0))

                def loss(m):
                    logits = m(ids, segment_ids=seg)
                    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

                value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
                res.append((float(value), jax.tree.leaves(nnx.state(grads, nnx.Param))))
            (vc, gc), (ve, ge) = res
            scale = max(float(jnp.max(jnp.abs(g))) for g in ge)
            worst = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(gc, ge))
            good = abs(vc - ve) <= 0.01 * abs(ve) and worst <= 0.05 * scale
            ok &= good
            print(f"{label}, {seg_name}: loss {vc:.5f} vs {ve:.5f}; max gradient difference {worst:.2e} "
                  f"(largest gradient {scale:.2e}) -> {'ok' if good else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
