"""Text generation: a compiled KV-cache decode loop, and ``python -m jaxgpt.sample``.

The whole loop runs inside XLA. A batch of prompts is left-padded to a bucketed
length and prefilled in one forward pass that fills a preallocated KV cache;
then ``jax.lax.while_loop`` samples one token per step for every row until each
row has produced a stop token or ``max_new_tokens`` tokens. Left padding keeps
the last prompt token of every row in the same column, so one decode step
serves all rows; pad slots get segment id 0 (never attended) and each row's
positions count from its own first real token, so a padded row computes exactly
what it would alone.

Public API: ``generate`` (new tokens per prompt), ``stream`` (the same, yielded every ``chunk``
decode steps: the chat CLI prints replies as they arrive), ``load_model`` (``jaxgpt.loader``'s,
in the decoding layout on a CPU), ``sample_logits`` (one sampling step), and the two jitted
functions underneath, ``prefill`` and ``decode``, pure over ``nnx.split(model)`` state.
``decode`` donates its carry (KV cache, next-token logits, per-row positions / done flags, the
token buffer), runs until ``carry["step"] == limit`` or every row is done, and can be called
again on its output; ``decode_no_hoisting`` is the same loop compiled without XLA's
loop-invariant code motion, which ``stream`` uses for a narrower decoding layout
(``jaxgpt.decoding.for_decoding``).

Shapes are bucketed (prompt length and ``max_new_tokens`` to powers of two, at
least 16) so that a chat session compiles a handful of programs, not one per
turn. Parameters may be sharded over a mesh: ``jax.jit`` follows their
shardings, nothing is moved to one device.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import compile_cache
from jaxgpt import loader
from jaxgpt.decoding import DECODING_DTYPES, DECODING_LAYOUTS
from jaxgpt.inputs import SAMPLING, readable
from jaxgpt.loader import MAX_STOP_IDS, stop_ids_for  # noqa: F401 (the CLIs, the demo and tools take them from here)
from jaxgpt.model import GPT2, init_cache

MIN_BUCKET = 16


class SampleError(ValueError):
    """Bad generation arguments (prompt too long, bad temperature, ...)."""


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


# ----------------------------------------------------------------------------- sampling

def sample_logits(logits, key, *, greedy: bool, temperature=1.0, top_k: int = 0, top_p=1.0, use_top_p: bool = False):
    """Next token ids [B] from float32 logits [B, V]: temperature -> top-k -> top-p, as in transformers."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k or use_top_p:
        # Candidates sorted by logit, best first; top-k keeps the first k, top-p the
        # shortest prefix whose probability reaches top_p (always at least one token).
        k = min(top_k, logits.shape[-1]) if top_k else logits.shape[-1]
        vals, ids = jax.lax.top_k(logits, k)
        if use_top_p:
            probs = jax.nn.softmax(vals, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            vals = jnp.where(mass_before < top_p, vals, -jnp.inf)
        choice = jax.random.categorical(key, vals, axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- jitted core

@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "max_new"))
def prefill(graphdef, state, prompt_ids, prompt_mask, *, cache_len: int, max_new: int):
    """Run the left-padded prompts [B, P] through the model into a fresh KV cache.

    Returns the decode carry. ``prompt_mask`` is 1 on real tokens, 0 on padding.
    """
    model = nnx.merge(graphdef, state)
    b = prompt_ids.shape[0]
    seg = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    cache = init_cache(model.config, b, cache_len)
    logits, cache = model.decode(prompt_ids, cache, positions=positions, segment_ids=seg, last_only=True)
    return {
        "cache": cache,
        "logits": logits[:, -1],  # next-token logits per row
        "pos": positions[:, -1] + 1,  # position of the next token per row
        "done": jnp.zeros((b,), bool),
        "tokens": jnp.zeros((b, max_new), jnp.int32),
        "num": jnp.zeros((b,), jnp.int32),  # tokens produced per row (stop token included)
        "step": jnp.array(0, jnp.int32),
    }


def _decode(graphdef, state, carry, key, limit, temperature, top_p, stop_ids, *, greedy: bool, top_k: int,
            use_top_p: bool):
    """Sample until ``carry["step"] == limit`` or every row has hit a stop id; returns the new carry."""
    model = nnx.merge(graphdef, state)
    last_position = model.config.n_positions - 1

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        step = c["step"]
        # fold_in by the global step: chunked and one-shot decoding draw the same numbers.
        tok = sample_logits(c["logits"], jax.random.fold_in(key, step), greedy=greedy, temperature=temperature,
                            top_k=top_k, top_p=top_p, use_top_p=use_top_p)
        live = ~c["done"]
        tokens = jax.lax.dynamic_update_slice_in_dim(c["tokens"], jnp.where(live, tok, 0)[:, None], step, axis=1)
        done = c["done"] | jnp.isin(tok, stop_ids)
        # Finished rows keep computing (the batch moves together) but their output is ignored.
        positions = jnp.minimum(c["pos"], last_position)[:, None]
        logits, cache = model.decode(tok[:, None], c["cache"], positions=positions,
                                     segment_ids=jnp.ones_like(positions))
        return {"cache": cache, "logits": logits[:, 0], "pos": c["pos"] + 1, "done": done, "tokens": tokens,
                "num": c["num"] + live.astype(jnp.int32), "step": step + 1}

    return jax.lax.while_loop(cond, body, carry)


_DECODE_JIT = dict(static_argnames=("graphdef", "greedy", "top_k", "use_top_p"), donate_argnames=("carry",))
decode = jax.jit(_decode, **_DECODE_JIT)
# For a model in the decoding layout (jaxgpt.decoding.for_decoding): XLA's loop-invariant code motion
# would hoist the weights' bfloat16 -> float32 conversion out of the loop and read float32 copies
# at every token, undoing the halved reads.
decode_no_hoisting = jax.jit(_decode, **_DECODE_JIT,
                             compiler_options={"xla_disable_hlo_passes": "while-loop-invariant-code-motion"})


