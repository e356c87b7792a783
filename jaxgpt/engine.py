"""Continuous batching over jaxgpt's KV cache: the engine behind ``python -m jaxgpt.serve``.

A fixed number of slots (``max_batch`` rows of one KV cache) decode together, one jitted
step at a time. Between steps the engine thread admits waiting requests into free slots
(one batched prefill per group, then each prompt's keys/values copied into its row) and
frees the slots of requests that stopped or whose client went away. Nothing about a
request is a static argument: temperature, top-k, top-p, seeds and the live mask are
arrays, so a new mix of settings compiles nothing new. Shapes are bucketed to powers of
two (prompt length, rows of a prefill, cache length): a few programs each, compiled once.

The jitted functions over the slots, and the cache layout, are ``jaxgpt.kv_slots``.

Greedy decoding runs the same batched model call and argmax as ``jaxgpt.sample.generate``,
so a request's greedy output does not depend on what else is in the batch.

Public API: ``Engine(model, tokenizer, ...)``, ``.start()``, ``.submit(Request) -> Handle``,
``.stats()``, ``.close()``. A request's ``echo_logprobs`` asks for its prompt's log-probs too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.kv_slots import decode_step, insert_row, prefill_rows, resize_cache, shift_columns, take_row
from jaxgpt.model import init_cache
from jaxgpt.sample import MIN_BUCKET, bucket, split_for_inference

log = logging.getLogger("jaxgpt.engine")

MIN_CACHE = 64  # smallest cache length (columns); lengths are powers of two


# ----------------------------------------------------------------------------- requests

@dataclasses.dataclass
class Request:
    """One generation request: ``n`` choices continuing ``prompt`` (token ids)."""

    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # alternatives per generated token (0 = the token's own log-prob only)
    echo_logprobs: int | None = None  # the same for the prompt's tokens (``echo`` + ``logprobs``)


@dataclasses.dataclass
class Event:
    """What a request's handle receives. kind: "prompt" (prompt log-probs, before any token),
    "delta" (new text of choice ``index`` with the tokens that produced it), "finish"
    (``finish_reason`` "stop" / "length"), "error" (``text`` says why)."""

    kind: str
    index: int = 0
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class Handle:
    """A submitted request. Its events arrive as ``(tag, Event)`` on ``events`` (an asyncio queue of
    ``loop``, shared by several handles if the caller likes, or a plain queue); ``cancel()`` frees its slots."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None, events=None, tag: int = 0):
        self.request, self.loop, self.tag = request, loop, tag
        self.events = events if events is not None else (asyncio.Queue() if loop else queue.Queue())
        self.cancelled = False
        self.submitted = time.monotonic()
        self.remaining = request.n  # choices not finished yet

    def put(self, event: Event):
        if self.loop is None:
            self.events.put((self.tag, event))
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.tag, event))
        except RuntimeError:  # the caller's event loop has closed: nobody reads this request any more
            self.cancelled = True

    def cancel(self):
        self.cancelled = True


class _Choice:
    """One choice of a request in a slot: its tokens, text emitted so far and stop check."""

    def __init__(self, handle: Handle, index: int, tokenizer, stop_ids):
        self.handle, self.index, self.tok, self.stop_ids = handle, index, tokenizer, stop_ids
        req = handle.request
        self.stops = [s for s in req.stop if s]
        self.ids: list[int] = []  # generated, stop token included
        self.sent = 0  # characters of text sent
        self.sent_tokens = 0
        self.seed = _choice_seed(req.seed, index)
        self.first_at: float | None = None

    def text(self, final: bool) -> tuple[str, bool]:
        """(text safe to send so far, whether a stop string ended it)."""
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        text = self.tok.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        if not final:
            text = text.rstrip("\ufffd")  # a character whose other bytes are still to come
            hold = max((len(s) - 1 for s in self.stops), default=0)  # may be the start of a stop string
            text = text[: max(len(text) - hold, self.sent)] if hold else text
        return text, False


