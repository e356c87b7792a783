"""The LM head with cross-entropy or per-token log-probs in token chunks, never holding the full
[B, T, V] logits (a train step's largest tensor: 6.6 GB in float32 for GPT-2 at 32 x 1024).

``chunked_cross_entropy`` runs the head, the cross-entropy and the head's gradients one sequence
chunk at a time in a ``lax.scan``: the gradients for the hidden states and the embedding are
computed in the forward pass (as Liger-Kernel's fused linear cross-entropy does), so nothing is
recomputed and one chunk's logits exist at a time. ``token_logprobs`` gives log p(target) per
token [B, T] through the same chunked head (DPO's sequence log-probs, a server's ``logprobs``),
recomputing each chunk's logits in the backward instead.

``lse``: how the log-sum-exp runs, ``jaxgpt.backend.Policy.logsumexp``: "pallas" (jaxgpt.kernels),
"one_pass" (one variadic reduction, faster on a GPU) or "xla" (``jax.nn.logsumexp``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt import kernels


def _logsumexp(x):
    """``log(sum(exp(x)))`` over the last axis of float32 ``x`` in one pass over it: a running
    maximum and the sum of exponentials rescaled to it, one variadic reduction (``jax.nn.logsumexp``
    reads x twice). Entries at the float32 minimum count as -inf."""
    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m)

    low = jnp.finfo(jnp.float32).min  # the identity; -inf would make exp(-inf - -inf) = NaN
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(low), jnp.float32(0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _chunk_logits(h, w, targets, vocab_size, lse_impl):
    """One chunk's float32 logits (padding rows masked), their log-sum-exp and the targets' logits."""
    product = jnp.einsum("bte,ve->btv", h, w, preferred_element_type=jnp.float32)
    logits = product
    if vocab_size < w.shape[0]:  # padded embedding rows never get probability
        logits = jnp.where(jnp.arange(w.shape[0]) < vocab_size, product, jnp.finfo(jnp.float32).min)
    if lse_impl == "pallas":  # the kernel skips the padding rows itself: it reads the product as it is
        lse = kernels.logsumexp(product, vocab_size)
    elif lse_impl == "one_pass":
        lse = _logsumexp(logits)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _chunk_terms(h, w, targets, weights, vocab_size, lse_impl):
    """One chunk's float32 logits, their log-sum-exp, and its weighted loss sum."""
    logits, lse, target_logit = _chunk_logits(h, w, targets, vocab_size, lse_impl)
    return logits, lse, jnp.sum((lse - target_logit) * weights)


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
# softmax): GPT-2's 50257 rows made XLA:GPU pick slow GEMMs for the head (docs/benchmarks.md).
ROW_MULTIPLE = 128


def _padded(w):
    pad = -w.shape[0] % ROW_MULTIPLE
    return jnp.pad(w, ((0, pad), (0, 0))) if pad else w  # jnp.pad's transpose slices w's gradient back


def chunked_cross_entropy(h, w, targets, weights, vocab_size: int, chunks: int, lse: str = "xla"):
    """``sum(CE(h @ w.T, targets) * weights)`` in float32; h [B, T, E], w [V, E] (the tied
    embedding, maybe padded past ``vocab_size`` rows), targets / weights [B, T]; T must be a
    multiple of ``chunks``."""
    return _chunked_cross_entropy(h, _padded(w), targets, weights, vocab_size, chunks, lse)


def token_logprobs(h, w, targets, vocab_size: int, chunks: int = 1, lse: str = "xla"):
    """float32 [B, T] ``log_softmax(h @ w.T)[target]``, the head run ``chunks`` sequence chunks at a
    time (T must be a multiple); differentiable, each chunk's logits recomputed in the backward."""
    w = _padded(w)

    @jax.checkpoint
    def body(_, xs):
        hc, tc = xs
        _, lse_c, target_logit = _chunk_logits(hc, w, tc, vocab_size, lse)
        return None, target_logit - lse_c

    _, out = jax.lax.scan(body, None, (_split(h, chunks), _split(targets, chunks)))
    return _merge(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_cross_entropy(h, w, targets, weights, vocab_size: int, chunks: int, lse: str):
    def body(total, xs):
        hc, tc, wc = xs
        return total + _chunk_terms(hc, w, tc, wc, vocab_size, lse)[2], None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunked(h, targets, weights, chunks))
    return total


def _forward(h, w, targets, weights, vocab_size, chunks, lse_impl):
    """The loss, with the gradients for h and w (accumulated over chunks in float32) as residuals."""
    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        logits, lse, loss = _chunk_terms(hc, w, tc, wc, vocab_size, lse_impl)
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


def _backward(vocab_size, chunks, lse_impl, residuals, g):
    """The forward pass already holds the gradients: scale them by the incoming cotangent."""
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None  # targets / weights: no gradient


_chunked_cross_entropy.defvjp(_forward, _backward)
