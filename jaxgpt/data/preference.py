"""Preference pairs (DPO) in TRL's three forms -> a chosen and a rejected conversation each, rendered
with the chat template -> rows where a pair's two sequences are neighbouring segments.

Forms, detected per record (``detect_pair_form``):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (the prompt is a user turn, the replies
  assistant turns);
- ``conversational``: ``prompt`` a message list, ``chosen`` / ``rejected`` assistant message lists;
- ``implicit``: ``chosen`` / ``rejected`` whole conversations (message lists) sharing a prefix, the
  prompt (as Anthropic HH is laid out).

Only the replies' tokens (with their ``<|im_end|>``) are scored: the chat template's assistant
spans after the prompt (``loss_on=completion``). A row holds pair k as segments 2k+1 (chosen) and
2k+2 (rejected), so ``jaxgpt.objectives.DPO`` tells them apart by segment id alone; ``data.pack``
packs several pairs a row, else one pair a row (padded).
"""

from __future__ import annotations

import numpy as np

from jaxgpt.config import DataConfig, DataError, DataSource
from jaxgpt.data.pack import DataStats, PackedDataset, pack_best_fit, pad_id, tokenize_chats
from jaxgpt.data.read import Example, _check_text, _field, _messages, read_records
from jaxgpt.tokenizer import ROLES

PAIR_FORMS = ("standard", "conversational", "implicit")


def detect_pair_form(rec) -> str | None:
    """TRL's preference form of a record, or None if it is no preference pair."""
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        return None
    if "prompt" not in rec:
        return "implicit"
    return "standard" if isinstance(rec["prompt"], str) else "conversational"


def to_pair(rec, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen reply, rejected reply) as message lists; DataError naming ``where``."""
    if isinstance(rec, DataError):
        raise rec
    form = detect_pair_form(rec)
    if form is None:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        missing = [k for k in ("chosen", "rejected") if not isinstance(rec, dict) or k not in rec]
        raise DataError(f"{where}: not a preference pair (missing field {missing[0]!r}; keys {keys}); "
                        "objective.name=dpo reads prompt/chosen/rejected or chosen/rejected records")
    plain = {r: r for r in ROLES}
    if form == "standard":
        prompt = [{"role": "user", "content": _check_text(rec["prompt"], "prompt", where)}]
        chosen, rejected = ([{"role": "assistant", "content": _check_text(_field(rec, k, where), k, where)}]
                            for k in ("chosen", "rejected"))
    elif form == "conversational":
        prompt = _messages(_field(rec, "prompt", where, list), where, "prompt", "role", "content", plain)
        chosen, rejected = (_messages(_field(rec, k, where, list), where, k, "role", "content", plain)
                            for k in ("chosen", "rejected"))
    else:
        whole_c, whole_r = (_messages(_field(rec, k, where, list), where, k, "role", "content", plain)
                            for k in ("chosen", "rejected"))
        n = 0
        while n < min(len(whole_c), len(whole_r)) and whole_c[n] == whole_r[n]:
            n += 1
        if n == len(whole_c) == len(whole_r):
            raise DataError(f"{where}: chosen and rejected are identical")
        if n == 0:
            raise DataError(f"{where}: chosen and rejected share no prompt (their first messages differ)")
        prompt, chosen, rejected = whole_c[:n], whole_c[n:], whole_r[n:]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise DataError(f"{where}: {name} has no reply after the shared prompt")
        if reply[0]["role"] != "assistant" or reply[-1]["role"] != "assistant":
            raise DataError(f"{where}: {name} must start and end with an assistant turn, not "
                            f"{reply[0]['role'] if reply[0]['role'] != 'assistant' else reply[-1]['role']}")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; replies answer a user turn")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    return prompt, chosen, rejected


def _load_pairs(src: DataSource, cfg: DataConfig, stats: DataStats) -> list[tuple[Example, Example]]:
    """Validated pairs of one source as (chosen, rejected) Examples; bad records raise or are skipped."""
    pairs, records = [], 0
    for where, rec in read_records(src):
        if cfg.max_examples is not None and records >= cfg.max_examples:
            break
        records += 1
        stats.records += 1
        try:
            prompt, chosen, rejected = to_pair(rec, where)
        except DataError as e:
            if not cfg.skip_invalid:
                raise
            stats.skipped += 1
            if len(stats.skip_reasons) < 5:
                stats.skip_reasons.append(str(e))
            continue
        stats.formats[src.path] = "preference"
        pairs.append((Example(where, prompt + chosen, len(prompt)), Example(where, prompt + rejected, len(prompt))))
    if records == 0:
        raise DataError(f"{src.path}: no records (empty dataset)")
    if not pairs:
        raise DataError(f"{src.path}: all {records} records are invalid (skip_invalid); first: {stats.skip_reasons[0]}")
    return pairs


def _fit(ids: np.ndarray, mask: np.ndarray, room: int):
    """One sequence cut to ``room`` + 1 tokens (keep the start, as TRL), or None if no scored token is left."""
    ids, mask = ids[: room + 1], mask[: room + 1]
    return (ids, mask) if mask[1:].any() else None


def tokenize_pairs(pairs, cfg: DataConfig, tok, stats: DataStats) -> tuple[list, list[str]]:
    """[(chosen ids, mask), (rejected ids, mask), ...] flattened, and each segment's ``file:line``.
    A pair fits a row when its two sequences do (seq_len slots); longer ones are dropped, or with
    truncation=truncate each sequence keeps at most half the row."""
    segs = tokenize_chats([e for pair in pairs for e in pair], tok, "completion")
    out, wheres = [], []
    for k, (c, r) in enumerate(zip(segs[0::2], segs[1::2])):
        if len(c[0]) - 1 + len(r[0]) - 1 > cfg.seq_len:
            if cfg.truncation == "drop":
                stats.dropped += 1
                continue
            half = cfg.seq_len // 2
            c, r = _fit(*c, half), _fit(*r, half)
            if c is None or r is None:  # the prompt alone fills half a row: nothing left to compare
                stats.dropped += 1
                continue
            stats.truncated += 1
        out += [c, r]
        wheres += [pairs[k][0].where] * 2
    return out, wheres


class PreferenceDataset(PackedDataset):
    """Pairs packed into rows, chosen then rejected (``PackedDataset``'s batches; segment ids tell them
    apart). ``reference``: each segment's reference log-prob sum, once precomputed, else None."""

    reference: np.ndarray | None = None

    @property
    def num_pairs(self) -> int:
        return self.num_segments // 2


def pack_pairs(segs, wheres, cfg: DataConfig, tok, stats: DataStats, rng) -> PreferenceDataset:
    lengths = np.array([len(c) - 1 + len(r) - 1 for (c, _), (r, _) in zip(segs[0::2], segs[1::2])], np.int64)
    if cfg.pack:
        rows = pack_best_fit(lengths, cfg.seq_len, order=rng.permutation(len(lengths)))
        rows = [sorted(r) for r in rows]  # pairs in file order within a row
    else:
        rows = [[k] for k in range(len(lengths))]
    stats.count_rows(len(lengths), segs, int(lengths.sum()), len(rows), cfg.seq_len)
    return PreferenceDataset(segs, [[s for k in r for s in (2 * k, 2 * k + 1)] for r in rows], cfg.seq_len,
                             pad_id(tok), len(tok), stats, wheres)
