"""Decoding layouts: the model's weights stored [out, in] in float32, bfloat16 or int8, for sampling.

``for_decoding(model, layout)`` returns a copy whose projections are ``DecodingLinear`` modules in
place of ``jaxgpt.model.Linear`` and whose tied head reads a ``DecodingHead``. Decoding reads every
weight once per token: these layouts read a half (bfloat16) or a quarter (int8, w8a8) of float32's
bytes, through the products XLA:CPU runs fastest with such weights (speeds: docs/benchmarks.md,
"Backend defaults"; quality: tools/decode_quality.py). For sampling and evaluation only: the copy cannot
be trained, saved or exported (``jaxgpt.weights`` refuses it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.backend import DTYPES

DECODING_DTYPES = ("bfloat16", "int8", "w8a8")  # the layouts that read fewer bytes than float32
DECODING_LAYOUTS = ("float32", *DECODING_DTYPES)
INT8_DECODING = ("int8", "w8a8")  # the layouts with int8 weights, quantised from float32 ones
_FEW_ROWS = 32  # the most rows measured for few_rows_product (2-32)


def quantize_int8(w):
    """[out, in] weights -> (int8 [out, in], float32 [out]): symmetric, one scale per output row."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # all-zero rows (vocabulary padding)
    return jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8), scale


def quantize_rows_int8(x):
    """float [rows, n] -> (int8 [rows, n], scale [rows, 1], zero point [rows, 1]): asymmetric,
    one scale per row, ``x ~ scale * (q - zero)``; each row's range (widened to hold 0) spans
    all 256 levels."""
    lo = jnp.minimum(x.min(axis=1, keepdims=True), 0)
    hi = jnp.maximum(x.max(axis=1, keepdims=True), 0)
    scale = (hi - lo) / 255
    scale = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.round(-lo / scale) - 128  # lo -> -128
    return jnp.clip(jnp.round(x / scale) + zero, -128, 127).astype(jnp.int8), scale, zero


