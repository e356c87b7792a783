"""GPU kernels (Pallas on Triton) for the train step's elementwise work: LayerNorm and the MLP's
bias + GELU (each a forward and a backward kernel under a ``jax.custom_vjp``), and the chunked
loss's log-sum-exp. The model uses them with ``model.kernels`` (by default on NVIDIA GPUs in bf16;
on a mesh of several devices, per shard: ``on_mesh``).

Why: XLA:GPU ran each LayerNorm in four passes with a float32 intermediate, bias + GELU below the
memory bandwidth and the log-sum-exp in two passes; these read and write each activation once
(the speed-up: docs/benchmarks.md, "Backend defaults").

- ``layer_norm``: a few rows per program, held in registers; the backward recomputes the
  statistics from x and writes per-program partial sums of the scale and bias gradients.
  ``add_layer_norm`` takes the residual add before it into the same kernels.
- ``bias_gelu``: ``gelu_tanh(y + bias)``; the backward recomputes GELU from ``y``, so only ``y``
  is kept, as ``jax.checkpoint`` would.
- ``logsumexp``: one pass over each row with a running maximum.

The ``reference_*`` functions are the same math in jax.numpy: what the model runs elsewhere, and
what the tests compare the kernels with, in Pallas' interpreter on a CPU (``interpret=True``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding

# Tiling for GPT-2's widths (rows per block, blocks per backward program, Triton warps, pipeline
# stages), the fastest found on an H200 (docs/benchmarks-history.md).
LN_ROWS, LN_BLOCKS, LN_WARPS, LN_STAGES = 4, 8, 4, 2
GELU_ROWS, GELU_COLS, GELU_BLOCKS, GELU_WARPS = 16, 256, 8, 4
LSE_ROWS, LSE_COLS, LSE_WARPS, LSE_STAGES = 1, 2048, 8, 2
# tanh as the GPU's tanh.approx.f32 (relative error ~2^-11, below bf16's 2^-8); not in the interpreter.
APPROX_TANH = True

_C = math.sqrt(2 / math.pi)
_A = 0.044715


def reference_layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis, statistics in float32, the result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


def reference_bias_gelu(y, bias):
    """GELU, tanh approximation (GPT-2's ``gelu_new``), of ``y + bias``, in ``y``'s dtype."""
    return jax.nn.gelu(y + bias.astype(y.dtype), approximate=True)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # Triton blocks are powers of two


def _block(ref, r, c, m):
    return plgpu.load(ref.at[r[:, None], c[None, :]], mask=m, other=0.0).astype(jnp.float32)


def _store(ref, r, c, m, value):
    plgpu.store(ref.at[r[:, None], c[None, :]], value.astype(ref.dtype), mask=m)


def _vector(ref, c, cm):
    return plgpu.load(ref.at[c], mask=cm, other=0.0).astype(jnp.float32)


def _call(kernel, grid, out_shape, warps, name, interpret, *args, stages=1):
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, name=name, interpret=interpret,
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(*args)


# ----------------------------------------------------------------------------- devices

_MESH = contextvars.ContextVar("jaxgpt_kernels_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh):
    """Within it, on a mesh of several devices, the kernels run on each device's shard
    (``jax.shard_map``: rows split as the batch, the MLP's columns as its hidden units; the scale
    and bias gradients summed over the shards). jaxgpt.step traces its step inside it. Without
    it, several devices run the jax.numpy references: the kernels have no sharding rule of their
    own, and XLA would run each whole on every device."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def _per_device(run, reference, args, in_axes, out_axes):
    """``run(*args)`` on one device; on each shard under ``on_mesh``; ``reference(*args)`` on
    several devices without a mesh. ``in_axes`` / ``out_axes``: each argument's and output's
    logical axis names (jaxgpt.sharding.RULES); a dimension its mesh axes do not divide is whole."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1:
        return reference(*args) if mesh is None and jax.device_count() > 1 else run(*args)
    spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh)
    in_specs = tuple(spec(a, x.shape) for a, x in zip(in_axes, args))
    out_shapes = jax.eval_shape(run, *args)
    out_specs = (tuple(spec(a, s.shape) for a, s in zip(out_axes, out_shapes)) if isinstance(out_shapes, tuple)
                 else spec(out_axes, out_shapes.shape))
    # check_vma=False: pallas_call declares no varying-axes types; the replicated inputs' gradients
    # are still summed over the shards (tests/test_kernels.py checks them on a 2x2x2 mesh).
    return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _rows(x) -> tuple:
    """Logical axes of an activation [batch, seq..., features]: rows as the batch."""
    return ("batch",) + ("seq",) * (x.ndim - 2) + (None,)


# ----------------------------------------------------------------------------- LayerNorm

def _ln_stats(x, n, m, eps):
    """A float32 block of rows: centred (zero outside ``m``), and the rows' 1 / std."""
    mean = jnp.sum(x, axis=1, keepdims=True) / n
    xc = jnp.where(m, x - mean, 0.0)
    return xc, jax.lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / n + eps)


