"""Segment-aware flash attention for packed rows (``model.attention: flash``): jax's Pallas kernel
``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton, FlashAttention-2 style, a forward and a
fused backward kernel), causal, masked by the rows' segment ids tile by tile.

Why: cuDNN through ``jax.nn.dot_product_attention`` takes packed segments only as a [B, 1, T, T]
mask it reads as a bias (docs/benchmarks.md, "What bounds each number"); this kernel reads the
[B, T] ids instead, so packed rows should cost what causal rows cost.

Layout [B, T, H, D] in and out, as the model's other attentions. Off a GPU it runs in Pallas'
interpreter: slow, for the tests and the GPU script's dry run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from jaxgpt import kernels

# Tiles: jax's defaults (forward 128 x 128, backward 32 x 32); untuned for GPT-2 on a GPU yet.
BLOCK, BACKWARD_BLOCK = 128, 32


def reference_attention(q, k, v, segment_ids):
    """The same attention as jax.numpy (jax.nn.dot_product_attention's XLA path, the causal and
    same-segment mask as a whole [B, 1, T, T]): what several devices run without ``kernels.on_mesh``."""
    mask = None if segment_ids is None else (
        (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & (segment_ids[:, None, None, :] != 0))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def attention(q, k, v, segment_ids=None, *, interpret: bool | None = None):
    """Causal attention of q, k, v [B, T, H, D] within the segments of ``segment_ids`` [B, T] (None:
    causal only). Padding tokens (segment 0) attend among themselves, where the reference spreads
    them over all keys: their outputs differ, and nothing real reads them. ``interpret``: Pallas'
    interpreter (default: off a GPU). Under ``kernels.on_mesh``, per device's rows and heads."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    t = q.shape[1]
    block = min(BLOCK, kernels._pow2(t))
    pad = -t % block  # the kernel tiles T whole; the padded keys lie after every real query
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, **dict.fromkeys(
        ("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"), min(BACKWARD_BLOCK, block)))

    def run(q, k, v, *ids):
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        ids = jnp.pad(ids[0].astype(jnp.int32), ((0, 0), (0, pad))) if ids else None
        out = pallas_attention.mha(q, k, v, ids, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True,
                                   block_sizes=sizes, interpret=interpret)
        return out[:, :t]

    qkv_axes = ("batch", "seq", "heads", "head_dim")
    args, axes = ((q, k, v), (qkv_axes,) * 3) if segment_ids is None else (
        (q, k, v, segment_ids), (qkv_axes,) * 3 + (("batch", "seq"),))
    reference = lambda q, k, v, *ids: reference_attention(q, k, v, ids[0] if ids else None)
    return kernels._per_device(run, reference, args, axes, qkv_axes)
