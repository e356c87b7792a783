"""Examples -> tokens + trained-token mask (the chat template's ``{% generation %}`` spans) -> packed rows."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from jaxgpt.config import DataError
from jaxgpt.data.read import Example


@dataclass
class DataStats:
    """What happened to every record; efficiency is measured on the packed rows."""

    records: int = 0  # records read
    examples: int = 0  # valid examples kept (after weights, before packing; text: chunks)
    skipped: int = 0  # invalid, skipped with skip_invalid
    truncated: int = 0
    dropped: int = 0  # too long with truncation=drop, or nothing left to train after truncation
    tokens: int = 0  # tokens of the kept segments
    trained_tokens: int = 0  # sum of loss_mask
    rows: int = 0
    seq_len: int = 0
    non_pad_tokens: int = 0  # row slots holding a real input token
    skip_reasons: list[str] = field(default_factory=list)  # the first few skipped records' errors
    formats: dict[str, str] = field(default_factory=dict)  # source path -> detected format

    def count_rows(self, examples: int, segs, non_pad_tokens: int, rows: int, seq_len: int) -> None:
        """The counts of ``segs`` (token ids, loss mask) packed into ``rows`` rows of ``seq_len``."""
        self.examples = examples
        self.tokens = int(sum(len(t) for t, _ in segs))
        self.trained_tokens = int(sum(int(m[1:].sum()) for _, m in segs))
        self.non_pad_tokens = non_pad_tokens
        self.rows, self.seq_len = rows, seq_len

    @property
    def capacity(self) -> int:
        return self.rows * self.seq_len

    @property
    def packing_efficiency(self) -> float:
        """Trained tokens / row capacity: the share of compute spent on tokens that train."""
        return self.trained_tokens / max(1, self.capacity)

    @property
    def fill(self) -> float:
        """Non-padding slots / row capacity."""
        return self.non_pad_tokens / max(1, self.capacity)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(capacity=self.capacity, packing_efficiency=self.packing_efficiency, fill=self.fill)
        return d

    def brief(self) -> str:
        """One line for a run's start-up output (``summary`` is the table ``data inspect`` prints)."""
        return (f"{self.records:,} records read, {self.examples:,} examples, {self.skipped:,} skipped (invalid), "
                f"{self.truncated:,} truncated, {self.dropped:,} dropped, {self.trained_tokens:,} trained tokens "
                f"in {self.rows:,} rows of {self.seq_len} (packing efficiency {self.packing_efficiency:.0%})")

    def summary(self) -> str:
        lines = [
            f"records read      {self.records:>10,}   ({', '.join(f'{k}: {v}' for k, v in self.formats.items())})",
            f"examples kept     {self.examples:>10,}",
            f"skipped (invalid) {self.skipped:>10,}",
            f"truncated         {self.truncated:>10,}",
            f"dropped           {self.dropped:>10,}",
            f"tokens            {self.tokens:>10,}",
            f"trained tokens    {self.trained_tokens:>10,}",
            f"rows x seq_len    {self.rows:>10,} x {self.seq_len}",
            f"packing efficiency {self.packing_efficiency:>9.1%}   (trained tokens / row capacity)",
            f"row fill          {self.fill:>10.1%}   (non-pad tokens / row capacity)",
        ]
        lines += [f"  skipped: {r}" for r in self.skip_reasons]
        return "\n".join(lines)


def _has_prompt_replies(ex: Example) -> bool:
    return any(m["role"] == "assistant" for m in ex.messages[: ex.n_prompt])


def _apply_loss_on(mask: np.ndarray, ids: np.ndarray, ex: Example, loss_on: str, prefix=None) -> np.ndarray:
    """``prefix``: the token ids of ``ex``'s prompt turns rendered alone (loss_on=completion, when the
    prompt holds assistant turns)."""
    if loss_on == "all":
        return np.ones_like(mask)
    if loss_on == "completion" and _has_prompt_replies(ex):
        # Unmark the prompt's assistant turns. The prompt rendered alone is usually a token prefix of the
        # whole conversation; where the tokens at the boundary merge differently (the plain template's
        # "\n\n"), the template's spans are counted instead: one per assistant turn, in order.
        n = len(prefix)
        starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
        n_turns = sum(m["role"] == "assistant" for m in ex.messages)
        if n < len(ids) and ids[:n].tolist() == list(prefix):
            cut = n
        elif len(starts) == n_turns:
            cut = starts[sum(m["role"] == "assistant" for m in ex.messages[: ex.n_prompt])]
        else:
            raise DataError(f"{ex.where}: loss_on=completion: the chat template renders the prompt turns "
                            "differently inside the whole conversation and marks other than one span per "
                            "assistant turn, so the completion cannot be told apart (use loss_on: assistant)")
        mask = mask.copy()
        mask[:cut] = 0
        if not mask.any():
            raise DataError(f"{ex.where}: loss_on=completion: the chat template marks no token of the completion")
    return mask