def _ln_forward_kernel(*refs, eps, rows, cols, add):
    """y = LayerNorm(x); with ``add``, s = x + delta (rounded to x's dtype, as the unfused add) and
    y = LayerNorm(s), both written."""
    if add:
        x_ref, d_ref, w_ref, b_ref, s_ref, y_ref = refs
    else:
        x_ref, w_ref, b_ref, y_ref = refs
    n_rows, n = x_ref.shape
    r = pl.program_id(0) * rows + jnp.arange(rows)
    c = jnp.arange(cols)
    cm = c < n
    m = (r < n_rows)[:, None] & cm[None, :]
    x = _block(x_ref, r, c, m)
    if add:
        x = (x + _block(d_ref, r, c, m)).astype(s_ref.dtype)
        _store(s_ref, r, c, m, x)
        x = x.astype(jnp.float32)
    xc, rstd = _ln_stats(x, n, m, eps)
    _store(y_ref, r, c, m, xc * rstd * _vector(w_ref, c, cm)[None, :] + _vector(b_ref, c, cm)[None, :])


def _ln_backward_kernel(*refs, eps, rows, cols, blocks, add):
    """dx (plus the incoming gradient of s, with ``add``), and each program's partial sums of the
    scale and bias gradients."""
    if add:
        x_ref, w_ref, dy_ref, ds_ref, dx_ref, dw_ref, db_ref = refs
    else:
        x_ref, w_ref, dy_ref, dx_ref, dw_ref, db_ref = refs
    n_rows, n = x_ref.shape
    g = pl.program_id(0)
    c = jnp.arange(cols)
    cm = c < n
    w = _vector(w_ref, c, cm)

    def block(j, acc):
        r = (g * blocks + j) * rows + jnp.arange(rows)
        m = (r < n_rows)[:, None] & cm[None, :]
        xc, rstd = _ln_stats(_block(x_ref, r, c, m), n, m, eps)
        xhat = xc * rstd
        dy = _block(dy_ref, r, c, m)
        wdy = dy * w[None, :]
        c1 = jnp.sum(xhat * wdy, axis=1, keepdims=True) / n
        c2 = jnp.sum(wdy, axis=1, keepdims=True) / n
        dx = (wdy - xhat * c1 - c2) * rstd
        _store(dx_ref, r, c, m, dx + _block(ds_ref, r, c, m) if add else dx)
        return acc[0] + jnp.sum(dy * xhat, axis=0), acc[1] + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((cols,), jnp.float32)
    dw, db = jax.lax.fori_loop(0, blocks, block, (zeros, zeros))
    plgpu.store(dw_ref.at[g * n + c], dw, mask=cm)  # partial sums: [programs * n], one row each
    plgpu.store(db_ref.at[g * n + c], db, mask=cm)


def _ln_forward(x2, delta2, scale, bias, eps, interpret):
    """LayerNorm of x2 (of x2 + delta2 unless delta2 is None): y, or (s, y)."""
    add = delta2 is not None
    kernel = functools.partial(_ln_forward_kernel, eps=eps, rows=LN_ROWS, cols=_pow2(x2.shape[1]), add=add)
    out = jax.ShapeDtypeStruct(x2.shape, x2.dtype)
    return _call(kernel, (pl.cdiv(x2.shape[0], LN_ROWS),), (out, out) if add else out, LN_WARPS,
                 "jaxgpt_add_layer_norm" if add else "jaxgpt_layer_norm", interpret,
                 *((x2, delta2) if add else (x2,)), scale, bias)


def _ln_backward(x2, scale, bias, dy2, ds2, interpret, eps):
    """(dx [+ ds2], dscale, dbias) of LayerNorm at x2."""
    add = ds2 is not None
    programs = pl.cdiv(x2.shape[0], LN_ROWS * LN_BLOCKS)
    kernel = functools.partial(_ln_backward_kernel, eps=eps, rows=LN_ROWS, cols=_pow2(x2.shape[1]),
                               blocks=LN_BLOCKS, add=add)
    partial = jax.ShapeDtypeStruct((programs * x2.shape[1],), jnp.float32)
    dx, dw, db = _call(kernel, (programs,), (jax.ShapeDtypeStruct(x2.shape, x2.dtype), partial, partial),
                       LN_WARPS, "jaxgpt_add_layer_norm_backward" if add else "jaxgpt_layer_norm_backward",
                       interpret, x2, scale, dy2, *((ds2,) if add else ()), stages=LN_STAGES)
    dw, db = (p.reshape(programs, -1).sum(0) for p in (dw, db))
    return dx, dw.astype(scale.dtype), db.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x2, scale, bias, eps, interpret):
    return _ln_forward(x2, None, scale, bias, eps, interpret)


