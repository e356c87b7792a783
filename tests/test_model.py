"""The model's alternative code paths compute the same thing.

``scan_layers=True`` (by default on a CPU above ``UNROLL_ROWS`` positions, and on a TPU) runs
the blocks as one ``lax.scan`` over their stacked states; ``False`` unrolls them (the KV-cache
path always does). Both must give the same loss, the same gradients and the same dropout
masks, and leave the dropout RNG streams in the same state. Likewise ``attention="xla"``
(``jax.nn.dot_product_attention``, the call ``attention="cudnn"`` makes on a GPU with another
implementation) must match jaxgpt's own einsum attention, packed segments included. The
reference for the default model itself is transformers' PyTorch GPT-2 (tests/test_weights.py,
tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.backend import Policy
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.step import reseeded


@functools.lru_cache(maxsize=None)  # the dropout tests share their scanned no-remat run
def _loss_grads_twice(cfg: GPT2Config):
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    ids = (jnp.arange(2 * 16).reshape(2, 16) * 7) % cfg.vocab_size
    seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16])  # two packed segments in row 0

    def loss(m):
        return jnp.mean(m(ids, segment_ids=seg) ** 2)

    step = nnx.jit(nnx.value_and_grad(loss))  # one program (compiling is most of this test's time)
    value, grads = step(model)
    again, _ = step(model)  # the dropout streams moved on: with dropout, a different number
    return float(value), float(again), nnx.state(grads, nnx.Param)


@pytest.mark.parametrize("dropout,remat", [(0.0, "none"), (0.1, "full"), (0.1, "minimal")])
def test_scanned_blocks_match_unrolled(dropout, remat):
    """Loss equal to 1e-6 relative, gradients within 1e-5 of the largest gradient (float32 reassociation only).
    With remat, both also match the scanned blocks without it: recomputing changes no number, and
    the dropout masks are drawn again identically."""
    base = dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4, dropout=dropout, remat=remat)
    s_val, s_again, s_grads = _loss_grads_twice(GPT2Config(**base, scan_layers=True))
    u_val, u_again, u_grads = _loss_grads_twice(GPT2Config(**base, scan_layers=False))
    assert s_val == pytest.approx(u_val, rel=1e-6)
    assert s_again == pytest.approx(u_again, rel=1e-6)  # same RNG state after the scanned call
    if dropout:
        assert s_again != pytest.approx(s_val, rel=1e-6)  # dropout really drew new masks
    assert len(jax.tree.leaves(s_grads)) == 4 + 12 * 3
    _assert_grads_close(s_grads, u_grads)
    if remat != "none":
        n_val, n_again, n_grads = _loss_grads_twice(GPT2Config(**{**base, "remat": "none"}, scan_layers=True))
        assert s_val == pytest.approx(n_val, rel=1e-6) and s_again == pytest.approx(n_again, rel=1e-6)
        _assert_grads_close(s_grads, n_grads)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_keep_what_they_say(scan):
    """What the backward pass keeps: everything with "none", the [B, H, T, T] attention
    probabilities included, except GELU's insides: of the MLP's [B, T, 4E] arrays only the c_fc
    product (bias + GELU are recomputed from it) and GELU's output (c_proj's input); with
    "minimal" the weight matmuls' outputs but no [B, H, T, T] array; with "full" neither (only
    each block's input). "auto" is minimal on the CPU."""
    b, t, h = 2, 16, 4
    base = dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=h, scan_layers=scan)
    ids = jnp.zeros((b, t), jnp.int32)

    def residual_shapes(remat):
        graphdef, params, rest = nnx.split(GPT2(GPT2Config(**base, remat=remat), rngs=nnx.Rngs(0)), nnx.Param, ...)
        f = lambda p: jnp.sum(nnx.merge(graphdef, p, reseeded(rest))(ids))  # as jaxgpt.step's loss
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # one line per residual: "f32[2,4,16,16] from ..."
            jax.ad_checkpoint.print_saved_residuals(f, params)
        lines = out.getvalue().splitlines()
        return [tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", x).group(1).split(",") if d) for x in lines]

    def kept(shapes, *tails):
        return any(s[-len(x):] == x for s in shapes for x in tails)

    scores = (h, t, t)
    none, minimal, full = (residual_shapes(r) for r in ("none", "minimal", "full"))
    assert kept(none, scores) and not kept(minimal, scores) and not kept(full, scores)
    # scanned: one [L, B, T, 4E] array each; on a CPU the 2-D block products (model.linear) keep
    # c_proj's input as [B * T, 4E] (the same array, reshaped)
    mlp_wide = [s for s in none if s[-2:] in ((t, 4 * 64), (b * t, 4 * 64))]
    assert len(mlp_wide) == 2 * (1 if scan else base["n_layer"]), mlp_wide
    c_attn_out = ((t, 3 * 64), (b * t, 3 * 64))  # [B * T, 3E] from the 2-D products on a CPU
    assert kept(minimal, *c_attn_out) and not kept(full, *c_attn_out)
    assert len(full) < len(minimal) < len(none)
    # "auto" on a CPU: minimal for scanned blocks (above UNROLL_ROWS positions, or scan_layers=True), else none
    assert GPT2Config(**base).remat == "auto"
    assert Policy.resolve(GPT2Config(**base)).remat_policy(8) == ("minimal" if scan else "none")
    assert Policy.resolve(GPT2Config(**{**base, "scan_layers": None})).remat_policy(4096) == "minimal"
    assert Policy.resolve(GPT2Config(**{**base, "scan_layers": None})).remat_policy(2048) == "none"
    assert GPT2Config(**base, remat=True).remat == "full" and GPT2Config(**base, remat=False).remat == "none"
    with pytest.raises(ValueError, match="remat='some'"):
        GPT2Config(**base, remat="some")


def test_gradient_fence_is_the_identity():
    """The fence changes no value and no gradient, bit for bit: NaN, inf and -0.0 included,
    and a NaN first element (the loop then runs no trips)."""
    from jaxgpt.backend import gradient_fence

    x = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4) / 7 - 1
    cot = jnp.array(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
    cot = cot.at[0, 0, 1].set(jnp.inf).at[1, 2, 3].set(-0.0).at[1, 0, 0].set(jnp.nan)
    for g in (cot, cot.at[0, 0, 0].set(jnp.nan)):
        y, vjp = jax.jit(lambda v: jax.vjp(gradient_fence, v))(x)
        (dx,) = jax.jit(vjp)(g)
        np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))
        np.testing.assert_array_equal(np.asarray(dx).view(np.uint32), np.asarray(g).view(np.uint32))


