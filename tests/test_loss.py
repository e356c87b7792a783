"""The chunked LM head + cross-entropy (jaxgpt.loss) against the plain one: optax's
cross-entropy over the full logits, values and gradients, and whole training runs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.loss import chunked_cross_entropy, token_logprobs
from tests.test_train import tiny_config

B, T, E, V, VOCAB = 2, 16, 8, 48, 45  # 3 padding rows past the real vocabulary


def inputs(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (B, T, E)).astype(dtype)
    w = jax.random.normal(k[1], (V, E)).astype(dtype)
    targets = jax.random.randint(k[2], (B, T), 0, VOCAB)
    weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    return h, w, targets, weights


def plain(h, w, targets, weights):
    logits = jnp.einsum("bte,ve->btv", h, w, preferred_element_type=jnp.float32)[..., :VOCAB]
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


@pytest.mark.parametrize("chunks", [1, 2, 4, 16])
def test_value_and_gradients_match_plain_cross_entropy(chunks):
    h, w, targets, weights = inputs()
    # a cotangent other than 1, as a mean over tokens gives: the gradients computed in the forward are scaled
    ref_loss, ref_grads = jax.value_and_grad(lambda h, w: 0.3 * plain(h, w, targets, weights), argnums=(0, 1))(h, w)
    fn = jax.jit(jax.value_and_grad(lambda h, w: 0.3 * chunked_cross_entropy(h, w, targets, weights, VOCAB, chunks),
                                    argnums=(0, 1)))
    loss, grads = fn(h, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, ref in zip(grads, ref_grads):
        assert float(jnp.abs(ref).max()) > 0
        assert float(jnp.abs(g - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
    assert float(jnp.abs(grads[1][VOCAB:]).max()) == 0.0  # padding rows get no gradient
    # without differentiation (evaluation) the plain scan gives the same value
    np.testing.assert_allclose(jax.jit(chunked_cross_entropy, static_argnums=(4, 5))(h, w, targets, weights, VOCAB,
                                                                                       chunks), ref_loss / 0.3, rtol=1e-6)


@pytest.mark.parametrize("chunks", [1, 4])
def test_token_logprobs_match_log_softmax(chunks):
    """log p(target) per token [B, T] against jax.nn.log_softmax over the full logits (padding rows
    excluded), values to 1e-6 relative and the gradients of a weighted sum (a DPO-like use) within
    1e-5 of the largest; padding rows get no gradient."""
    h, w, targets, weights = inputs()

    def ref_fn(h, w):
        logits = jnp.einsum("bte,ve->btv", h, w, preferred_element_type=jnp.float32)[..., :VOCAB]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]

    ref = ref_fn(h, w)
    got = jax.jit(token_logprobs, static_argnums=(3, 4))(h, w, targets, VOCAB, chunks)
    assert got.shape == (B, T) and got.dtype == jnp.float32 and float(got.max()) < 0
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    ref_grads = jax.grad(lambda h, w: jnp.sum(ref_fn(h, w) * weights), argnums=(0, 1))(h, w)
    grads = jax.jit(jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, VOCAB, chunks) * weights),
                             argnums=(0, 1)))(h, w)
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) <= 1e-5 * float(jnp.abs(r).max())
    assert float(jnp.abs(grads[1][VOCAB:]).max()) == 0.0


def test_bfloat16_inputs():
    h, w, targets, weights = inputs(jnp.bfloat16)
    loss, grads = jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, targets, weights, VOCAB, 4),
                                     argnums=(0, 1))(h, w)
    ref_loss, ref_grads = jax.value_and_grad(lambda h, w: plain(h, w, targets, weights), argnums=(0, 1))(h, w)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)  # float32 logits on both sides
    for g, ref in zip(grads, ref_grads):  # bf16 rounding of d loss / d logits: ~2^-8 relative
        assert float(jnp.abs(g.astype(jnp.float32) - ref.astype(jnp.float32)).max()) <= 2e-2 * float(
            jnp.abs(ref.astype(jnp.float32)).max())


def test_train_loss_with_loss_chunks_matches(tmp_path):
    """jaxgpt.step.loss_terms with model.loss_chunks=4 (hidden states -> chunked head) gives the plain
    head's loss and parameter gradients, on a real packed batch, for training and evaluation."""
    from flax import nnx

    from jaxgpt import sharding
    from jaxgpt.data import build_datasets
    from jaxgpt.setup import build_model, load_tokenizer_for
    from jaxgpt.step import loss_terms

    mesh = sharding.make_mesh((1, 1, 1))
    cfg = tiny_config(tmp_path, model={"loss_chunks": 4})
    tok = load_tokenizer_for(cfg)
    rows, _ = build_datasets(cfg.data, tok)
    batch = {k: jnp.asarray(v) for k, v in rows.batch(range(4)).items()}
    graphdef4, params, rest, gcfg = build_model(cfg, len(tok), mesh)
    assert gcfg.loss_chunks == 4
    model = nnx.merge(graphdef4, params, rest)
    model.policy = dataclasses.replace(model.policy, loss_chunks=1)  # the same weights with the plain head
    graphdef1 = nnx.graphdef(model)
    results = []
    for graphdef in (graphdef1, graphdef4):
        grad_fn = jax.jit(jax.value_and_grad(
            lambda p: (lambda s, m: s / m["trained_tokens"])(*loss_terms(graphdef, p, rest, batch, mesh=mesh))))
        loss, grads = grad_fn(params)
        eval_sum, sums = jax.jit(lambda p: loss_terms(graphdef, p, rest, batch, mesh=mesh, train=False))(params)
        results.append((float(loss), float(eval_sum / sums["trained_tokens"]), nnx.to_flat_state(grads)))
    (l1, e1, g1), (l4, e4, g4) = results
    assert 0 < float(jnp.sum(batch["loss_mask"])) < batch["loss_mask"].size  # assistant-only: a real mask
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(e4, e1, rtol=1e-6)
    for (path, a), (_, b) in zip(g1, g4):
        ref = a.get_value()
        assert float(jnp.abs(b.get_value() - ref).max()) <= 1e-5 * max(float(jnp.abs(ref).max()), 1e-12), path


def test_default_loss_chunks_per_backend(monkeypatch):
    """model.loss_chunks: null is 8 chunks on a GPU (the largest of 8 / 4 / 2 that divides the
    sequence), 1 on a CPU; a set value is kept on any backend."""
    from jaxgpt import backend
    from jaxgpt.backend import Policy
    from jaxgpt.model import GPT2Config

    def loss_chunks(cfg, seq_len):
        return Policy.resolve(cfg).loss_chunks_for(seq_len)

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=VOCAB)
    assert cfg.loss_chunks is None
    assert loss_chunks(cfg, 1024) == 1  # these tests run on the CPU
    assert loss_chunks(cfg.replace(loss_chunks=4), 1024) == 4
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "gpu")
    assert [loss_chunks(cfg, t) for t in (1024, 36, 6, 7)] == [8, 4, 2, 1]
    assert loss_chunks(cfg.replace(loss_chunks=1), 1024) == 1