def _layer_norm_fwd(x2, scale, bias, eps, interpret):
    return _layer_norm(x2, scale, bias, eps, interpret), (x2, scale, bias)


def _layer_norm_bwd(eps, interpret, res, dy2):
    return _ln_backward(*res, dy2, None, interpret, eps)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _add_layer_norm(x2, delta2, scale, bias, eps, interpret):
    return _ln_forward(x2, delta2, scale, bias, eps, interpret)


def _add_layer_norm_fwd(x2, delta2, scale, bias, eps, interpret):
    s, y = _add_layer_norm(x2, delta2, scale, bias, eps, interpret)
    return (s, y), (s, scale, bias)


def _add_layer_norm_bwd(eps, interpret, res, cotangents):
    ds2, dy2 = cotangents
    dx, dw, db = _ln_backward(*res, dy2, ds2, interpret, eps)
    return dx, dx, dw, db  # x and delta get the same gradient: that of s


_add_layer_norm.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


def layer_norm(x, scale, bias, eps: float, *, interpret: bool = False):
    """``reference_layer_norm`` as the fused kernels (and their VJP); x [..., E], scale and bias
    [E]. ``interpret`` runs them in Pallas' interpreter (any backend: the tests)."""
    def run(x, scale, bias):
        return _layer_norm(x.reshape(-1, x.shape[-1]), scale, bias, eps, interpret).reshape(x.shape)

    return _per_device(run, functools.partial(reference_layer_norm, eps=eps), (x, scale, bias),
                       (_rows(x), (None,), (None,)), _rows(x))


def reference_add_layer_norm(x, delta, scale, bias, eps: float):
    """(x + delta, LayerNorm(x + delta)): a residual add and the LayerNorm after it."""
    s = x + delta
    return s, reference_layer_norm(s, scale, bias, eps)


def add_layer_norm(x, delta, scale, bias, eps: float, *, interpret: bool = False):
    """``reference_add_layer_norm`` as one kernel each way: the forward writes s and y in one pass,
    the backward adds s's incoming gradient to LayerNorm's. x and delta [..., E], the same dtype."""
    def run(x, delta, scale, bias):
        s, y = _add_layer_norm(x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1]), scale, bias, eps,
                               interpret)
        return s.reshape(x.shape), y.reshape(x.shape)

    return _per_device(run, functools.partial(reference_add_layer_norm, eps=eps), (x, delta, scale, bias),
                       (_rows(x), _rows(x), (None,), (None,)), (_rows(x), _rows(x)))


# ----------------------------------------------------------------------------- bias + GELU

def _tanh(u, approx):
    return plgpu.approx_tanh(u) if approx else jnp.tanh(u)


def _gelu_forward_kernel(y_ref, b_ref, h_ref, *, rows, cols, approx):
    n_rows, n = y_ref.shape
    r = pl.program_id(0) * rows + jnp.arange(rows)
    c = pl.program_id(1) * cols + jnp.arange(cols)
    cm = c < n
    m = (r < n_rows)[:, None] & cm[None, :]
    x = _block(y_ref, r, c, m) + _vector(b_ref, c, cm)[None, :]
    _store(h_ref, r, c, m, 0.5 * x * (1 + _tanh(_C * (x + _A * x * x * x), approx)))


