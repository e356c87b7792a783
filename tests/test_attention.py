"""``model.attention: flash`` (jaxgpt.flash: jax's Pallas flash kernel with segment ids), run in
Pallas' interpreter on the CPU, against the model's einsum attention with the packing mask: the
kernel's output and gradients, and a train step's loss and gradients. How fast it is is measured
on a GPU (tools/bench.py's GPU variants, tools/check_gpu.py), not here."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import flash
from jaxgpt.backend import Policy
from jaxgpt.model import GPT2, Attention, GPT2Config
from tests.test_kernels import rel_err, value_and_grads
from tests.test_train import tiny_config

B, T, H, D = 2, 40, 2, 16
# Odd segment lengths; row 0 ends in 3 padding slots, row 1 in 1. T=40 is no multiple of the tiles.
SEGMENTS = np.array([[1] * 7 + [2] * 13 + [3] * 17 + [0] * 3, [1] * 23 + [2] * 16 + [0]], np.int32)


def einsum_attention(q, k, v, segment_ids):
    """The model's einsum attention (Attention._softmax_attention) under its packing mask (GPT2._mask)."""
    cfg = GPT2Config(vocab_size=16, n_positions=T, n_embd=H * D, n_head=H, n_layer=1, attention="einsum")
    attn = Attention(cfg, Policy.resolve(cfg), nnx.Rngs(0))
    mask, _ = GPT2._mask(None, segment_ids, None, q.shape[1])
    return attn._softmax_attention(q, k, v, mask, heads_leading=False)


@pytest.mark.parametrize("segments", [True, False], ids=["packed", "causal"])
def test_flash_attention_matches_einsum(monkeypatch, segments):
    """Small tiles (16 forward, 8 backward: 3 and 6 of them over the padded 48 positions), float32:
    every real token's output, and the q, k, v gradients of a loss on the real tokens, within 1e-5
    of the largest value. Padding tokens' outputs are left out: nothing real reads them."""
    monkeypatch.setattr(flash, "BLOCK", 16)
    monkeypatch.setattr(flash, "BACKWARD_BLOCK", 8)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys[:3])
    seg = jnp.asarray(SEGMENTS if segments else np.ones((B, T), np.int32))
    real = (seg != 0)[:, :, None, None]
    cotangent = jax.random.normal(keys[3], q.shape) * real
    ids = seg if segments else None
    got, got_grads = value_and_grads(lambda q, k, v: flash.attention(q, k, v, ids, interpret=True), (q, k, v), cotangent)
    want, want_grads = value_and_grads(lambda q, k, v: einsum_attention(q, k, v, seg), (q, k, v), cotangent)
    assert rel_err(jnp.where(real, got, 0), jnp.where(real, want, 0)) <= 1e-5
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert rel_err(g, w) <= 1e-5, name
    # the reference several devices fall back to is the same attention
    assert rel_err(jnp.where(real, flash.reference_attention(q, k, v, ids), 0), jnp.where(real, want, 0)) <= 1e-5


def test_flash_attention_keeps_segments_apart():
    """A segment's outputs do not move when another segment's keys and values change (bfloat16)."""
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 3))
    seg = jnp.asarray(SEGMENTS)
    run = jax.jit(functools.partial(flash.attention, interpret=True))
    before = run(q, k, v, seg)
    first = (seg == 1)[:, :, None, None]
    after = run(q, jnp.where(first, 3.0, k).astype(k.dtype), jnp.where(first, -2.0, v).astype(v.dtype), seg)
    before, after = np.asarray(before, np.float32), np.asarray(after, np.float32)
    later = np.asarray(seg >= 2)
    np.testing.assert_array_equal(after[later], before[later])
    assert not np.allclose(after[np.asarray(first[:, :, 0, 0])], before[np.asarray(first[:, :, 0, 0])])


@pytest.mark.parametrize("model", [{}, pytest.param({"scan_layers": True, "remat": "full"}, marks=pytest.mark.slow)],
                         ids=["unrolled", "scanned-remat"])
def test_train_step_with_flash_matches_einsum(tmp_path, model):
    """jaxgpt.step.loss_terms on a packed row of the demo data (seq 256: two conversations, a padded
    tail; 2 forward, 8 backward tiles), one device, float32: loss
    to 1e-6 relative, every parameter gradient within 1e-5 of its largest value; blocks unrolled,
    and scanned and recomputed in the backward."""
    from jaxgpt import setup, sharding, step
    from jaxgpt.data import build_datasets

    mesh = sharding.make_mesh((1, 1, 1))
    results = []
    for attention in ("einsum", "flash"):
        cfg = tiny_config(tmp_path, model={"attention": attention, "n_positions": 256, **model}, data={"seq_len": 256})
        tok = setup.load_tokenizer_for(cfg)
        data, _ = build_datasets(cfg.data, tok)
        batch = data.batch(range(1))
        assert (np.asarray(batch["segment_ids"]).max(axis=1) >= 2).all() and (batch["segment_ids"] == 0).any()
        graphdef, params, rest, _ = setup.build_model(cfg, len(tok), mesh)
        assert nnx.merge(graphdef, params, rest).h[0].attn.implementation == attention
        loss = lambda p: (lambda s, m: s / m["trained_tokens"])(*step.loss_terms(graphdef, p, rest, batch, mesh=mesh))
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results.append((float(value), nnx.to_flat_state(grads)))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    for (path, a), (_, b) in zip(g0, g1):
        assert rel_err(b.get_value(), a.get_value()) <= 1e-5, path


def test_flash_setting(monkeypatch):
    """attention="flash" builds (in float32 too); with dropout it is refused, as cudnn (the config
    file's key: tests/test_config.py); on a TPU, where only the interpreter would run it, too."""
    from jaxgpt import backend

    GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_head=2, n_layer=1, attention="flash")
    with pytest.raises(ValueError, match="attention='flash' has no attention-probability dropout"):
        GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_head=2, n_layer=1, attention="flash", dropout=0.1)
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="attention='flash' is a GPU kernel .* here is tpu"):
        Policy.resolve(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_head=2, n_layer=1, attention="flash"))
