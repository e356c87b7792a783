"""GPT-2 in Flax NNX, numerically the same model as transformers' GPT2LMHeadModel.

Parameters are stored in the layout that makes the maths read plainly
(``x @ kernel``, heads as their own axis) and every parameter carries logical
axis names (``vocab``, ``embed``, ``heads``, ``head_dim``, ``mlp``) that
``jaxgpt.sharding`` maps onto a device mesh. The mapping to and from Hugging
Face tensor names lives in ``jaxgpt.weights``.

Forward inputs beyond ``input_ids``:
  positions    [B, T] position ids (default 0..T-1; per-segment for packed rows).
  segment_ids  [B, T] ints; a token attends only to earlier tokens of the same
               segment. 0 marks padding, which nothing attends to.
  cache        a KV cache from ``init_cache``; the call writes its keys/values
               at ``cache["index"]`` and returns ``(logits, new_cache)``.
  constrain    optional ``fn(x, *logical_axes) -> x`` that pins activations to the
               mesh (``jaxgpt.sharding.constrain``); the model itself knows no mesh.
  last_only    compute logits for the last position only ([B, 1, V]); a prefill
               needs no more, and the full [B, T, V] head is the largest buffer.
  hidden_only  return the final hidden states [B, T, E] instead of logits (the chunked
               training loss, ``jaxgpt.loss``, applies the tied head itself).

``for_decoding(model, "float32" | "bfloat16" | "int8" | "w8a8")`` returns a copy for sampling
with its weights stored [out, in] in that dtype (the decoding layout), which decodes faster on a CPU.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import kernels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture (HF ``config.json`` names) plus jaxgpt's numeric policy."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None -> 4 * n_embd, as in HF
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # jaxgpt-only knobs (not architecture): never written to config.json.
    dtype: str = "float32"  # computation dtype; logits and loss stay float32
    param_dtype: str = "float32"
    vocab_multiple: int = 1  # pad the embedding to a multiple (128 on TPU/GPU)
    dropout: float = 0.0
    remat: bool | str = "auto"  # see REMAT; True / False are read as "full" / "none"
    scan_layers: bool | None = None  # blocks as one lax.scan (full forward only); None: see scan_blocks()
    attention: str = "auto"  # full-sequence attention: see ATTENTION
    loss_chunks: int | None = None  # training loss: the head + cross-entropy in chunks; None: see loss_chunks()
    kernels: str = "auto"  # LayerNorm, bias + GELU, the loss's log-sum-exp: see KERNELS

    def settings(self) -> dict[str, Any]:
        """jaxgpt's knobs (everything after ``eos_token_id``), as keyword arguments."""
        return {k: getattr(self, k) for k in SETTINGS}

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported "
                f"(choose from {sorted(ACTIVATIONS)})"
            )
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key}={getattr(self, key)!r}: choose from {sorted(DTYPES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: choose from {list(ATTENTION)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r}: choose from {list(KERNELS)}")
        if self.loss_chunks is not None and self.loss_chunks < 1:
            raise ValueError(f"loss_chunks={self.loss_chunks}: must be at least 1")
        if isinstance(self.remat, bool):  # configs written before the policies
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r}: choose from {list(REMAT)}")
        if self.attention == "cudnn" and self.dropout:
            raise ValueError("attention='cudnn' has no attention-probability dropout: use dropout=0 or attention='einsum'")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("attention='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused attention has no float32)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.vocab_multiple)
        return -(-self.vocab_size // m) * m

    def replace(self, **kw) -> "GPT2Config":
        return dataclasses.replace(self, **kw)


# jaxgpt's own settings: the GPT2Config fields after the architecture (also the model.* keys of
# the run config of the same names). Derived, so a new knob reaches loaded models too.
_FIELDS = [f.name for f in dataclasses.fields(GPT2Config)]
SETTINGS = tuple(_FIELDS[_FIELDS.index("eos_token_id") + 1:])

# "einsum": two einsums around a float32 softmax, laid out for XLA:CPU (and the only path
# that reads a KV cache). "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that
# implementation; "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16 compute):
# the [B, H, T, T] scores are never stored (GPT-2 124M, seq 1024 on an H200: 1.65x the
# einsum step's tokens/s, 42% less memory; docs/benchmarks-history.md). "auto": "cudnn" where it
# applies (a GPU, bf16/fp16, no dropout), else "einsum".
ATTENTION = ("auto", "einsum", "xla", "cudnn")
# On a CPU, "einsum" attention over CHUNKED_FROM positions or more runs in chunks of queries
# (Attention._attend_chunked): two, or as many as it takes to keep them to QUERY_CHUNK rows (at
# most 8). GPT-2 124M's train step, 2-core AMD EPYC, against one chunk: 8 x 128 +4-9% (2 chunks),
# 4 x 256 +10% (2; 4 chunks: +3%), 8 x 512 +17% (2 or 4 chunks alike).
CHUNKED_FROM, QUERY_CHUNK = 128, 256


def attention_implementation(cfg: "GPT2Config") -> str:
    """The implementation ``cfg.attention`` means on the default backend."""
    if cfg.attention != "auto":
        return cfg.attention
    fused = jax.default_backend() == "gpu" and cfg.dtype != "float32" and not cfg.dropout
    return "cudnn" if fused else "einsum"


# LayerNorm, the MLP's bias + GELU and the chunked loss's log-sum-exp. "xla": jax.numpy, fused by
# XLA. "pallas": jaxgpt.kernels' Pallas (Triton) kernels, for NVIDIA GPUs; on several devices they
# run per shard where the caller traces under ``kernels.on_mesh`` (jaxgpt.train does), else the
# jax.numpy references run. "auto": "pallas" on NVIDIA GPUs of compute capability 8.0 or more (A100
# and later: measured on one H200 only) with bf16 / fp16 compute (GPT-2 124M at 32 x 1024 on an
# H200: 1.067x the tokens/s on packed rows, in the same run; 1.06x without the packing mask;
# docs/benchmarks-history.md), else "xla".
KERNELS = ("auto", "xla", "pallas")


def fused_kernels(cfg: "GPT2Config") -> bool:
    """Whether LayerNorm, bias + GELU and the loss's log-sum-exp run as jaxgpt.kernels' Pallas kernels."""
    gpu = jax.default_backend() == "gpu"
    if cfg.kernels == "pallas" and not gpu:
        raise ValueError(f"kernels='pallas' needs an NVIDIA GPU (the backend here is {jax.default_backend()}); "
                         f"use kernels='xla' or 'auto'")
    if cfg.kernels == "auto":
        return gpu and cfg.dtype != "float32" and _compute_capability() >= (8, 0)
    return cfg.kernels == "pallas"


def _compute_capability() -> tuple[int, ...]:
    """The first device's CUDA compute capability, e.g. (9, 0); () where it has none (a CPU, a ROCm GPU)."""
    try:
        return tuple(int(v) for v in str(getattr(jax.devices()[0], "compute_capability", "")).split("."))
    except ValueError:  # "" or not "major.minor"
        return ()


# What the backward pass recomputes. "none": every activation is kept. "full": each block is
# recomputed from its input. "minimal" (MaxText's name): the outputs of the weight matmuls
# are kept, and LayerNorm, GELU, the attention scores and softmax are recomputed from them.
# "auto": "none", except for scanned blocks on a CPU: "minimal". In the scan, minimal was a
# little faster than keeping everything and took half the memory (GPT-2 124M at 4 x 256,
# 10.0 s a step against 11.0 s; at 8 x 512, 41.5 s against 45.3 s, peak RSS 6.9 GB against
# 13.1 GB; docs/training.md). Unrolled on a CPU, minimal keeps as much as none: XLA:CPU drops
# the optimization barriers that keep the recomputation apart before its CSE pass, which then
# merges it with the forward (the same 8.0 GiB of temporaries at 8 x 512), and runs slower.
REMAT = ("auto", "none", "minimal", "full")
_REMAT_POLICIES = {"minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}

# On a CPU, "auto" blocks (scan_layers None) run unrolled for a micro-batch of at most this many
# rows (batch x seq), and as one scan above it. Unrolled, the step skips the scan's bookkeeping
# (stacking the weights, zero-filling and writing the stacked gradients: ~0.2 s a step for
# GPT-2 124M) but keeps every layer's activations. GPT-2 124M on 2 AMD EPYC cores, unrolled
# against the scan: 1,024 rows 1.04-1.05x the speed taking turns in one process (1.01-1.05x in
# fresh processes) in less memory (peak RSS 4.1 against 4.4 GiB); 4,096 rows the same speed in
# 10.3 against 6.8 GiB (docs/benchmarks-history.md).
UNROLL_ROWS = 2048


def scan_blocks(cfg: "GPT2Config", rows: int) -> bool:
    """Whether a full forward over ``rows`` (batch x seq) positions runs the blocks as one
    ``lax.scan``. By default (None): never on a GPU (on an H200 the unrolled blocks ran 1.27x
    faster in 30% less memory), above ``UNROLL_ROWS`` on a CPU, always elsewhere (compile time
    independent of depth, as in MaxText)."""
    if cfg.scan_layers is not None:
        return cfg.scan_layers
    backend = jax.default_backend()
    return backend != "gpu" and not (backend == "cpu" and rows <= UNROLL_ROWS)


def remat_policy(cfg: "GPT2Config", rows: int) -> str:
    """What ``cfg.remat`` means for a full forward over ``rows`` positions on the default
    backend: "none", "minimal" or "full"."""
    if cfg.remat != "auto":
        return cfg.remat
    return "minimal" if jax.default_backend() == "cpu" and scan_blocks(cfg, rows) else "none"


@jax.custom_vjp
def gradient_fence(x):
    """The identity, whose gradient XLA must materialise as it is (the unrolled blocks' input on a CPU).

    Unrolled, XLA:CPU fused the residual stream's gradient, an elementwise chain through every
    later layer's LayerNorm backward, into each layer's consumers of it: fusions of up to 229
    operands for GPT-2 124M, the work quadratic in depth (docs/benchmarks-history.md).
    ``lax.optimization_barrier`` does not stop it (XLA:CPU removes barriers before fusing); a
    loop whose trip count XLA cannot know does. Its body negates, so the gradient passes
    unchanged, bit for bit, after its two trips (none when its first element is NaN).
    """
    return x


def _fence_fwd(x):
    return x, None


def _fence_bwd(_, g):
    trips = 2 * (~jnp.isnan(g.reshape(-1)[0])).astype(jnp.int32)
    return (jax.lax.fori_loop(0, trips, lambda _, v: -v, g),)


gradient_fence.defvjp(_fence_fwd, _fence_bwd)


def loss_chunks(cfg: "GPT2Config", seq_len: int) -> int:
    """How many sequence chunks the training loss's head + cross-entropy runs in (jaxgpt.loss).
    By default (None) 8 on a GPU, where the float32 [B, T, vocab] logits and their gradient
    are the largest tensors of the step (GPT-2 124M at 32 x 1024 on an H200: 1.17x the
    tokens/s in 43% less memory), else 1: XLA:CPU re-packs the embedding for every chunk
    (docs/benchmarks-history.md). The default falls back to fewer chunks if seq_len does not divide."""
    if cfg.loss_chunks is not None:
        return cfg.loss_chunks
    if jax.default_backend() != "gpu":
        return 1
    return next(c for c in (8, 4, 2, 1) if seq_len % c == 0)


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


# Set by abstract_model: parameters are created as shapes (``jax.ShapeDtypeStruct``), not initialised.
_SHAPES_ONLY = contextvars.ContextVar("jaxgpt_shapes_only", default=False)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    # `axes` are logical names, one per dimension; jaxgpt.sharding maps them to the mesh.
    key = rngs.params()  # drawn for shapes too: the RNG streams advance as in a real construction
    return nnx.Param(jax.ShapeDtypeStruct(shape, dtype) if _SHAPES_ONLY.get() else init(key, shape, dtype), axes=axes)


def _no_constraint(x, *_logical_axes):
    return x


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
    """float32 [rows, in] x int8 [out, in] (a ``scale`` per output row, ``kernel_sum`` =
    its int32 row sums) -> float32 [rows, out], through an int8 x int8 -> int32 product.

    The activations are quantised per row on the fly (``quantize_rows_int8``: asymmetric,
    "zeropoint vector-wise" in LLM.int8()'s terms), and the zero point is taken out exactly:
    ``x . w = s_x * s_w * (q . w8 - zero * sum(w8))``. XLA:CPU runs this product on its
    int8 GEMM kernel (AVX-512 VNNI here); one row is padded to two, as one row falls back to
    a kernel 4-16x slower (measured on GPT-2 124M's shapes).
    """
    rows = x2.shape[0]
    if rows == 1:
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    q, s, zero = quantize_rows_int8(x2)
    acc = jax.lax.dot_general(q, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    acc = acc - zero.astype(jnp.int32) * kernel_sum
    return (acc.astype(jnp.float32) * s * scale)[:rows]


def linear(x, kernel, bias=None, *, out_in: bool = False, scale=None, kernel_sum=None):
    """``x @ kernel + bias`` over the last axis of ``x``, in ``x``'s dtype (no bias: None).

    ``kernel`` is stored [in, ...] (HF Conv1D's layout, the one jaxgpt trains in), or, with
    ``out_in``, as a 2-D [out, in] matrix: the decoding layout of ``for_decoding``. On a CPU the
    training layout's product runs on ``x`` as a 2-D [rows, in] matrix, so that autodiff's weight
    gradient ``X^T @ dY`` contracts one axis, not two (batch and sequence). GPT-2 124M's train
    step, float32, 2-core AMD EPYC, its variants taking turns in one process: 7% faster than the
    3-D product at 4 x 256, and 2.5-7% faster than a custom VJP computing ``dY^T @ X`` ([out, in],
    a YNNPACK product) and transposing it, at 1,024 and 2,048 rows; at 4,096 rows (8 x 512) that
    one was 1.5-2.3% faster (docs/benchmarks-history.md, eighteenth session). float32
    [out, in] kernels: several rows (up to 32) on a CPU run ``few_rows_product``; one row, and
    any row count elsewhere, a plain ``x @ kernel.T`` (one row: at the memory bandwidth on a
    CPU, 1.5x faster than ``x @ W`` with the training layout's W in a chain of GPT-2 124M's
    block products). For narrower kernels, the two products that XLA:CPU ran fastest with
    bfloat16 weights on GPT-2 124M's shapes (docs/benchmarks-history.md):
    - one row on a CPU (batch-1 decoding): a float32 vector-matrix product with the
      converted weights, which XLA emits as one loop that converts each weight as it reads
      it. In a loop this needs a compilation without loop-invariant code motion, which
      would hoist the conversion and read float32 copies (``sample.decode_no_hoisting``).
      A bfloat16 x bfloat16 product of one row ran 5-10x slower (a slow fallback kernel);
    - otherwise: a ``kernel.dtype`` x ``kernel.dtype`` product accumulated in float32
      (1.6x faster than float32 for the 768 x 50257 head at 8 rows).
    An int8 ``kernel`` comes with ``scale``, one float32 per output row (``quantize_int8``).
    One row runs the same converting product on the int8 weights, read at a quarter of
    float32's bytes (the head at one row: 4.0 ms against 8.9 ms in float32 and 6.1 ms in
    bfloat16); several rows dequantise the weights to bfloat16 first (XLA:CPU has no fast
    int8 x float product; the head at 8 rows: 27 ms against 22 ms in float32, 12 ms in bfloat16).
    With ``kernel_sum`` as well (the w8a8 layout), ``x`` is quantised too and every row count
    runs ``int8_matmul``.
    """
    dt = x.dtype
    if not out_in:
        w = kernel.astype(dt).reshape(x.shape[-1], -1)
        y = x @ w if jax.default_backend() != "cpu" else (
            (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1]))
        return y if bias is None else y + bias.astype(dt).reshape(-1)
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    if kernel_sum is not None:  # int8 weights and activations (for_decoding(..., "w8a8"))
        y, scale = int8_matmul(x2.astype(jnp.float32), kernel, scale, kernel_sum), None
    elif kernel.dtype != jnp.float32 and rows == 1 and jax.default_backend() == "cpu":
        y = jnp.dot(x2[0].astype(jnp.float32), kernel.T.astype(jnp.float32))[None]
    elif takes_few_rows_product(rows, kernel.dtype):
        y = few_rows_product(x2.astype(jnp.float32), kernel)
    else:
        if scale is not None:  # scaled before the product: a bare int8 -> bf16 cast fused into it ran 4x slower
            kernel, scale = (kernel.astype(jnp.float32) * scale[:, None]).astype(jnp.bfloat16), None
        y = jax.lax.dot_general(x2.astype(kernel.dtype), kernel, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(-1)
    return y.astype(dt).reshape(*x.shape[:-1], kernel.shape[0])


_FEW_ROWS = 32  # the most rows measured for few_rows_product (2-32)


def takes_few_rows_product(rows: int, dtype) -> bool:
    """Whether a product of ``rows`` rows with ``dtype`` weights runs ``few_rows_product``."""
    return dtype == jnp.float32 and 1 < rows <= _FEW_ROWS and jax.default_backend() == "cpu"


def few_rows_product(x2, kernel):
    """float32 [rows, in] x float32 [out, in] -> [rows, out] for a few rows on a CPU (batched
    decoding), computed as ``kernel @ x2.T`` -> [out, rows] and transposed after a barrier
    (without it XLA folds the transpose back into the product). In that orientation XLA:CPU
    streams the [out, in] weights through the product once; as ``x2 @ kernel.T`` (and as
    ``x2 @ W`` with W [in, out], the training layout) it reads them at about half the memory
    bandwidth. GPT-2 124M, 8 rows, 2-core AMD EPYC (docs/benchmarks-history.md): the 50,304 x 768 head
    9.4 ms against 16.7 ms; a chain of the 48 block products 19.4 ms against 29.6 ms with the
    training layout's W.
    One row runs at the bandwidth either way; bfloat16 weights ran 3x slower this way.
    """
    y = jax.lax.dot_general(kernel, x2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(y).T


def _dense(module, name: str, x):
    """``linear`` with ``module``'s ``{name}_kernel`` and ``{name}_bias`` (and, for int8
    decoding weights, ``{name}_scale``; for w8a8, ``{name}_sum`` too)."""
    scale, ksum = getattr(module, f"{name}_scale", None), getattr(module, f"{name}_sum", None)
    return linear(x, getattr(module, f"{name}_kernel")[...], getattr(module, f"{name}_bias")[...],
                  out_in=module.out_in, scale=None if scale is None else scale[...],
                  kernel_sum=None if ksum is None else ksum[...])


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs, fused: bool = False):
        self.eps, self.fused = eps, fused
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x):
        # Statistics in float32 whatever the compute dtype.
        norm = kernels.layer_norm if self.fused else kernels.reference_layer_norm
        return norm(x, self.scale[...], self.bias[...], self.eps)

    def add_norm(self, x, delta):
        """(x + delta, LayerNorm(x + delta)): a residual add and this LayerNorm, one kernel each way when fused."""
        add_norm = kernels.add_layer_norm if self.fused else kernels.reference_add_layer_norm
        return add_norm(x, delta, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
    """Causal self-attention with a fused QKV projection (HF ``c_attn``)."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        e, h, d, pd = cfg.n_embd, cfg.n_head, cfg.head_dim, DTYPES[cfg.param_dtype]
        normal = nnx.initializers.normal(0.02)
        # proj std scaled by depth as in GPT-2 (only matters for from-scratch init)
        proj = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer))
        zeros = nnx.initializers.zeros
        self.n_head, self.head_dim, self.implementation = h, d, attention_implementation(cfg)
        self.out_in = False  # kernels in the decoding layout (for_decoding)
        self.c_attn_kernel = _param(rngs, normal, (e, 3, h, d), ("embed", None, "heads", "head_dim"), pd)
        self.c_attn_bias = _param(rngs, zeros, (3, h, d), (None, "heads", "head_dim"), pd)
        self.c_proj_kernel = _param(rngs, proj, (h, d, e), ("heads", "head_dim", "embed"), pd)
        self.c_proj_bias = _param(rngs, zeros, (e,), ("embed",), pd)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, mask, layer_cache=None, cache_index=None, constrain=_no_constraint):
        b, t, e = x.shape
        h, d = self.n_head, self.head_dim
        # Plain 2-D matmuls with heads folded into columns: XLA:CPU runs 4-D dots such as
        # "bte,ekhd->kbthd" up to 13x slower than the same GEMM (measured for one-token decoding).
        qkv = _dense(self, "c_attn", x)
        qkv = constrain(qkv.reshape(b, t, 3, h, d), "batch", "seq", None, "heads", "head_dim")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, D]
        if layer_cache is None and self.implementation != "einsum":
            # A mask (packed segments) becomes an additive bias; is_causal lets cuDNN skip the
            # blocks above the diagonal.
            out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                               is_causal=True, implementation=self.implementation)
            return self._project(out, x), None
        if layer_cache is not None:
            return self._attend_cached(q, k, v, x, mask, layer_cache, cache_index)
        if t >= CHUNKED_FROM and jax.default_backend() == "cpu":
            out = self._attend_chunked(q, k, v, mask)
        else:
            out = self._softmax_attention(q, k, v, mask, heads_leading=False)
        return self._project(out, x), None

    def _softmax_attention(self, q, k, v, mask, heads_leading):
        """softmax(q k^T / sqrt(d), where mask) v, the scores in float32; [B, T, H, D] or, with
        ``heads_leading``, [B, H, T, D] in and out."""
        qk, pv = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_leading else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
        scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1))
        return jnp.einsum(pv, probs.astype(q.dtype), v)

    def _attend_chunked(self, q, k, v, mask):
        """Causal attention in chunks of queries, each against the keys up to its last query.

        The keys after a chunk are masked for all of its queries, so skipping them changes no
        result (except on padding rows, which see no key at all and nothing reads). In n chunks
        the [B, H, T, T] scores shrink to (n + 1) / 2n of their size, in pieces that stay in the
        CPU's caches better. Heads lead ([B, H, T, D]), the layout XLA:CPU's batched dots ran
        fastest. GPT-2 124M's attention alone, forward + backward, one layer at 8 x 512, 2-core
        AMD EPYC: 234 ms in 4 chunks against 384 ms whole (PyTorch's SDPA: 198 ms); in the
        train step, 2 and 4 chunks ran alike there.
        """
        t = q.shape[1]
        q, k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))  # [B, H, T, D]
        n = min(8, max(2, -(-t // QUERY_CHUNK)))
        c = -(-t // n)
        outs = [self._softmax_attention(q[:, :, start:start + c], k[:, :, :start + c], v[:, :, :start + c],
                                        mask[:, start:start + c, :start + c], heads_leading=True)
                for start in range(0, t, c)]
        return jnp.transpose(jnp.concatenate(outs, axis=2), (0, 2, 1, 3))

    def _attend_cached(self, q, k, v, x, mask, layer_cache, cache_index):
        """Write the new keys/values into the cache at ``cache_index`` and attend to it.

        The cache keeps batch and heads as one axis: keys [B*H, D, S], values [B*H, S, D],
        the layouts both attention matmuls read as stored. Stored as [B, S, H, D], XLA:CPU
        transposed the whole cache of every layer at every decoded token (a quarter of the
        step at batch 8); with a separate batch axis of size 1, it copied every layer's cache
        four times per token at batch 1 (the squeezed axis made the update two fusions).
        """
        dt = x.dtype
        (b, t, h, d), bh = q.shape, q.shape[0] * q.shape[2]
        kt = jnp.transpose(k, (0, 2, 3, 1)).reshape(bh, d, t).astype(layer_cache["k"].dtype)
        vt = jnp.transpose(v, (0, 2, 1, 3)).reshape(bh, t, d).astype(layer_cache["v"].dtype)
        k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], kt, cache_index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], vt, cache_index, axis=1)
        q = jnp.transpose(q, (0, 2, 1, 3)).reshape(bh, t, d)
        scores = jnp.einsum("xqd,xdk->xqk", q, k.astype(dt), preferred_element_type=jnp.float32)
        scores = scores.reshape(b, h, t, -1) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).reshape(bh, t, -1)
        out = jnp.einsum("xqk,xkd->xqd", probs.astype(dt), v.astype(dt))
        out = jnp.transpose(out.reshape(b, h, t, d), (0, 2, 1, 3))
        return self._project(out, x), {"k": k, "v": v}

    def _project(self, out, x):
        """[B, T, H, D] attention output -> [B, T, E] (HF ``c_proj``), with residual dropout."""
        b, t, _ = x.shape
        out = _dense(self, "c_proj", out.reshape(b, t, -1))
        return self.dropout(out)


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        e, i, pd = cfg.n_embd, cfg.inner_dim, DTYPES[cfg.param_dtype]
        normal = nnx.initializers.normal(0.02)
        proj = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer))
        zeros = nnx.initializers.zeros
        self.act = ACTIVATIONS[cfg.activation_function]
        self.fused = fused_kernels(cfg) and cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.out_in = False  # kernels in the decoding layout (for_decoding)
        self.c_fc_kernel = _param(rngs, normal, (e, i), ("embed", "mlp"), pd)
        self.c_fc_bias = _param(rngs, zeros, (i,), ("mlp",), pd)
        self.c_proj_kernel = _param(rngs, proj, (i, e), ("mlp", "embed"), pd)
        self.c_proj_bias = _param(rngs, zeros, (e,), ("embed",), pd)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, constrain=_no_constraint):
        if self.out_in:  # the decoding layout: no gradients
            h = self.act(_dense(self, "c_fc", x))
        elif self.fused:  # bias + GELU as one kernel each way, recomputed in the backward too
            h = kernels.bias_gelu(linear(x, self.c_fc_kernel[...]), self.c_fc_bias[...])
        else:
            # The bias and activation are recomputed in the backward pass from the product's output,
            # which is kept anyway. Otherwise XLA:GPU stores tanh's [B, T, 4E] output for the backward:
            # GPT-2 124M at 32 x 1024 on an H200 took 2.4 GiB more memory and 0.5-0.8 ms more a step.
            h = jax.checkpoint(lambda y, bias: self.act(y + bias.astype(y.dtype)))(
                linear(x, self.c_fc_kernel[...]), self.c_fc_bias[...])
        h = constrain(h, "batch", "seq", "mlp")
        return self.dropout(_dense(self, "c_proj", h))


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        fused = fused_kernels(cfg)
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, fused)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, fused)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, mask, layer_cache=None, cache_index=None, constrain=_no_constraint):
        a, layer_cache = self.attn(self.ln_1(x), mask, layer_cache, cache_index, constrain)
        x, h = self.ln_2.add_norm(x, a)
        x = x + self.mlp(h, constrain)
        # The residual stream: split over the batch, whole along embed (FSDP gathers weights, not activations).
        return constrain(x, "batch", "seq", None), layer_cache


class GPT2(nnx.Module):
    """GPT-2 language model; ``lm_head`` is tied to the token embedding ``wte``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = DTYPES[cfg.param_dtype]
        normal = nnx.initializers.normal(0.02)
        self.wte = _param(rngs, normal, (cfg.padded_vocab_size, cfg.n_embd), ("vocab", "embed"), pd)
        self.wpe = _param(rngs, nnx.initializers.normal(0.01), (cfg.n_positions, cfg.n_embd), (None, "embed"), pd)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, fused_kernels(cfg))
        self.decoding_layout = None  # "bfloat16", "int8" or "w8a8": set by for_decoding()

    def __call__(self, input_ids, *, positions=None, segment_ids=None, cache=None, last_only=False,
                 hidden_only=False, constrain=None):
        cfg = self.config
        dt = DTYPES[cfg.dtype]
        b, t = input_ids.shape
        if positions is None and cache is None and t > cfg.n_positions:
            # jax would clamp the position lookup and quietly compute something else. (Explicit
            # positions, as in packed rows or left-padded prompts, are the caller's to keep in range.)
            raise ValueError(f"input of {t} tokens is longer than the model's context, n_positions={cfg.n_positions}")
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        # jax.nn.dot_product_attention applies causality itself: a mask only for packed segments.
        library_causal_only = segment_ids is None and cache is None and self.h[0].attn.implementation != "einsum"
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)

        if cache is None:
            q_seg, k_seg = segment_ids, segment_ids
            causal = jnp.tril(jnp.ones((t, t), bool))
            index = None
        else:
            index = cache["index"]
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), index, axis=1)
            q_seg = segment_ids
            slots = jnp.arange(k_seg.shape[1])
            causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
        mask = causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
        if library_causal_only:
            mask = None

        constrain = constrain or _no_constraint
        # The lookup reads whole rows: gather the (FSDP/vocab-sharded) tables first, as FSDP does for every weight.
        wte, wpe = constrain(self.wte[...], None, None), constrain(self.wpe[...], None, None)
        tok = wte[input_ids].astype(dt)
        wte_scale, wte_sum = getattr(self, "wte_scale", None), getattr(self, "wte_sum", None)  # int8 layouts
        if wte_scale is not None:  # one scale per token row
            tok = tok * wte_scale[...][input_ids][..., None].astype(dt)
        x = tok + wpe[positions].astype(dt)
        x = constrain(self.drop(x), "batch", "seq", None)

        new_layers = []
        remat = "none" if cache is not None else remat_policy(cfg, b * t)
        fence = cache is None and jax.default_backend() == "cpu"
        if cache is None and scan_blocks(cfg, b * t) and len(self.h) > 1:
            x = self._scan_blocks(x, mask, constrain, remat)
        else:
            for i, block in enumerate(self.h):
                layer_cache = None if cache is None else cache["layers"][i]
                if fence:
                    x = gradient_fence(x)
                if remat != "none":
                    x, _ = nnx.remat(lambda blk, y, m: blk(y, m, constrain=constrain),
                                     policy=_REMAT_POLICIES[remat])(block, x, mask)
                else:
                    x, layer_cache = block(x, mask, layer_cache, index, constrain)
                new_layers.append(layer_cache)

        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        if hidden_only:  # the final hidden states [B, T, E], for a loss that applies the head itself
            return x
        if self.decoding_layout:  # wte [V, E] is already [out, in]
            logits = linear(x.astype(jnp.float32), self.wte[...], out_in=True,
                            scale=None if wte_scale is None else wte_scale[...],
                            kernel_sum=None if wte_sum is None else wte_sum[...])
        elif cache is not None and takes_few_rows_product(x.shape[0] * x.shape[1], dt):  # training layout: wte [V, E]
            logits = few_rows_product(x.reshape(-1, x.shape[-1]), self.wte[...]).reshape(*x.shape[:2], -1)
        else:
            logits = jnp.einsum("bte,ve->btv", x, self.wte[...].astype(dt), preferred_element_type=jnp.float32)
        logits = logits[..., : cfg.vocab_size]  # padded rows never get probability
        if cache is None:
            return logits
        new_cache = {"layers": new_layers, "segment_ids": k_seg, "index": index + t}
        return logits, new_cache

    def _scan_blocks(self, x, mask, constrain, remat):
        """The blocks as one ``lax.scan`` over their states, stacked on the fly.

        Parameters stay stored per layer (``h.0``, ``h.1``, ... as in HF); only the
        computation is a loop. That makes compile time independent of depth, and the
        residual stream's gradient is one materialised loop carry (the unrolled blocks need
        ``gradient_fence`` on a CPU for that). The blocks' non-parameter state (dropout RNG
        streams) goes through the loop and comes back updated, as in the unrolled loop.
        """
        graphdef = nnx.graphdef(self.h[0])
        states = [nnx.state(block) for block in self.h]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(y, state):
            block = nnx.merge(graphdef, state)
            y, _ = block(y, mask, constrain=constrain)
            return y, nnx.state(block, nnx.Not(nnx.Param))

        if remat != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=_REMAT_POLICIES[remat])
        x, new_rest = jax.lax.scan(body, x, stacked)
        for i, block in enumerate(self.h):
            nnx.update(block, jax.tree.map(lambda a, i=i: a[i], new_rest))
        return x


def abstract_model(cfg: GPT2Config, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest) of ``GPT2(cfg, rngs=nnx.Rngs(seed))`` without creating its weights:
    the parameters as shapes (``ShapeDtypeStruct`` values, their ``axes`` kept), the rest (the
    dropout RNG streams) computed on this host (``jaxgpt.sharding.from_host`` places them on a mesh).

    The model is constructed eagerly, each parameter's RNG draw made but its initialiser not run:
    0.25-0.45 s at 124M and at 48 layers. (Traced instead, by ``nnx.eval_shape`` or ``jax.jit``, it
    took 0.8-1.2 s and 6-13 s: flax probes the sharding of every RNG-counter update, and jax builds
    each probe's error message by walking the trace so far, jax-ml/jax#40041.)
    """
    token = _SHAPES_ONLY.set(True)
    try:
        return nnx.split(GPT2(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    finally:
        _SHAPES_ONLY.reset(token)


DECODING_DTYPES = ("bfloat16", "int8", "w8a8")  # the layouts that read fewer bytes than float32
DECODING_LAYOUTS = ("float32", *DECODING_DTYPES)
INT8_DECODING = ("int8", "w8a8")  # the layouts with int8 weights, quantised from float32 ones


def quantize_int8(w):
    """[out, in] weights -> (int8 [out, in], float32 [out]): symmetric, one scale per output row."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # all-zero rows (vocabulary padding)
    return jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8), scale


def for_decoding(model: GPT2, dtype: str = "bfloat16") -> GPT2:
    """A copy of ``model`` stored for decoding, with kernels [out, in] in ``dtype``.

    ``dtype="float32"``: every parameter in float32, the same numbers; only the kernels'
    orientation changes, for the products ``linear`` runs fastest on a CPU (GPT-2 124M, greedy,
    2-core AMD EPYC, alternating processes: 1.03-1.10x the training layout's tokens/s at batch 1,
    1.32x at batch 8).
    ``jaxgpt.sample.load_model`` gives it for float32 on a CPU.
    ``dtype="bfloat16"``: every parameter in bfloat16. ``dtype="int8"``: the kernels and the
    tied embedding ``wte`` in int8 with one float32 scale per output row (``quantize_int8``,
    weight-only: activations stay in ``config.dtype``), the rest in bfloat16. ``dtype="w8a8"``:
    the same int8 weights (plus their row sums), and every product quantises its input
    activations to int8 as well, per row on the fly (``int8_matmul``); the rest stays as it was.
    The block kernels become 2-D [out, in] matrices (``wte`` already is one); ``linear`` then
    runs the products XLA:CPU does fastest with such weights. Decoding reads every weight
    once per token, and this reads a half (a quarter) of float32's bytes. Measured on a
    2-core Cascade Lake with GPT-2 124M, against float32 in the training layout
    (docs/benchmarks-history.md): bfloat16 1.3-1.45x the float32 tokens/s at batch 8, about even at
    batch 1; int8 1.28x float32 at batch 1, about float32's speed at batch 8; w8a8 1.6-1.8x
    float32 at batch 1 and 1.8x at batch 8 (the weight-only layouts' one-row products are XLA
    loops; w8a8's run on the int8 GEMM kernel).
    ``tools/decode_quality.py`` compares the outputs with float32.
    Activations and the KV cache keep ``model.config.dtype``. For sampling and evaluation only:
    the copy cannot be trained, saved or exported (``jaxgpt.weights`` refuses it).
    """
    if model.decoding_layout:
        raise ValueError("the model is already in the decoding layout")
    if dtype not in DECODING_LAYOUTS:
        raise ValueError(f"decoding dtype {dtype!r}: choose from {list(DECODING_LAYOUTS)}")
    cfg = model.config
    # bfloat16 / int8: every other floating parameter in bfloat16. With float32 LayerNorms, biases and
    # ``wpe`` next to bfloat16 kernels, XLA:CPU fused the one-row products differently and batch-1
    # decoding ran ~2.5x slower. w8a8's products quantise their input first, and float32 cost nothing.
    rest = {"w8a8": cfg.param_dtype, "float32": "float32"}.get(dtype, "bfloat16")
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(DTYPES[rest]) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    new = nnx.merge(graphdef, state)

    def store(module, name, w, scale_name):  # w: [out, in], from the original weights
        if dtype in INT8_DECODING:
            w, scale = quantize_int8(w)
            setattr(module, scale_name, nnx.Param(scale, axes=(None,)))
            if dtype == "w8a8":  # row sums, to take the activations' zero point out (int8_matmul)
                setattr(module, scale_name.replace("_scale", "_sum"),
                        nnx.Param(w.astype(jnp.int32).sum(axis=1), axes=(None,)))
        else:
            w = w.astype(DTYPES[rest])
        setattr(module, name, nnx.Param(w, axes=(None, None)))

    for old, block in zip(model.h, new.h):
        for part, name, n_in in (("attn", "c_attn", cfg.n_embd), ("attn", "c_proj", cfg.n_head * cfg.head_dim),
                                 ("mlp", "c_fc", cfg.n_embd), ("mlp", "c_proj", cfg.inner_dim)):
            kernel = getattr(getattr(old, part), f"{name}_kernel")[...]  # [in, ...] as linear() reads it
            store(getattr(block, part), f"{name}_kernel", kernel.reshape(n_in, -1).T, f"{name}_scale")
        block.attn.out_in = block.mlp.out_in = True
    if dtype in INT8_DECODING:
        store(new, "wte", model.wte[...], "wte_scale")
    new.decoding_layout = dtype
    new.config = cfg.replace(param_dtype=rest)
    return new


def init_cache(cfg: GPT2Config, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache of ``max_len`` slots (at most ``n_positions``)."""
    dtype = DTYPES[cfg.dtype] if dtype is None else dtype
    # batch and heads as one axis, keys transposed: the layouts attention reads (Attention._attend_cached)
    k_shape = (batch * cfg.n_head, cfg.head_dim, max_len)
    v_shape = (batch * cfg.n_head, max_len, cfg.head_dim)
    layers = [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)} for _ in range(cfg.n_layer)]
    return {"layers": layers, "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.array(0, jnp.int32)}


def num_params(model: GPT2, *, exclude_embeddings: bool = False) -> int:
    state = nnx.state(model, nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(state))
    if exclude_embeddings:
        n -= model.wpe.size
    return n


def resize_token_embeddings(model: GPT2, vocab_size: int) -> GPT2:
    """A copy of ``model`` with ``vocab_size`` real token rows (for added chat tokens).

    New rows start at the mean of the existing real rows, the usual choice for
    added special tokens (their logits start at the average, not at random).
    """
    cfg = model.config
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {cfg.vocab_size} to {vocab_size}")
    new_cfg = cfg.replace(vocab_size=vocab_size)
    graphdef = abstract_model(new_cfg)[0]
    old = nnx.state(model)
    wte = old["wte"][...]
    real = wte[: cfg.vocab_size]
    mean = real.mean(0, keepdims=True)
    n_new, n_pad = vocab_size - cfg.vocab_size, new_cfg.padded_vocab_size - vocab_size
    new_wte = jnp.concatenate([real, jnp.repeat(mean, n_new, 0), jnp.zeros((n_pad, cfg.n_embd), wte.dtype)])
    # Left where jax puts it (on a mesh: replicated). Placing it is the caller's job: the old layout
    # may not divide the new row count (jaxgpt.train.build_model places it by the sharding rules).
    old["wte"] = old["wte"].replace(new_wte)
    return nnx.merge(graphdef, old)