def _choice_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return int(np.random.default_rng().integers(0, 2**31 - 1))
    return int((seed * 1_000_003 + index) % (2**31 - 1))


# ----------------------------------------------------------------------------- the engine

class Engine:
    """Continuous batching of ``model`` over ``max_batch`` slots; run in its own thread."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_context: int | None = None,
                 stop_ids: Sequence[int] = ()):
        cfg = model.config
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.max_batch = max_batch
        if max_context is not None and not 2 <= max_context <= cfg.n_positions:
            raise ValueError(f"max_context={max_context}: must be in [2, {cfg.n_positions}] (the model's n_positions)")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.max_context = max_context or cfg.n_positions
        self.stop_ids = set(int(i) for i in stop_ids)
        self.graphdef, self.state = split_for_inference(model)
        self.max_cache = bucket(self.max_context, MIN_CACHE)
        self.waiting: queue.Queue[Handle] = queue.Queue()
        self.pending: list[Handle] = []  # taken from `waiting`, not admitted yet (no free slots)
        self.admitting: list[Handle] = []  # being prefilled
        self.slots: list[_Choice | None] = [None] * max_batch
        self.start_col = [0] * max_batch  # first column of each slot's prompt
        self.index = 0  # the shared write column, as cache["index"] on the device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counters = dict(requests=0, finished=0, cancelled=0, errors=0, prompt_tokens=0,
                              generated_tokens=0, steps=0, occupied=0)
        self._ttft: list[float] = []
        self.device = self._empty_slots(MIN_CACHE)

    # --- public

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="jaxgpt-engine", daemon=True)
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        self.waiting.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout=30)

    def compile_steps(self):
        """Compile the decode step, the row shift, the resizes and the prompt copies for every cache
        length now (before ``start``): compiled under load, each would stall every live request."""
        b = self.max_batch
        idle = (np.zeros(b, bool), np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.zeros(b, np.int32), np.ones(b, np.float32), np.zeros(b, bool))
        length = MIN_CACHE
        while length <= self.max_cache:
            slots = decode_step(self.graphdef, self.state, self._empty_slots(length), *idle)[0]
            slots = shift_columns(slots, np.int32(0), np.int32(0), np.int32(0))
            p = MIN_BUCKET
            while p <= length:  # every prompt bucket that fits this cache
                new_cache = init_cache(self.cfg, 1, p)
                prompt = take_row(new_cache, jnp.zeros((1, self.cfg.vocab_size), jnp.float32), 0,
                                  n_head=self.cfg.n_head)
                slots = insert_row(slots, prompt, 0, 0, 1)
                p *= 2
            for other in (length // 2, 2 * length):
                if MIN_CACHE <= other <= self.max_cache:
                    jax.block_until_ready(resize_cache(slots, length=other))
            length *= 2

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None, events=None,
               tag: int = 0) -> Handle:
        """Queue ``request``; its events go to ``events`` (see ``Handle``)."""
        handle = Handle(request, loop, events, tag)
        with self._lock:
            self._counters["requests"] += 1
        self.waiting.put(handle)
        return handle

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for /metrics."""
        with self._lock:
            c = dict(self._counters)
            ttft = sorted(self._ttft)
        active = sum(s is not None for s in self.slots)
        pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else 0.0
        return {**c, "active": active, "slots": self.max_batch, "queued": self.waiting.qsize() + len(self.pending),
                "occupancy": c["occupied"] / (c["steps"] * self.max_batch) if c["steps"] else 0.0,
                "cache_len": self.device["cache"]["segment_ids"].shape[1],
                "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95)}

    # --- the loop

    def _run(self):
        while not self._stop.is_set():
            try:
                self._admit(block=not any(self.slots))
                if self._stop.is_set():
                    break
                self._drop_cancelled()
                if any(self.slots):
                    self._decode()
            except Exception as e:  # a failure ends the requests in flight, never the server
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _fail_all(self, message: str):
        for i, c in enumerate(self.slots):
            if c is not None:
                c.handle.put(Event("error", c.index, text=message))
                self.slots[i] = None
        for h in self.pending + self.admitting:
            h.put(Event("error", text=message))
        self.pending, self.admitting = [], []
        with self._lock:
            self._counters["errors"] += 1
        self.device = self._empty_slots(MIN_CACHE)
        self.index = 0

    def _empty_slots(self, length: int):
        cache = init_cache(self.cfg, self.max_batch, length)
        return {"cache": cache, "logits": jnp.zeros((self.max_batch, self.cfg.vocab_size), jnp.float32),
                "pos": jnp.zeros((self.max_batch,), jnp.int32)}

    def _cache_len(self) -> int:
        return self.device["cache"]["segment_ids"].shape[1]

    def _admit(self, block: bool):
        """Take new requests; prefill those that fit into free slots, as one batch."""
        try:
            while True:
                h = self.waiting.get(block=block and not self.pending, timeout=None)
                block = False
                if h is None:
                    return
                self.pending.append(h)
        except queue.Empty:
            pass
        self.pending = [h for h in self.pending if not self._cancelled_before_start(h)]
        free = [i for i, s in enumerate(self.slots) if s is None]
        group = []
        for h in list(self.pending):
            if h.request.n > len(free) - sum(g.request.n for g in group):
                break  # first come, first served: no overtaking by smaller requests
            group.append(h)
            self.pending.remove(h)
        if group:
            self.admitting = group
            self._prefill_group(group, free)
            self.admitting = []

    def _cancelled_before_start(self, h: Handle) -> bool:
        if h.cancelled:
            with self._lock:
                self._counters["cancelled"] += 1
        return h.cancelled

    def _prefill_group(self, group: list[Handle], free: list[int]):
        p = bucket(max(len(h.request.prompt) for h in group))
        rows = bucket(len(group), 1)
        ids = np.zeros((rows, p), np.int32)
        mask = np.zeros((rows, p), np.int32)
        for j, h in enumerate(group):
            ids[j, p - len(h.request.prompt):] = h.request.prompt
            mask[j, p - len(h.request.prompt):] = 1
        score = any(h.request.echo_logprobs is not None for h in group)
        new_cache, logits, scores = prefill_rows(self.graphdef, self.state, ids, mask, score=score)
        if score:
            scores = jax.device_get(scores)
        self._make_room(p)
        col = self.index - p
        for j, h in enumerate(group):
            req = h.request
            if req.echo_logprobs is not None:
                token_lp, top_lp, top_ids = (s[j, p - len(req.prompt):] for s in scores)
                h.put(Event("prompt", logprobs=_entries(token_lp, top_lp, top_ids, req.echo_logprobs)))
            prompt = take_row(new_cache, logits, j, n_head=self.cfg.n_head)
            for i in range(req.n):
                slot = free.pop(0)
                self.device = insert_row(self.device, prompt, slot, col, len(req.prompt))
                self.slots[slot] = _Choice(h, i, self.tokenizer, self.stop_ids)
                self.start_col[slot] = self.index - len(req.prompt)
            with self._lock:
                self._counters["prompt_tokens"] += len(req.prompt)

    def _live_start(self) -> int:
        return min((self.start_col[i] for i, s in enumerate(self.slots) if s is not None), default=self.index)

    def _make_room(self, p: int):
        """Arrange the cache so that ``p`` columns end at the shared index (a joining prompt)."""
        while self._cache_len() < p:  # doubling only: the resizes compile_steps compiled
            self.device = resize_cache(self.device, length=2 * self._cache_len())
        if self.index < p:  # move the live rows right
            self._move(self.index - p)

    def _move(self, shift: int):
        lo = self._live_start() - shift
        self.index -= shift
        self.device = shift_columns(self.device, np.int32(shift), np.int32(max(lo, 0)), np.int32(self.index))
        self.start_col = [c - shift for c in self.start_col]

    def _ensure_column(self):
        """Make column ``index`` writable: shift out what no live row needs, grow or shrink the cache."""
        length = self._cache_len()
        if self.index < length:
            return
        lo = self._live_start()
        if lo > 0:
            self._move(lo)
        window = self.index + 1
        # double or halve (the resizes compile_steps compiled); shrinking goes on at later wraps
        want = length // 2 if window * 4 <= length and length > MIN_CACHE else length
        if window > length:
            want = min(2 * length, self.max_cache)
        if window > want:  # cannot happen: admission keeps every request within max_context <= max_cache
            raise RuntimeError(f"the live requests need {window} cache columns, more than {self.max_cache}")
        if want != length:
            self.device = resize_cache(self.device, length=want)

    def _drop_cancelled(self):
        for i, c in enumerate(self.slots):
            if c is not None and c.handle.cancelled:
                self.slots[i] = None
                self._choice_done(c.handle, "cancelled")

    def _choice_done(self, handle: Handle, outcome: str):
        handle.remaining -= 1
        if handle.remaining == 0:
            with self._lock:
                self._counters[outcome] += 1

    def _decode(self):
        self._ensure_column()
        b = self.max_batch
        live = np.zeros(b, bool)
        seeds = np.zeros(b, np.int32)
        counts = np.zeros(b, np.int32)
        temperature = np.zeros(b, np.float32)
        top_k = np.zeros(b, np.int32)
        top_p = np.ones(b, np.float32)
        want_top = np.zeros(b, bool)
        for i, c in enumerate(self.slots):
            if c is None:
                continue
            r = c.handle.request
            live[i], seeds[i], counts[i] = True, c.seed, len(c.ids)
            temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
            want_top[i] = bool(r.logprobs)
        self.device, tokens, token_lp, top = decode_step(self.graphdef, self.state, self.device, live, seeds,
                                                         counts, temperature, top_k, top_p, want_top)
        self.index += 1
        tokens, token_lp = jax.device_get((tokens, token_lp))
        top = jax.device_get(top) if want_top.any() else None
        now = time.monotonic()
        with self._lock:
            self._counters["steps"] += 1
            self._counters["occupied"] += int(live.sum())
            self._counters["generated_tokens"] += int(live.sum())
        for i, c in enumerate(self.slots):
            if c is None:
                continue
            if c.first_at is None:
                c.first_at = now
                if c.index == 0:
                    with self._lock:
                        self._ttft = (self._ttft + [now - c.handle.submitted])[-2000:]
            tok = int(tokens[i])
            c.ids.append(tok)
            r = c.handle.request
            lp_entry = None
            if r.logprobs is not None:
                alts = [] if top is None else list(zip(top[1][i][: r.logprobs].tolist(),
                                                       top[0][i][: r.logprobs].tolist()))
                lp_entry = (float(token_lp[i]), alts)
            reason = "stop" if tok in self.stop_ids else ("length" if len(c.ids) >= r.max_tokens else None)
            text, stopped = c.text(final=reason is not None)
            if stopped:
                reason = "stop"
            if len(text) > c.sent or lp_entry is not None or reason:
                c.handle.put(Event("delta", c.index, text=text[c.sent:], tokens=c.ids[c.sent_tokens:],
                                   logprobs=[lp_entry] if lp_entry else []))
                c.sent, c.sent_tokens = max(c.sent, len(text)), len(c.ids)
            if reason:
                c.handle.put(Event("finish", c.index, finish_reason=reason))
                self.slots[i] = None
                self._choice_done(c.handle, "finished")


def _entries(token_lp, top_lp, top_ids, k: int):
    """Per-token (log-prob, [(id, log-prob)] * k) for the prompt: the first token has none (None)."""
    out = [None]
    for t in range(len(token_lp)):
        out.append((float(token_lp[t]), list(zip(top_ids[t][:k].tolist(), top_lp[t][:k].tolist()))))
    return out[: len(token_lp) + 1]
