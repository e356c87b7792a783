"""The jitted functions of ``jaxgpt.engine`` over its slots: prefill, copy a prompt into a row, shift
and resize the cache, and one decode step with per-row sampling.

The cache layout. The model's cached attention writes every row at one shared column,
``cache["index"]``; rows differ by their own positions (explicit position ids) and by
their segment ids (1 on a row's own tokens, 0 elsewhere, never attended). A joining
prompt is written right-aligned to end at the shared column, so the next step appends
to every row alike. When the shared column reaches the end of the cache, all rows are
shifted left by the oldest live row's start (attention does not see columns, only
positions and the mask), and the cache grows or shrinks between power-of-two lengths
to cover the live rows: a step reads about as many columns as the longest live request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model import init_cache

MAX_TOP_LOGPROBS = 20  # alternatives per token the engine can report (OpenAI's chat limit)


# ----------------------------------------------------------------------------- the model calls
# Every call into the model is in these two functions.

def _forward_prompt(model, ids, positions, segment_ids, cache, full: bool):
    """Prefill: (logits [B, T or 1, V], cache) for left-padded prompts written at the cache's index."""
    return model.decode(ids, cache, positions=positions, segment_ids=segment_ids, last_only=not full)


def _forward_step(model, tokens, positions, segment_ids, cache):
    """One decode step: (logits [B, 1, V], cache) for one new token per row."""
    return model.decode(tokens, cache, positions=positions, segment_ids=segment_ids)


# ----------------------------------------------------------------------------- jitted functions

def _top(logprobs):
    """The MAX_TOP_LOGPROBS best (log-probs, ids) over the last axis."""
    return tuple(jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS))


@functools.partial(jax.jit, static_argnames=("graphdef", "score"))
def prefill_rows(graphdef, state, ids, mask, *, score: bool):
    """Left-padded prompts [N, P] -> (cache of P columns, next-token logits [N, V], scores).

    With ``score``: each prompt token's log-prob given the tokens before it and the best
    alternatives at each position (for ``echo`` + ``logprobs``), else None.
    """
    model = nnx.merge(graphdef, state)
    n, p = ids.shape
    seg = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    logits, cache = _forward_prompt(model, ids, positions, seg, init_cache(model.config, n, p), score)
    scores = None
    if score:
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # predicts ids[:, 1:]
        token_lp = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        scores = (token_lp, *_top(lp))
    return cache, logits[:, -1].astype(jnp.float32), scores


@functools.partial(jax.jit, static_argnames=("n_head",))
def take_row(new_cache, new_logits, src, *, n_head: int):
    """Prompt ``src`` of a prefill: its keys [H, D, P], values [H, P, D], segment ids [1, P] and logits [V]."""
    layers = [{"k": jax.lax.dynamic_slice_in_dim(l["k"], src * n_head, n_head, axis=0),
               "v": jax.lax.dynamic_slice_in_dim(l["v"], src * n_head, n_head, axis=0)} for l in new_cache["layers"]]
    return {"layers": layers, "segment_ids": jax.lax.dynamic_slice_in_dim(new_cache["segment_ids"], src, 1),
            "logits": new_logits[src]}


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_row(slots, prompt, row, col, length):
    """Copy one prompt (``take_row``) into slot ``row``, its columns ending at ``col + P``. Compiled
    per cache length and prompt bucket only (``Engine.compile_steps`` compiles them all)."""
    cache = slots["cache"]
    h = prompt["layers"][0]["k"].shape[0]
    layers = [{"k": jax.lax.dynamic_update_slice(big["k"], small["k"].astype(big["k"].dtype), (row * h, 0, col)),
               "v": jax.lax.dynamic_update_slice(big["v"], small["v"].astype(big["v"].dtype), (row * h, col, 0))}
              for big, small in zip(cache["layers"], prompt["layers"])]
    seg_row = jnp.zeros((1, cache["segment_ids"].shape[1]), jnp.int32)  # forget the slot's previous request
    seg_row = jax.lax.dynamic_update_slice(seg_row, prompt["segment_ids"], (0, col))
    seg = jax.lax.dynamic_update_slice(cache["segment_ids"], seg_row, (row, 0))
    return {"cache": {"layers": layers, "segment_ids": seg, "index": cache["index"]},
            "logits": slots["logits"].at[row].set(prompt["logits"]),
            "pos": slots["pos"].at[row].set(length)}


@functools.partial(jax.jit, donate_argnames=("slots",))
def shift_columns(slots, shift, lo, hi):
    """Move every row's columns left by ``shift`` (right if negative); only [lo, hi) keeps segment ids."""
    cache = slots["cache"]
    layers = [{"k": jnp.roll(l["k"], -shift, axis=2), "v": jnp.roll(l["v"], -shift, axis=1)}
              for l in cache["layers"]]
    seg = jnp.roll(cache["segment_ids"], -shift, axis=1)
    cols = jnp.arange(seg.shape[1])
    seg = jnp.where((cols >= lo) & (cols < hi), seg, 0)
    return {**slots, "cache": {"layers": layers, "segment_ids": seg, "index": cache["index"] - shift}}


