"""Probe (GPU only): cuDNN's packed-segment attention against the additive-mask call jaxgpt uses.

    python tools/probe_packed_attention.py [MAX_SEGMENTS_PER_ROW]   # default 32

jaxgpt turns a packing mask into an additive bias for cuDNN's flash attention
(``jax.nn.dot_product_attention(mask=..., is_causal=True, implementation="cudnn")``), which cuDNN's
kernels read forward and backward (no bias gradient is computed: the optimised HLO of jax 0.11.2's
backward call returns dQ, dK, dV only). cuDNN can instead take the segments as per-row offsets and
lengths (``q_offsets`` / ``q_seqlen`` of jax's private ``fused_attention_stablehlo``). This times
one layer's forward + backward of both, and of causal attention alone, on random packed rows
(32 x 1024, 12 heads of 64, trailing padding as one more segment), and compares the outputs and
gradients on the non-padding tokens.

Measured on an H200 (2026-11-29, jax 0.11.2): correct (<= 9.1e-4 relative) but slower, 1.94 ms
against 1.58 ms for the mask and 1.12 ms causal only (docs/benchmarks-history.md, section 6). Kept to
re-check on newer cuDNN / jax versions.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as fa  # private: the packed layout has no public API

B, T, N, H = 32, 1024, 12, 64


def packed_rows(seed: int = 0) -> np.ndarray:
    """[B, T] segment ids: runs of 30-400 tokens numbered from 1; every third row ends in padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        pos, s = 0, 1
        while pos < T - 60:
            n = int(rng.integers(30, 400))
            n = min(n, T - 40 - pos) if b % 3 == 0 else min(n, T - pos)
            seg[b, pos:pos + n] = s
            pos, s = pos + n, s + 1
    return seg


def offsets(seg, m: int):
    """Segment lengths [B, m] and start offsets [B, m + 1] (-1 past the last), as cuDNN's packed
    layout takes them; the trailing padding is one more segment, so its outputs stay finite."""
    b, t = seg.shape
    start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jax.vmap(lambda s: jnp.nonzero(s, size=m + 1, fill_value=t)[0])(start)  # starts, t past the last
    nxt = jnp.concatenate([idx[:, 1:], jnp.full((b, 1), t, idx.dtype)], axis=1)
    valid = idx < t
    seqlen = jnp.where(valid, nxt - idx, -1)[:, :m].astype(jnp.int32)
    offs = jnp.where(valid, idx, -1).at[:, m].set(-1).astype(jnp.int32)
    return seqlen, offs


def with_mask(q, k, v, seg, m):
    """jaxgpt's call (jaxgpt/model.py): causal & same segment & not padding, as an additive bias."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation="cudnn")


def packed(q, k, v, seg, m):
    seqlen, offs = offsets(seg, m)
    return fa.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offs, kv_offsets=offs,
                                    scale=1 / np.sqrt(H), mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def causal(q, k, v, seg, m):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def forward_backward(f, m):
    def run(q, k, v, g, seg):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg, m), q, k, v)
        return (out,) + vjp(g)
    return jax.jit(run)


def main(m: int = 32) -> None:
    seg = packed_rows()
    print(f"segments per row: max {max(len(set(r[r > 0])) for r in seg)}, padding tokens {int((seg == 0).sum())}")
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in keys)
    seg = jnp.asarray(seg)
    keep = (seg != 0)[:, :, None, None]
    g = jnp.where(keep, g, 0)  # padding tokens get no gradient, as their loss weight is 0
    results = {}
    for name, f in [("mask bias (jaxgpt now)", with_mask), (f"packed offsets M={m}", packed), ("causal only", causal)]:
        fn = forward_backward(f, m)
        try:
            results[name] = jax.block_until_ready(fn(q, k, v, g, seg))
        except Exception as e:  # noqa: BLE001 - a cuDNN without the packed layout: report it, time the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:600]}")
            continue
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, g, seg))
            times.append(time.perf_counter() - t0)
        print(f"{name}: fwd+bwd {np.median(times) * 1e3:.3f} ms per layer-call (median of 20)", flush=True)
    ref, new = results.get("mask bias (jaxgpt now)"), results.get(f"packed offsets M={m}")
    if ref is None or new is None:
        return
    for name, x, y in zip(["out", "dq", "dk", "dv"], ref, new):
        x, y = (jnp.where(keep, a.astype(jnp.float32), 0) for a in (x, y))
        rel = float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x))
        print(f"  {name}: rel diff {rel:.2e}, max abs {float(jnp.max(jnp.abs(x - y))):.3e}, "
              f"finite {bool(jnp.all(jnp.isfinite(y)))}")
    print("  packed out finite everywhere:", bool(jnp.all(jnp.isfinite(new[0]))))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