def tokenize_chats(examples: list[Example], tok, loss_on: str, batch_size: int = 256):
    """(token ids int32, token mask uint8) per conversation: mask[j] = 1 if token j is trained."""
    out = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b: b + batch_size]
        try:
            enc = tok.apply_chat_template([e.messages for e in chunk], return_dict=True,
                                          return_assistant_tokens_mask=True)
        except Exception:  # a template's raise_exception() or a Jinja error: find the record that caused it
            for e in chunk:
                try:
                    tok.apply_chat_template(e.messages, tokenize=False)
                except Exception as err:
                    raise DataError(f"{e.where}: the chat template fails on this conversation: {err}") from None
            raise
        prefixes = [None] * len(chunk)
        if loss_on == "completion":  # the prompt turns alone, in one batched call
            need = [i for i, e in enumerate(chunk) if _has_prompt_replies(e)]
            if need:
                rendered = tok.apply_chat_template([chunk[i].messages[: chunk[i].n_prompt] for i in need],
                                                   return_dict=True)["input_ids"]
                for i, ids in zip(need, rendered):
                    prefixes[i] = ids
        for ex, ids, mask, prefix in zip(chunk, enc["input_ids"], enc["assistant_masks"], prefixes):
            mask = np.asarray(mask, np.uint8)
            if loss_on != "all" and not mask.any():
                raise DataError(f"{ex.where}: the chat template marks no assistant tokens "
                                "(a template without {% generation %} markers?)")
            ids = np.asarray(ids, np.int32)
            out.append((ids, _apply_loss_on(mask, ids, ex, loss_on, prefix)))
    return out


def tokenize_texts(examples: list[Example], tok, seq_len: int):
    """Documents + EOS, split into chunks of ``seq_len + 1`` tokens overlapping by one (each token a target once)."""
    out = []
    encoded = tok([e.text for e in examples], add_special_tokens=False)["input_ids"] if examples else []
    for ids in encoded:
        ids = np.asarray(list(ids) + [tok.eos_token_id], np.int32)
        for start in range(0, max(1, len(ids) - 1), seq_len):
            piece = ids[start: start + seq_len + 1]
            if len(piece) >= 2:
                out.append((piece, np.ones(len(piece), np.uint8)))
    return out


def pad_id(tok) -> int:
    """The id padding positions hold: the tokenizer's pad token, else its end of text."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def pack_best_fit(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open row with the least room that fits it.

    ``order`` breaks ties among equal lengths (a seeded permutation). O(n * capacity / SIMD).
    """
    lengths = np.asarray(lengths)
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    order = order[np.argsort(-lengths[order], kind="stable")]
    open_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> open rows
    has_room = np.zeros(capacity + 1, bool)
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity or n < 1:
            raise ValueError(f"item of length {n} does not fit capacity {capacity}")
        j = n + int(has_room[n:].argmax())
        if has_room[j]:
            r = open_rows[j].pop()
            has_room[j] = bool(open_rows[j])
        else:
            r, j = len(rows), capacity
            rows.append([])
        rows[r].append(int(i))
        left = j - n
        if left:
            open_rows[left].append(r)
            has_room[left] = True
    return rows


class PackedDataset:
    """Tokenized segments packed into rows of ``seq_len`` slots; ``batch(rows)`` builds model inputs."""

    def __init__(self, segments: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], seq_len: int,
                 pad_id: int, vocab_size: int, stats: DataStats, sources: list[str] | None = None):
        lens = np.array([len(t) for t, _ in segments], np.int64)
        self.seg_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.tokens = np.concatenate([t for t, _ in segments]).astype(np.int32) if segments else np.zeros(0, np.int32)
        self.token_mask = np.concatenate([m for _, m in segments]).astype(np.uint8) if segments else np.zeros(0, np.uint8)
        self.row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.row_segments = np.array([s for r in rows for s in r], np.int32)
        self.seq_len, self.pad_id, self.vocab_size, self.stats = seq_len, pad_id, vocab_size, stats
        self.segment_sources = sources  # where each segment came from (file:line), for inspect
        h = hashlib.sha256()
        for a in (self.tokens, self.token_mask, self.row_offsets, self.row_segments, np.array([seq_len, pad_id])):
            h.update(np.ascontiguousarray(a).tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_segments(self) -> int:
        return len(self.seg_offsets) - 1

    def segment(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and token mask of segment (conversation) ``k``."""
        a, b = self.seg_offsets[k], self.seg_offsets[k + 1]
        return self.tokens[a:b], self.token_mask[a:b]

    def row_segment_ids(self, r: int) -> np.ndarray:
        return self.row_segments[self.row_offsets[r]: self.row_offsets[r + 1]]

    def batch(self, rows) -> dict[str, np.ndarray]:
        """Model inputs for the given row indices (a row index < 0 gives an all-padding row)."""
        return make_batch([(self, int(r)) for r in rows], self.seq_len, self.pad_id)


def make_batch(rows: list[tuple[PackedDataset, int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    b, t = len(rows), seq_len
    out = {"input_ids": np.full((b, t), pad_id, np.int32), "targets": np.full((b, t), pad_id, np.int32),
           "loss_mask": np.zeros((b, t), np.float32), "segment_ids": np.zeros((b, t), np.int32),
           "positions": np.zeros((b, t), np.int32)}
    reference = getattr(rows[0][0], "reference", None) if rows else None  # DPO's precomputed reference
    if reference is not None:  # each segment's log-prob sum at its first slot (jaxgpt.objectives.DPO)
        out["ref_logps"] = np.zeros((b, t), np.float32)
    for i, (ds, r) in enumerate(rows):
        if r < 0:
            continue
        at = 0
        for s, k in enumerate(ds.row_segment_ids(r), 1):
            x, m = ds.segment(int(k))
            n = len(x) - 1
            out["input_ids"][i, at: at + n] = x[:-1]
            out["targets"][i, at: at + n] = x[1:]
            out["loss_mask"][i, at: at + n] = m[1:]
            out["segment_ids"][i, at: at + n] = s
            out["positions"][i, at: at + n] = np.arange(n)
            if reference is not None:
                out["ref_logps"][i, at] = ds.reference[k]
            at += n
    return out