@functools.partial(jax.jit, static_argnames=("length",))  # a new shape: nothing to donate into
def resize_cache(slots, *, length: int):
    """The cache with ``length`` columns (the columns past the live ones are dropped or added empty)."""
    cache = slots["cache"]
    old = cache["segment_ids"].shape[1]

    def fit(a, axis):
        if length <= old:
            return jax.lax.slice_in_dim(a, 0, length, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, length - old)
        return jnp.pad(a, pad)

    layers = [{"k": fit(l["k"], 2), "v": fit(l["v"], 1)} for l in cache["layers"]]
    return {**slots, "cache": {"layers": layers, "segment_ids": fit(cache["segment_ids"], 1),
                               "index": cache["index"]}}


def _ordered(x):
    """int32 keys of float32 ``x`` in the same order (for an exact bisection over values)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _largest_key(keys, holds):
    """Per row, the largest int32 key t with ``holds(t)`` ([B] -> [B] bool, true for small t, false
    past some point): a 32-step bisection, exact, with no sort of the vocabulary."""
    lo = jnp.full(keys.shape[:1], jnp.iinfo(jnp.int32).min, jnp.int32)  # holds(lo) for every row
    hi = jnp.full(keys.shape[:1], jnp.iinfo(jnp.int32).max, jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1) + ((lo ^ hi) & 1)  # ceil((lo + hi) / 2), no overflow
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def sample_rows(logits, seeds, counts, temperature, top_k, top_p):
    """One token per row of float32 logits [B, V], each row with its own settings (arrays [B]).

    temperature 0 is greedy (argmax of the raw logits); otherwise temperature, then top-k
    (0 = off), then top-p (1.0 = off) on what top-k kept, as in transformers (tokens tied at
    a cut-off are all kept). The cut-offs are found by bisection, not by sorting the
    vocabulary, and the draw inverts the CDF with one uniform number per row: both cost a few
    passes over the logits. Row b draws with ``fold_in(key(seeds[b]), counts[b])``: its numbers
    depend on its own seed and token count only, not on the batch.
    """
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def truncate(x):
        keys = _ordered(x)
        # top-k: the k-th largest value (the largest t with at least k values >= t)
        k = jnp.where(top_k > 0, top_k, x.shape[-1])
        kth = _largest_key(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k)
        x = jnp.where(keys >= kth[:, None], x, -jnp.inf)
        # top-p: the largest t whose tokens >= t still hold top_p of the probability
        probs = jax.nn.softmax(x, axis=-1)
        cut = _largest_key(keys, lambda t: jnp.sum(jnp.where(keys >= t[:, None], probs, 0), axis=-1) >= top_p)
        return jnp.where(keys >= cut[:, None], x, -jnp.inf)

    needed = jnp.any(~greedy & ((top_k > 0) | (top_p < 1)))
    scaled = jax.lax.cond(needed, truncate, lambda x: x, scaled)
    uniform = jax.vmap(lambda s, c: jax.random.uniform(jax.random.fold_in(jax.random.key(s), c)))(seeds, counts)
    drawn = _invert_cdf(jax.nn.softmax(scaled, axis=-1), uniform)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _invert_cdf(probs, u, blocks: int = 256):
    """Per row, the token where the cumulative probability passes ``u`` (in [0, 1)) times the total.

    In two levels, blocks then tokens: a cumulative sum over the whole vocabulary is a slow
    sequential scan on a CPU, over ``blocks`` sums and one block's tokens it is short.
    """
    b, v = probs.shape
    width = -(-v // blocks)
    p = jnp.pad(probs, ((0, 0), (0, blocks * width - v))).reshape(b, blocks, width)
    upto = jnp.cumsum(p.sum(axis=-1), axis=-1)  # [B, blocks]
    target = u * upto[:, -1]
    j = jnp.minimum(jnp.sum(upto <= target[:, None], axis=-1), blocks - 1)
    before = jnp.where(j > 0, jnp.take_along_axis(upto, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    row = jnp.take_along_axis(p, j[:, None, None], axis=1)[:, 0]  # [B, width]
    i = jnp.sum(jnp.cumsum(row, axis=-1) <= (target - before)[:, None], axis=-1)
    # rounding can run past the block's last token of non-zero probability: never pick a cut one
    last = jnp.max(jnp.where(row > 0, jnp.arange(width)[None], 0), axis=-1)
    return j * width + jnp.minimum(i, last)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("slots",))
def decode_step(graphdef, state, slots, live, seeds, counts, temperature, top_k, top_p, want_top):
    """Sample a token for every slot from its logits, then run it through the model.

    Returns (slots, tokens [B], their log-probs [B], top alternatives ([B, K], [B, K])). Log-probs
    are the model's (log-softmax of the raw logits), whatever the sampling settings.
    """
    model = nnx.merge(graphdef, state)
    logits = slots["logits"]
    tokens = sample_rows(logits, seeds, counts, temperature, top_k, top_p)
    lp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    b = logits.shape[0]
    empty = (jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.float32), jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.int32))
    top = jax.lax.cond(jnp.any(want_top), _top, lambda _: empty, lp)
    positions = jnp.minimum(slots["pos"], model.config.n_positions - 1)[:, None]
    new_logits, cache = _forward_step(model, tokens[:, None], positions, live.astype(jnp.int32)[:, None],
                                      slots["cache"])
    slots = {"cache": cache, "logits": new_logits[:, 0].astype(jnp.float32), "pos": slots["pos"] + 1}
    return slots, tokens, token_lp, top
