"""The LM head and cross-entropy in token chunks, never holding the full [B, T, V] logits.

GPT-2's logits are the largest tensor of a train step: [B, T, 50257] in float32 is 824 MB
at 8 x 512 and 6.6 GB at 32 x 1024, and the backward pass holds their gradient too.
``chunked_cross_entropy`` splits the sequence into ``chunks`` pieces and runs the head,
the cross-entropy and the head's gradients one piece at a time in a ``lax.scan``: the
gradients with respect to the hidden states and the embedding are computed in the forward
pass (as Liger-Kernel's fused linear cross-entropy does), so nothing is recomputed and only
one chunk's logits exist at a time. Same FLOPs as the plain head.

Used by ``jaxgpt.train.loss_terms`` when the loss runs in more than one chunk
(``model.loss_chunks``; by default 8 on a GPU, 1 elsewhere: ``jaxgpt.model.loss_chunks``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt import kernels


def _logsumexp(x):
    """``log(sum(exp(x)))`` over the last axis of float32 ``x`` in one pass over it: a running
    maximum and the sum of exponentials rescaled to it, one variadic reduction. (``jax.nn.logsumexp``
    reads x twice: its maximum, then the sum. GPT-2 124M at 32 x 1024 on an H200: 2.5 ms a step
    against 3.1; on a CPU it was slower, 112 ms against 96 for [1024, 50304]: two exponentials an
    element. docs/benchmarks-history.md.) Entries at the float32 minimum count as -inf."""
    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m)

    low = jnp.finfo(jnp.float32).min  # the identity; -inf would make exp(-inf - -inf) = NaN
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(low), jnp.float32(0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _chunk_terms(h, w, targets, weights, vocab_size, fused):
    """One chunk's float32 logits, their log-sum-exp, and its weighted loss sum. ``fused``: the
    log-sum-exp as jaxgpt.kernels' Pallas kernel (``model.kernels``)."""
    product = jnp.einsum("bte,ve->btv", h, w, preferred_element_type=jnp.float32)
    logits = product
    if vocab_size < w.shape[0]:  # padded embedding rows never get probability
        logits = jnp.where(jnp.arange(w.shape[0]) < vocab_size, product, jnp.finfo(jnp.float32).min)
    if fused:  # the kernel skips the padding rows itself: it reads the product's output as it is
        lse = kernels.logsumexp(product, vocab_size)
    elif jax.default_backend() == "gpu":
        lse = _logsumexp(logits)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum((lse - target_logit) * weights)
    return logits, lse, loss


def _split(x, chunks):
    """[B, T, ...] -> [chunks, B, T / chunks, ...] (the batch axis keeps its sharding)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, chunks, t // chunks, *x.shape[2:]), 1, 0)


def _merge(x):
    """The inverse of ``_split``."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _chunked(h, targets, weights, chunks):
    """The scan's inputs: hidden states, targets and float32 weights, chunk by chunk."""
    return _split(h, chunks), _split(targets, chunks), _split(weights.astype(jnp.float32), chunks)


# The head's rows are padded to a multiple of this inside the loss (zero rows, masked out of the
# softmax). GPT-2's 50257 rows made XLA:GPU pick slow Triton GEMMs for the head: on an H200 its three
# products took 27.8 ms of an 85 ms step, against 9.6 ms for 50304 rows (docs/benchmarks-history.md).
ROW_MULTIPLE = 128


def chunked_cross_entropy(h, w, targets, weights, vocab_size: int, chunks: int, fused: bool = False):
    """``sum(CE(h @ w.T, targets) * weights)`` in float32; h [B, T, E], w [V, E] (the tied
    embedding, maybe padded past ``vocab_size`` rows), targets / weights [B, T]; T must be a
    multiple of ``chunks``. ``fused``: the log-sum-exp as a Pallas kernel (GPUs)."""
    pad = -w.shape[0] % ROW_MULTIPLE
    if pad:  # jnp.pad's transpose slices the padded rows off w's gradient
        w = jnp.pad(w, ((0, pad), (0, 0)))
    return _chunked_cross_entropy(h, w, targets, weights, vocab_size, chunks, fused)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_cross_entropy(h, w, targets, weights, vocab_size: int, chunks: int, fused: bool):
    def body(total, xs):
        hc, tc, wc = xs
        return total + _chunk_terms(hc, w, tc, wc, vocab_size, fused)[2], None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunked(h, targets, weights, chunks))
    return total


def _forward(h, w, targets, weights, vocab_size, chunks, fused):
    """The loss, with the gradients for h and w (accumulated over chunks in float32) as residuals."""
    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        logits, lse, loss = _chunk_terms(hc, w, tc, wc, vocab_size, fused)
        # d loss / d logits = (softmax - onehot(target)) * weight
        g = jnp.exp(logits - lse[..., None])
        g = g - jax.nn.one_hot(tc, w.shape[0], dtype=g.dtype)
        g = (g * wc[..., None]).astype(h.dtype)
        dh = jnp.einsum("btv,ve->bte", g, w, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = dw + jnp.einsum("btv,bte->ve", g, hc, preferred_element_type=jnp.float32)
        return (total + loss, dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, _chunked(h, targets, weights, chunks))
    return total, (_merge(dh), dw.astype(w.dtype))


def _backward(vocab_size, chunks, fused, residuals, g):
    """The forward pass already holds the gradients: scale them by the incoming cotangent."""
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None  # targets / weights: no gradient


_chunked_cross_entropy.defvjp(_forward, _backward)