def _gelu_backward_kernel(y_ref, b_ref, dh_ref, dy_ref, db_ref, *, rows, cols, blocks, approx):
    n_rows, n = y_ref.shape
    g = pl.program_id(0)
    c = pl.program_id(1) * cols + jnp.arange(cols)
    cm = c < n
    bias = _vector(b_ref, c, cm)

    def block(j, acc):
        r = (g * blocks + j) * rows + jnp.arange(rows)
        m = (r < n_rows)[:, None] & cm[None, :]
        x = _block(y_ref, r, c, m) + bias[None, :]
        t = _tanh(_C * (x + _A * x * x * x), approx)
        dx = _block(dh_ref, r, c, m) * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * _A * x * x))
        _store(dy_ref, r, c, m, dx)
        return acc + jnp.sum(jnp.where(m, dx, 0.0), axis=0)

    db = jax.lax.fori_loop(0, blocks, block, jnp.zeros((cols,), jnp.float32))
    plgpu.store(db_ref.at[g * n + c], db, mask=cm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_gelu(y2, bias, interpret):
    kernel = functools.partial(_gelu_forward_kernel, rows=GELU_ROWS, cols=GELU_COLS, approx=APPROX_TANH and not interpret)
    grid = (pl.cdiv(y2.shape[0], GELU_ROWS), pl.cdiv(y2.shape[1], GELU_COLS))
    return _call(kernel, grid, jax.ShapeDtypeStruct(y2.shape, y2.dtype), GELU_WARPS, "jaxgpt_bias_gelu",
                 interpret, y2, bias)


def _bias_gelu_fwd(y2, bias, interpret):
    return _bias_gelu(y2, bias, interpret), (y2, bias)


def _bias_gelu_bwd(interpret, res, dh2):
    y2, bias = res
    programs = pl.cdiv(y2.shape[0], GELU_ROWS * GELU_BLOCKS)
    kernel = functools.partial(_gelu_backward_kernel, rows=GELU_ROWS, cols=GELU_COLS, blocks=GELU_BLOCKS,
                               approx=APPROX_TANH and not interpret)
    grid = (programs, pl.cdiv(y2.shape[1], GELU_COLS))
    dy, db = _call(kernel, grid, (jax.ShapeDtypeStruct(y2.shape, y2.dtype),
                                  jax.ShapeDtypeStruct((programs * y2.shape[1],), jnp.float32)),
                   GELU_WARPS, "jaxgpt_bias_gelu_backward", interpret, y2, bias, dh2)
    return dy, db.reshape(programs, -1).sum(0).astype(bias.dtype)


_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def bias_gelu(y, bias, *, interpret: bool = False):
    """``reference_bias_gelu`` as the fused kernels (and their VJP); y [..., N], bias [N]."""
    def run(y, bias):
        return _bias_gelu(y.reshape(-1, y.shape[-1]), bias, interpret).reshape(y.shape)

    axes = _rows(y)[:-1] + ("mlp",)  # tensor parallelism splits the hidden units: columns are independent
    return _per_device(run, reference_bias_gelu, (y, bias), (axes, ("mlp",)), axes)


# ----------------------------------------------------------------------------- log-sum-exp

def _lse_kernel(x_ref, o_ref, *, rows, cols, valid):
    n_rows, n = x_ref.shape
    r = pl.program_id(0) * rows + jnp.arange(rows)
    rm = r < n_rows

    def tile(j, carry):
        m, s = carry
        c = j * cols + jnp.arange(cols)
        x = plgpu.load(x_ref.at[r[:, None], c[None, :]], mask=rm[:, None] & (c < n)[None, :], other=-jnp.inf)
        x = jnp.where((c < valid)[None, :], x.astype(jnp.float32), -jnp.inf)
        top = jnp.maximum(m, jnp.max(x, axis=1))
        return top, s * jnp.exp(m - top) + jnp.sum(jnp.exp(x - top[:, None]), axis=1)

    low = jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32)
    m, s = jax.lax.fori_loop(0, pl.cdiv(n, cols), tile, (low, jnp.zeros((rows,), jnp.float32)))
    plgpu.store(o_ref.at[r], m + jnp.log(s), mask=rm)


def logsumexp(x, valid: int | None = None, *, interpret: bool = False):
    """``log(sum(exp(x[..., :valid])))`` in float32 over the last axis (the columns from ``valid``
    on count as -inf: the head's padding rows), one pass over x: each program keeps a running
    maximum and the sum rescaled to it while it reads its rows in tiles. No VJP (the chunked loss
    derives its gradients itself)."""
    valid = valid or x.shape[-1]

    def run(x):
        x2 = x.reshape(-1, x.shape[-1])
        kernel = functools.partial(_lse_kernel, rows=LSE_ROWS, cols=LSE_COLS, valid=valid)
        out = _call(kernel, (pl.cdiv(x2.shape[0], LSE_ROWS),), jax.ShapeDtypeStruct(x2.shape[:1], jnp.float32),
                    LSE_WARPS, "jaxgpt_logsumexp", interpret, x2, stages=LSE_STAGES)
        return out.reshape(x.shape[:-1])

    def reference(x):
        return jax.nn.logsumexp(jnp.where(jnp.arange(x.shape[-1]) < valid, x, -jnp.inf), axis=-1)

    mesh = _MESH.get()
    if mesh is not None and sharding.logical_to_spec(("vocab",), x.shape[-1:], mesh) != P(None):
        return reference(x)  # the vocabulary split over devices: each row's sum spans them
    rows = _rows(x)[:-1]
    return _per_device(run, reference, (x,), (rows + (None,),), rows)