def int8_matmul(x2, kernel, scale, kernel_sum):
    """float32 [rows, in] x int8 [out, in] (a ``scale`` per output row, ``kernel_sum`` = its int32
    row sums) -> float32 [rows, out], through an int8 x int8 -> int32 product.

    The activations are quantised per row on the fly (``quantize_rows_int8``, LLM.int8()'s
    "zeropoint vector-wise") and the zero point is taken out exactly:
    ``x . w = s_x * s_w * (q . w8 - zero * sum(w8))``. One row is padded to two: XLA:CPU runs
    one row on a much slower kernel than its int8 GEMM.
    """
    rows = x2.shape[0]
    if rows == 1:
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    q, s, zero = quantize_rows_int8(x2)
    acc = jax.lax.dot_general(q, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    acc = acc - zero.astype(jnp.int32) * kernel_sum
    return (acc.astype(jnp.float32) * s * scale)[:rows]


def takes_few_rows_product(rows: int, dtype) -> bool:
    """Whether a product of ``rows`` rows with ``dtype`` weights runs ``few_rows_product`` (on a CPU)."""
    return dtype == jnp.float32 and 1 < rows <= _FEW_ROWS


def few_rows_product(x2, kernel):
    """float32 [rows, in] x float32 [out, in] -> [rows, out] for a few rows on a CPU (batched
    decoding), computed as ``kernel @ x2.T`` and transposed after a barrier (without it XLA folds
    the transpose back into the product). In that orientation XLA:CPU streams the weights through
    the product once; the others read them at about half the memory bandwidth."""
    y = jax.lax.dot_general(kernel, x2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(y).T


def out_in_product(x, kernel, bias=None, scale=None, kernel_sum=None, cpu: bool = False):
    """``x @ kernel.T + bias`` for a [out, in] ``kernel`` in ``x``'s dtype, accumulated in float32.

    int8 kernels come with ``scale`` (one per output row); with ``kernel_sum`` too (w8a8) the
    activations are quantised as well (``int8_matmul``). On a CPU: one row of narrower weights as a
    float32 vector-matrix product that converts each weight as it reads it (``jaxgpt.sample``
    compiles its loop without hoisting that conversion); a few float32 rows as
    ``few_rows_product``. Elsewhere a ``kernel.dtype`` product, int8 weights scaled to bfloat16
    first (a bare int8 -> bf16 cast fused into the product ran slower).
    """
    dt = x.dtype
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    if kernel_sum is not None:
        y, scale = int8_matmul(x2.astype(jnp.float32), kernel, scale, kernel_sum), None
    elif kernel.dtype != jnp.float32 and rows == 1 and cpu:
        y = jnp.dot(x2[0].astype(jnp.float32), kernel.T.astype(jnp.float32))[None]
    elif cpu and takes_few_rows_product(rows, kernel.dtype):
        y = few_rows_product(x2.astype(jnp.float32), kernel)
    else:
        if scale is not None:
            kernel, scale = (kernel.astype(jnp.float32) * scale[:, None]).astype(jnp.bfloat16), None
        y = jax.lax.dot_general(x2.astype(kernel.dtype), kernel, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(-1)
    return y.astype(dt).reshape(*x.shape[:-1], kernel.shape[0])


def _quantized(w, layout: str, dtype):
    """(kernel, scale, kernel_sum) Params of [out, in] weights ``w`` in ``layout``."""
    if layout not in INT8_DECODING:
        return nnx.Param(w.astype(dtype), axes=(None, None)), None, None
    q, scale = quantize_int8(w)
    kernel_sum = nnx.Param(q.astype(jnp.int32).sum(axis=1), axes=(None,)) if layout == "w8a8" else None
    return nnx.Param(q, axes=(None, None)), nnx.Param(scale, axes=(None,)), kernel_sum


class DecodingLinear(nnx.Module):
    """``jaxgpt.model.Linear`` for sampling: ``kernel`` [out, in], maybe int8 with per-row ``scale``."""

    trains = False

    def __init__(self, linear, bias: nnx.Param, layout: str, dtype, cpu: bool):
        w = linear.kernel[...].reshape(linear.n_in, -1).T  # [in, ...] as the training layout stores it
        self.kernel, self.scale, self.kernel_sum = _quantized(w, layout, dtype)
        self.bias, self.cpu = bias, cpu

    def __call__(self, x):
        opt = [None if p is None else p[...] for p in (self.scale, self.kernel_sum)]
        return out_in_product(x, self.kernel[...], self.bias[...], *opt, cpu=self.cpu)


class DecodingHead(nnx.Module):
    """The tied head of a decoding layout: ``wte`` is already [out, in]; int8 tables have row scales."""

    def __init__(self, scale: nnx.Param | None, kernel_sum: nnx.Param | None, cpu: bool):
        self.scale, self.kernel_sum, self.cpu = scale, kernel_sum, cpu

    def scale_rows(self, tok, input_ids):
        """The looked-up embedding rows [B, T, E], dequantised."""
        return tok if self.scale is None else tok * self.scale[...][input_ids][..., None].astype(tok.dtype)

    def logits(self, x, wte):
        opt = [None if p is None else p[...] for p in (self.scale, self.kernel_sum)]
        return out_in_product(x.astype(jnp.float32), wte, None, *opt, cpu=self.cpu)


def for_decoding(model, layout: str = "bfloat16"):
    """A copy of ``model`` (a ``jaxgpt.model.GPT2``) stored for decoding in ``layout``.

    "float32": the same numbers, kernels [out, in] (faster products on a CPU; ``jaxgpt.sample.load_model``
    gives it for float32 on a CPU). "bfloat16": every parameter in bfloat16. "int8": kernels and the
    tied ``wte`` in int8 with one float32 scale per output row (``quantize_int8``, weight-only), the
    rest in bfloat16. "w8a8": the same int8 weights, and every product quantises its input activations
    to int8 too (``int8_matmul``); the rest stays as it was. Activations and the KV cache keep
    ``model.config.dtype``.
    """
    if model.decoding_layout:
        raise ValueError("the model is already in the decoding layout")
    if layout not in DECODING_LAYOUTS:
        raise ValueError(f"decoding dtype {layout!r}: choose from {list(DECODING_LAYOUTS)}")
    cfg, cpu = model.config, model.policy.cpu
    # bfloat16 / int8: every other floating parameter in bfloat16: next to float32 LayerNorms, biases and
    # wpe, XLA:CPU fused the one-row products differently and ran slower. w8a8 quantises its inputs anyway.
    rest = {"w8a8": cfg.param_dtype, "float32": "float32"}.get(layout, "bfloat16")
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(DTYPES[rest]) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    new, dt = nnx.merge(graphdef, state), DTYPES[rest]
    for old, block in zip(model.h, new.h):
        block.attn.c_attn = DecodingLinear(old.attn.c_attn, block.attn.c_attn.bias, layout, dt, cpu)
        block.attn.c_proj = DecodingLinear(old.attn.c_proj, block.attn.c_proj.bias, layout, dt, cpu)
        block.mlp.c_fc = DecodingLinear(old.mlp.c_fc, block.mlp.c_fc.bias, layout, dt, cpu)
        block.mlp.c_proj = DecodingLinear(old.mlp.c_proj, block.mlp.c_proj.bias, layout, dt, cpu)
    scale = kernel_sum = None
    if layout in INT8_DECODING:
        new.wte, scale, kernel_sum = _quantized(model.wte[...], layout, dt)
    new.head_layout = DecodingHead(scale, kernel_sum, cpu)
    new.decoding_layout = layout
    new.config = cfg.replace(param_dtype=rest)
    return new
