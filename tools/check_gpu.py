"""Before a GPU benchmark: versions, the device, and cuDNN attention checked against jaxgpt's own.

    python tools/check_gpu.py        # exit 0 when every check holds

On the accelerator, a small GPT-2 (2 layers, 256 wide, seq 256, bfloat16 compute) runs its
loss and gradients with ``attention="cudnn"`` (cuDNN's fused flash attention, through
``jax.nn.dot_product_attention``) and with ``attention="einsum"``, with packed segments and
without. Tolerances are bfloat16's: loss within 1% relative, every gradient within 5% of the
largest gradient. CPU CI cannot run cuDNN; tests/test_model.py checks the same call with
``attention="xla"`` there.
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


def main() -> int:
    print(versions(), flush=True)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config

    print(f"backend {jax.default_backend()}: {jax.devices()}", flush=True)
    base = dict(vocab_size=512, n_positions=256, n_embd=256, n_layer=2, n_head=4, dtype="bfloat16")
    b, t = 4, 256
    ids = jax.random.randint(jax.random.key(0), (b, t), 0, base["vocab_size"])
    packed = jnp.where(jnp.arange(t)[None] < 100 + 30 * jnp.arange(b)[:, None], 1, 2)
    ok = True
    for seg_name, seg in (("packed segments", packed), ("causal only", None)):
        res = {}
        for attention in ("einsum", "cudnn"):
            model = GPT2(GPT2Config(**base, attention=attention), rngs=nnx.Rngs(0))

            def loss(m):
                logits = m(ids, segment_ids=seg)
                return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

            value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
            res[attention] = (float(value), jax.tree.leaves(nnx.state(grads, nnx.Param)))
        (ve, ge), (vc, gc) = res["einsum"], res["cudnn"]
        scale = max(float(jnp.max(jnp.abs(g))) for g in ge)
        worst = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(gc, ge))
        good = abs(vc - ve) <= 0.01 * abs(ve) and worst <= 0.05 * scale
        ok &= good
        print(f"cudnn vs einsum, {seg_name}: loss {vc:.5f} vs {ve:.5f}; max gradient difference {worst:.2e} "
              f"(largest gradient {scale:.2e}) -> {'ok' if good else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