# ----------------------------------------------------------------------------- python API

def split_for_inference(model: GPT2):
    """(graphdef, state) of ``model`` with dropout switched off; the arrays are shared, not copied."""
    return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


def check_sampling(max_new_tokens, temperature, top_k, top_p, flags: bool = False):
    """SampleError for settings outside ``SAMPLING``, named as the CLIs' flags when ``flags``."""
    for key, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k),
                       ("top_p", top_p)):
        SAMPLING[key].check("--" + key.replace("_", "-") if flags else key, value, SampleError)


def _check_args(model: GPT2, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids):
    cfg = model.config
    if not prompts:
        raise SampleError("no prompts given")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if len(stop_ids) > MAX_STOP_IDS:
        raise SampleError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SampleError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > cfg.n_positions:
            raise SampleError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {cfg.n_positions} positions"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise SampleError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")


def stream(model: GPT2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
           chunk: int | None = 16) -> Iterator[list[list[int]]]:
    """Yield the new tokens of every row so far, after each ``chunk`` decode steps (None: only at the end)."""
    if len(prompts) and np.ndim(prompts[0]) == 0:
        raise SampleError("prompts must be a batch: a list of token-id lists (or a 2-D array), "
                          "e.g. [tokenizer.encode(text)]")
    prompts = [list(map(int, p)) for p in prompts]
    stop_ids = [int(s) for s in stop_ids]
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids)
    if chunk is not None and chunk < 1:
        raise SampleError(f"chunk must be >= 1 decode steps (None = only at the end), got {chunk}")
    greedy = temperature == 0.0
    # Bucketed shapes: one compiled program serves many prompt lengths and budgets.
    p_len = bucket(max(map(len, prompts)))
    m_len = bucket(max_new_tokens)
    ids = np.zeros((len(prompts), p_len), np.int32)
    mask = np.zeros((len(prompts), p_len), np.int32)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = p
        mask[i, p_len - len(p):] = 1
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids

    graphdef, state = split_for_inference(model)
    carry = prefill(graphdef, state, ids, mask, cache_len=p_len + m_len, max_new=m_len)
    key = jax.random.key(seed)
    temperature = np.float32(temperature if not greedy else 1.0)
    top_p = np.float32(top_p)
    use_top_p = bool(top_p < 1.0) and not greedy
    top_k = 0 if greedy else int(top_k)
    chunk = chunk or max_new_tokens
    decode_fn = decode_no_hoisting if model.decoding_layout in DECODING_DTYPES else decode
    step = 0
    while True:
        step = min(step + chunk, max_new_tokens)
        carry = decode_fn(graphdef, state, carry, key, np.int32(step), temperature, top_p, stops,
                          greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        tokens, num, done = jax.device_get((carry["tokens"], carry["num"], carry["done"]))
        yield [tokens[i, : num[i]].tolist() for i in range(len(prompts))]
        if step >= max_new_tokens or done.all():
            return


def generate(model: GPT2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths).

    A row ends at its first stop token, which is included (as in transformers' ``generate``).
    ``temperature=0`` is greedy; otherwise temperature, then top-k (``0`` = off), then top-p
    (``1.0`` = off), as in transformers.
    """
    out = None
    for out in stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, stop_ids=stop_ids, seed=seed, chunk=None):
        pass
    return out


# ----------------------------------------------------------------------------- loading

PARAM_DTYPE_HELP = ("weights dtype. bfloat16 and int8 store them in the decoding layout, read at a half / a quarter "
                    "of float32's bytes per token; w8a8 = int8 weights and activations (quantised per token), the "
                    "fastest on a CPU at batch 8. Check a model's outputs with tools/decode_quality.py")


ADAPTER_HELP = "a PEFT LoRA adapter folder to put on --model (merged into it before sampling)"


def load_model(path_or_hub_id: str, *, dtype: str = "float32", param_dtype: str = "float32"):
    """(model, tokenizer) of ``jaxgpt.loader.load_model``, in the decoding layout."""
    loaded = loader.load_model(path_or_hub_id, dtype=dtype, param_dtype=param_dtype)
    return loaded.model, loaded.tokenizer


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxgpt.sample", description="Continue a prompt with a GPT-2 (an HF "
                                 "folder, a hub id or a jaxgpt training run).")
    ap.add_argument("--model", required=True, help="HF folder or hub id, or a jaxgpt training checkpoint (output dir or step dir)")
    ap.add_argument("--prompt", default="", type=readable,
                    help="text to continue (default: start from end-of-text); bytes that are not UTF-8 read as U+FFFD")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off (default %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0, help="1.0 = off (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    ap.add_argument("--num-samples", type=int, default=1, help="samples drawn in one batch (default %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default %(default)s)")
    ap.add_argument("--param-dtype", default="float32", choices=DECODING_LAYOUTS, help=PARAM_DTYPE_HELP)
    ap.add_argument("--adapter", metavar="PEFT_DIR", help=ADAPTER_HELP)
    args = ap.parse_args(argv)
    compile_cache.enable()
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, flags=True)
        if args.num_samples < 1:
            raise SampleError(f"--num-samples must be >= 1, got {args.num_samples}")
        loaded = loader.load_model(args.model, dtype=args.dtype, param_dtype=args.param_dtype, adapter=args.adapter)
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = tokenizer.encode(args.prompt) if args.prompt else [model.config.bos_token_id]
        outs = generate(model, [ids] * args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        stop_ids=loaded.stop_ids, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