def _widest_loop_fusion(n_layer: int) -> int:
    """Operands of the widest elementwise (kLoop) fusion in the compiled unrolled backward pass."""
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=n_layer, n_head=4, scan_layers=False,
                     remat="none")
    graphdef, params, rest = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ids = (jnp.arange(32).reshape(2, 16) * 7) % cfg.vocab_size
    grad = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)))
    hlo = grad.lower(params).compile().as_text()
    return max(len(re.findall(r"%[\w.\-]+", m.group(1))) for m in re.finditer(r" fusion\((.*?)\), kind=kLoop", hlo))


def test_unrolled_backward_does_not_fuse_across_layers(monkeypatch):
    """On a CPU the unrolled blocks' input goes through ``gradient_fence``: XLA's fusions of the
    backward pass then stay within a layer, as wide for 4 layers as for 2. Without it (the
    control), the residual gradient's chain through every later layer fused into each layer:
    fusions that grow with depth, the work quadratic in it."""
    from jaxgpt import backend

    assert jax.default_backend() == "cpu"
    fenced = [_widest_loop_fusion(n) for n in (2, 4)]
    assert fenced[0] == fenced[1], fenced
    monkeypatch.setattr(backend, "gradient_fence", lambda x: x)
    unfenced = [_widest_loop_fusion(n) for n in (2, 4)]
    assert unfenced[1] > unfenced[0] > fenced[0], (fenced, unfenced)


def _assert_grads_close(a, b):
    """Every gradient of ``a`` within 1e-5 of ``b``'s largest (nonzero, finite) gradient."""
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_b)
    worst = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(flat_a, flat_b))
    assert worst <= 1e-5 * scale, f"max gradient difference {worst:.2e} (largest gradient {scale:.2e})"
    assert np.isfinite(scale) and scale > 0


@pytest.mark.parametrize("scan", [True, False])
def test_library_attention_matches_einsum(scan):
    """jax.nn.dot_product_attention with jaxgpt's mask (causal & same segment): loss to 1e-6
    relative, gradients within 1e-5 of the largest, float32."""
    base = dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, scan_layers=scan)
    x_val, _, x_grads = _loss_grads_twice(GPT2Config(**base, attention="xla"))
    e_val, _, e_grads = _loss_grads_twice(GPT2Config(**base, attention="einsum"))
    assert x_val == pytest.approx(e_val, rel=1e-6)
    _assert_grads_close(x_grads, e_grads)


def test_chunked_attention_matches_whole(monkeypatch):
    """On a CPU, attention over ``CHUNKED_FROM`` positions or more runs in chunks of queries,
    each against the keys up to its last query (``Attention._attend_chunked``). Uneven chunks
    (100 positions in 7 chunks of 15 or 10), packed segments and a padded tail: the logits of
    every real token to 1e-5 relative, the gradients within 1e-5 of the largest, float32.
    The chunked program never makes the whole [B, H, T, T] score matrix."""
    from jaxgpt import model as model_lib

    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 100)))
    seg = np.ones((3, 100), np.int32)
    seg[0, 40:], seg[1, 90:] = 2, 0  # row 0: two packed segments; row 1: 10 padding slots
    pos = jnp.asarray(np.where(np.arange(100) < 40, np.arange(100), np.arange(100) - 40)[None].repeat(3, 0))
    seg, real = jnp.asarray(seg), np.asarray(seg) != 0

    def loss(m):
        logits = m(ids, segment_ids=seg, positions=pos)
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :8]), logits

    runs = {}
    for chunk in (10**6, 16):
        monkeypatch.setattr(model_lib, "CHUNKED_FROM", chunk)
        monkeypatch.setattr(model_lib, "QUERY_CHUNK", 16)
        jaxpr = str(jax.make_jaxpr(lambda m: m(ids, segment_ids=seg, positions=pos))(model))
        # one compiled program per setting (op by op, every primitive compiled on its own cost a minute)
        runs[chunk] = (nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model), "f32[3,4,100,100]" in jaxpr)
    ((_, whole), grads_whole), whole_scores = runs[10**6]
    ((_, chunked), grads_chunked), chunked_scores = runs[16]
    assert whole_scores and not chunked_scores
    scale = float(jnp.abs(whole).max())
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(whole)[real], rtol=0, atol=1e-5 * scale)
    _assert_grads_close(nnx.state(grads_chunked, nnx.Param), nnx.state(grads_whole, nnx.Param))


def test_library_attention_keeps_segments_apart():
    """Changing the first packed segment's tokens leaves the second segment's logits alone."""
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, attention="xla")
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    seg = jnp.array([[1] * 10 + [2] * 6])
    ids = (jnp.arange(16)[None] * 7) % cfg.vocab_size
    other = ids.at[0, :10].set(5)
    forward = nnx.jit(lambda m, x: m(x, segment_ids=seg))  # one program, not one per primitive
    a, b = forward(model, ids), forward(model, other)
    np.testing.assert_allclose(a[0, 10:], b[0, 10:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, :10], b[0, :10], atol=1e-3)


@pytest.mark.parametrize("kw,needle", [(dict(attention="splash"), "attention='splash': choose from .*'flash'"),
                                       (dict(attention="cudnn", dtype="float32"), "needs dtype bfloat16"),
                                       (dict(attention="cudnn", dtype="bfloat16", dropout=0.1), "no attention-probability dropout")])
def test_attention_setting_is_checked(kw, needle):
    with pytest.raises(ValueError, match=needle):
        GPT2Config(**kw)


def test_backend_defaults(monkeypatch):
    """attention="auto" is cuDNN only where it applies; scan_layers=None scans on a CPU above
    UNROLL_ROWS positions, never on a GPU, always elsewhere."""
    from jaxgpt import backend

    def policy(**kw):
        return Policy.resolve(GPT2Config(**kw))

    assert policy(dtype="bfloat16").attention == "einsum"  # this CPU
    rows = backend.UNROLL_ROWS
    assert policy().scan_blocks(rows) is False
    assert policy().scan_blocks(rows + 1) is True
    assert policy(scan_layers=True).scan_blocks(8) is True
    assert policy(scan_layers=False).scan_blocks(10**6) is False
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "tpu")
    assert policy().scan_blocks(8) is True and policy().remat_policy(8) == "none"
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "gpu")
    assert policy().scan_blocks(10**6) is False
    assert policy().remat_policy(10**6) == "none"
    assert policy(scan_layers=True).scan_blocks(8) is True
    assert policy(dtype="bfloat16").attention == "cudnn"
    assert policy(dtype="float32").attention == "einsum"
    assert policy(dtype="bfloat16", dropout=0.1).attention == "einsum"
    assert policy(dtype="bfloat16", attention="einsum").attention == "einsum"


def test_abstract_model_is_the_model_without_its_weights():
    """abstract_model builds the model eagerly with shapes for parameters: the graphdef, every
    parameter's shape, dtype and logical axes, and the dropout RNG streams (keys and counts, which
    depend on how many draws the construction made) must be a real construction's. Placed on a mesh
    (sharding.from_host), the streams are the same numbers."""
    from jaxgpt import sharding
    from jaxgpt.model import abstract_model

    cfg = GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=3, n_head=4, dropout=0.1)
    graphdef, params, rest = nnx.split(GPT2(cfg, rngs=nnx.Rngs(7)), nnx.Param, ...)
    mesh = sharding.make_mesh((1, len(jax.devices()), 1))
    for placed in (None, sharding.replicated(mesh)):
        g, p, r = abstract_model(cfg, 7)
        if placed is not None:
            r = sharding.from_host(r, placed)
        assert g == graphdef
        flat, ref = nnx.to_flat_state(p), nnx.to_flat_state(params)
        assert [k for k, _ in flat] == [k for k, _ in ref]
        for (path, var), (_, real) in zip(flat, ref):
            shape = var.get_value()
            assert isinstance(shape, jax.ShapeDtypeStruct), path
            assert (shape.shape, shape.dtype, var.get_metadata()) == (real[...].shape, real[...].dtype,
                                                                      real.get_metadata()), path
        got, want = jax.tree.leaves(r), jax.tree.leaves(rest)
        assert len(got) == len(want) == 2 * (1 + 2 * cfg.n_layer)  # a key and a count per Dropout
        for a, b in zip(got, want):
            if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if placed is not None:
            assert all(x.sharding == placed for x in got)
    # A different seed gives different streams: the comparison above can fail.
    other = jax.tree.leaves(abstract_model(cfg, 8)[2])
    assert not np.array_equal(jax.random.key_data(other[1]), jax.random.key_data(jax.tree.leaves(rest)[1]))
