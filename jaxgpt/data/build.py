"""Data config -> datasets: read, validate, tokenize, truncate, hold out, weight and pack each source;
``StreamingDataset`` does the same a window at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.config import DataConfig, DataError, DataSource
from jaxgpt.data.pack import DataStats, PackedDataset, pack_best_fit, pad_id, tokenize_chats, tokenize_texts
from jaxgpt.data.preference import PreferenceDataset, _load_pairs, detect_pair_form, pack_pairs, tokenize_pairs
from jaxgpt.data.read import Example, detect_format, is_local, local_files, read_records, to_example
from jaxgpt.paths import file_size
from jaxgpt.tokenizer import add_chat_template, template_name


def _prepare_tokenizer(cfg: DataConfig, tok, chat: bool):
    if not chat:
        return tok
    if cfg.template == "tokenizer":
        if not tok.chat_template:
            raise DataError("data.template=tokenizer but the tokenizer has no chat template")
        if cfg.loss_on != "all" and "generation" not in tok.chat_template:
            raise DataError("data.template=tokenizer: the tokenizer's chat template has no {% generation %} "
                            "markers, so assistant tokens cannot be found (use loss_on: all or template: chatml)")
        return tok
    if template_name(tok) != cfg.template:
        add_chat_template(tok, cfg.template)
    return tok


class _Validator:
    """Records of one source -> Examples; skips and counts if asked. With ``format: auto`` the format is
    detected on the first record of each file (a folder may hold files of different formats)."""

    def __init__(self, src: DataSource, cfg: DataConfig, stats: DataStats):
        self.src, self.fmt, self.skip_invalid, self.stats = src, src.format or cfg.format, cfg.skip_invalid, stats
        self.auto, self.file, self.found = self.fmt == "auto", None, []
        self.records = self.kept = 0

    def __call__(self, where: str, rec: Any) -> Example | None:
        self.records += 1
        self.stats.records += 1
        if self.auto and _file_of(where) != self.file:
            self.file, self.fmt = _file_of(where), "auto"
        try:
            if self.fmt == "auto":
                if isinstance(rec, DataError):
                    raise rec
                found = detect_format(rec) if isinstance(rec, dict) else None
                if found is None and detect_pair_form(rec):
                    raise DataError(f"{where}: a preference pair (chosen / rejected): it trains with "
                                    "objective.name=dpo, not sft")
                if found is None:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{where}: cannot tell the format from the keys {keys}; expected messages, "
                                    "conversations, prompt+completion, instruction+output or text "
                                    "(or set data.format)")
                self.fmt = found
                if found not in self.found:
                    self.found.append(found)
                self.stats.formats[self.src.path] = "+".join(self.found)
            ex = to_example(rec, self.fmt, where)
            self.kept += 1
            return ex
        except DataError as e:
            if not self.skip_invalid:
                raise
            self.stats.skipped += 1
            if len(self.stats.skip_reasons) < 5:
                self.stats.skip_reasons.append(str(e))
            return None

    def check(self):
        """After the last record: an empty or all-invalid source is an error."""
        if self.records == 0:
            raise DataError(f"{self.src.path}: no records (empty dataset)")
        if self.kept == 0:
            raise DataError(f"{self.src.path}: all {self.records} records are invalid (skip_invalid); "
                            f"first: {self.stats.skip_reasons[0]}")
        self.stats.formats[self.src.path] = "+".join(self.found) if self.auto and self.found else self.fmt


def _file_of(where: str) -> str:
    """The file (or hub dataset) part of a record's ``where``: ``path:line`` or ``path row i``."""
    return re.sub(r"(:\d+| row \d+)$", "", where)


def _load_examples(src: DataSource, cfg: DataConfig, stats: DataStats) -> list[Example]:
    validate = _Validator(src, cfg, stats)
    records = itertools.islice(read_records(src), cfg.max_examples)
    examples = [ex for ex in itertools.starmap(validate, records) if ex is not None]
    validate.check()
    return examples


def _tokenize_source(examples: list[Example], cfg: DataConfig, tok, stats: DataStats, src_path: str,
                     strict: bool = True):
    """Tokenize, then truncate or drop what does not fit a row. Returns (segments, wheres)."""
    texts = [e for e in examples if e.text is not None]
    chats = [e for e in examples if e.messages is not None]
    segs, wheres = [], []
    for e, seg in zip(chats, tokenize_chats(chats, tok, cfg.loss_on)):
        ids, mask = seg
        if len(ids) > cfg.seq_len + 1:
            if cfg.truncation == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, mask = ids[: cfg.seq_len + 1], mask[: cfg.seq_len + 1]
            if not mask[1:].any():
                stats.dropped += 1  # the assistant reply starts beyond seq_len: nothing to learn
                continue
        segs.append((ids, mask))
        wheres.append(e.where)
    for e in texts:
        pieces = tokenize_texts([e], tok, cfg.seq_len)
        segs += pieces
        wheres += [e.where] * len(pieces)
    if not segs and strict:
        longest = max(examples, key=lambda e: len(e.text or "") + sum(len(m["content"]) for m in e.messages or []))
        raise DataError(f"{src_path}: every example is longer than seq_len={cfg.seq_len} tokens "
                        f"(truncation={cfg.truncation}; e.g. {longest.where}); raise seq_len"
                        + (" or use truncation: truncate" if cfg.truncation == "drop" else ""))
    return segs, wheres


def _weighted(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    whole, frac = int(weight), weight - int(weight)
    idx = [np.arange(n)] * whole
    if frac > 0:
        idx.append(np.sort(rng.permutation(n)[: int(round(frac * n))]))
    return np.concatenate(idx) if idx else np.zeros(0, np.int64)


def _pack(segs, wheres, cfg: DataConfig, tok, stats: DataStats, rng) -> PackedDataset:
    """Pack segments into rows; fills the row and token counts of ``stats``."""
    lengths = np.array([len(t) - 1 for t, _ in segs], np.int64)
    if cfg.pack:
        rows = pack_best_fit(lengths, cfg.seq_len, order=rng.permutation(len(segs)))
    else:
        rows = [[i] for i in range(len(segs))]
    stats.count_rows(len(segs), segs, int(lengths.sum()), len(rows), cfg.seq_len)
    return PackedDataset(segs, rows, cfg.seq_len, pad_id(tok), len(tok), stats, wheres)


def build_datasets(cfg: DataConfig, tok) -> tuple[PackedDataset | StreamingDataset, PackedDataset | None]:
    """(train, eval or None). Gives ``tok`` the chat template in place when the data is chat.

    With ``cfg.streaming`` the training set is a ``StreamingDataset`` (same iterator API).
    """
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file or dataset")
    if cfg.streaming:
        train = StreamingDataset(cfg, tok)
        evalset = None
        if cfg.eval_sources:
            # Weights shape the training mix only: every eval example counts once, as without streaming.
            sources = [dataclasses.replace(s, weight=1.0) for s in cfg.eval_sources]
            evalset = build_datasets(dataclasses.replace(cfg, sources=sources, eval_sources=[],
                                                         streaming=False), tok)[0]
        return train, evalset
    rng = np.random.default_rng(cfg.seed)
    train_stats, eval_stats = DataStats(), DataStats()
    train_segs, train_wheres, eval_segs, eval_wheres = [], [], [], []
    loaded = [(src, _load_examples(src, cfg, train_stats)) for src in cfg.sources]
    eval_loaded = [(src, _load_examples(src, cfg, eval_stats)) for src in cfg.eval_sources]
    chat = any(e.messages is not None for _, exs in loaded + eval_loaded for e in exs)
    _prepare_tokenizer(cfg, tok, chat)
    for src, examples in loaded:
        segs, wheres = _tokenize_source(examples, cfg, tok, train_stats, src.path)
        keep = np.arange(len(segs))
        if cfg.eval_fraction > 0:
            # Each source's split has its own generator (seed, file name): changing another source or a
            # weight does not move this source's held-out examples into training, nor does moving the folder.
            split_rng = np.random.default_rng([cfg.seed, zlib.crc32(Path(src.path).name.encode())])
            perm = split_rng.permutation(len(segs))
            n_eval = max(1, int(round(cfg.eval_fraction * len(segs))))
            held, keep = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
            eval_segs += [segs[i] for i in held]
            eval_wheres += [wheres[i] for i in held]
        keep = keep[_weighted(len(keep), src.weight, rng)]
        train_segs += [segs[i] for i in keep]
        train_wheres += [wheres[i] for i in keep]
    for src, examples in eval_loaded:
        segs, wheres = _tokenize_source(examples, cfg, tok, eval_stats, src.path)
        eval_segs += segs
        eval_wheres += wheres
    if not train_segs:
        raise DataError("no training examples left (every source held out for eval?)")
    train = _pack(train_segs, train_wheres, cfg, tok, train_stats, rng)
    evalset = _pack(eval_segs, eval_wheres, cfg, tok, eval_stats, rng) if eval_segs else None
    return train, evalset


def build_preference_datasets(cfg: DataConfig, tok) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """(train, eval or None) of preference pairs (jaxgpt.data.preference), split and weighted as
    ``build_datasets`` does; gives ``tok`` the chat template."""
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file of preference pairs")
    if cfg.streaming:
        raise DataError("data.streaming: preference pairs are read whole (objective.name=dpo)")
    rng = np.random.default_rng(cfg.seed)
    train_stats, eval_stats = DataStats(), DataStats()
    loaded = [(src, _load_pairs(src, cfg, train_stats)) for src in cfg.sources]
    eval_pairs = [p for src in cfg.eval_sources for p in _load_pairs(src, cfg, eval_stats)]
    _prepare_tokenizer(cfg, tok, chat=True)
    train_pairs = []
    for src, pairs in loaded:
        keep = np.arange(len(pairs))
        if cfg.eval_fraction > 0:  # per source, seeded by its file name (as build_datasets)
            perm = np.random.default_rng([cfg.seed, zlib.crc32(Path(src.path).name.encode())]).permutation(len(pairs))
            n_eval = max(1, int(round(cfg.eval_fraction * len(pairs))))
            eval_pairs += [pairs[i] for i in np.sort(perm[:n_eval])]
            keep = np.sort(perm[n_eval:])
        train_pairs += [pairs[i] for i in keep[_weighted(len(keep), src.weight, rng)]]
    sets = []
    for pairs, stats in ((train_pairs, train_stats), (eval_pairs, eval_stats)):
        segs, wheres = tokenize_pairs(pairs, cfg, tok, stats)
        sets.append(pack_pairs(segs, wheres, cfg, tok, stats, rng) if segs else None)
    if sets[0] is None:
        raise DataError(f"no preference pair fits data.seq_len={cfg.seq_len} (truncation={cfg.truncation})")
    return sets[0], sets[1]


def build_dataset(cfg: DataConfig, tok) -> PackedDataset:
    """The training set only (see ``build_datasets``)."""
    return build_datasets(cfg, tok)[0]


class StreamingDataset:
    """Rows packed on the fly, ``stream_window`` examples at a time, for data larger than memory.

    A streaming epoch is one pass over every source. Sources are interleaved at
    random in proportion to their weights (a draw seeded by ``(seed, epoch,
    window)``) until each runs out; each window's examples are packed best-fit and
    its rows shuffled. The iterator's state names the window by how many records of
    each source came before it, so a resume re-reads (without tokenizing) up to there.
    ``stats`` count what has been read so far.
    """

    def __init__(self, cfg: DataConfig, tok):
        self.cfg, self.tok = cfg, tok
        self.seq_len, self.stats = cfg.seq_len, DataStats(seq_len=cfg.seq_len)
        self.weights = np.array([s.weight for s in cfg.sources], np.float64)
        chat = False
        for src in cfg.sources:  # the first valid record of each source says chat or text, and checks the source
            validate = _Validator(src, dataclasses.replace(cfg, skip_invalid=True), DataStats())
            first = next((ex for ex in itertools.starmap(validate, read_records(src, streaming=True))
                          if ex is not None), None)
            if first is None:
                validate.check()
            chat = chat or first.messages is not None
        _prepare_tokenizer(cfg, tok, chat)
        self.pad_id, self.vocab_size = pad_id(tok), len(tok)
        # The data itself is not read ahead: local sources are known by their files' sizes, hub datasets
        # by name only (a hub dataset that changes under the same name is not detected).
        sizes = [[(f.name, file_size(f)) for f in local_files(src)] if is_local(src.path) else None
                 for src in cfg.sources]
        ident = json.dumps([cfg.to_dict(), len(tok), tok.chat_template, sizes], sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]

    def open(self, consumed: list[int]):
        """Readers and validators positioned after ``consumed[i]`` records of source ``i``."""
        readers, validators = [], []
        for src, skip in zip(self.cfg.sources, consumed):
            limit = None if self.cfg.max_examples is None else max(0, self.cfg.max_examples - skip)
            readers.append(itertools.islice(read_records(src, streaming=True, skip=skip), limit))
            validators.append(_Validator(src, self.cfg, self.stats))
        return readers, validators

    def window(self, readers, validators, epoch: int, window: int, consumed: list[int]):
        """(packed window or None at the end of the epoch, records consumed after it)."""
        rng = np.random.default_rng([self.cfg.seed, epoch, window])
        counts, active, examples = list(consumed), list(range(len(readers))), []
        while len(examples) < self.cfg.stream_window and active:
            p = self.weights[active] / self.weights[active].sum()
            i = active[int(rng.choice(len(active), p=p))]
            item = next(readers[i], None)
            if item is None:
                active.remove(i)
                continue
            counts[i] += 1
            ex = validators[i](*item)
            if ex is not None:
                examples.append(ex)
        if not examples:
            return None, counts
        stats = DataStats()
        segs, wheres = _tokenize_source(examples, self.cfg, self.tok, stats, "", strict=False)
        packed = _pack(segs, wheres, self.cfg, self.tok, stats, rng)
        for key in ("examples", "truncated", "dropped", "tokens", "trained_tokens", "rows", "non_pad_tokens"):
            setattr(self.stats, key, getattr(self.stats, key) + getattr(stats, key))
        return packed, counts


class StreamCursor:
    """The position in a StreamingDataset's endless row stream: (epoch, window, records before it, row)."""

    def __init__(self, ds: StreamingDataset, seed: int, shuffle: bool):
        self.ds, self.seed, self.shuffle = ds, seed, shuffle
        self.set(epoch=0, window=0, consumed=[0] * len(ds.cfg.sources), row=0)

    def set(self, *, epoch: int, window: int, consumed: list[int], row: int):
        self.epoch, self.window, self.consumed, self.row = epoch, window, list(consumed), row
        self.rows_in_epoch, self.whole_epoch = 0, window == 0 and row == 0  # to tell an epoch with no rows
        self._win = None  # made (again) on the next row

    def state(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "consumed": list(self.consumed), "row": self.row}

    def _make(self):
        self._win, self._next = self.ds.window(self.readers, self.validators, self.epoch, self.window, self.consumed)
        if self._win is not None:
            n = self._win.num_rows
            rng = np.random.default_rng([self.seed, self.epoch, self.window, 1])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)

    def next_row(self) -> tuple[PackedDataset, int]:
        if self._win is None:
            self.readers, self.validators = self.ds.open(self.consumed)
            self._make()
        while self._win is None or self.row >= self._win.num_rows:
            if self._win is None:  # the sources ran out: next epoch
                if self.rows_in_epoch == 0 and self.whole_epoch:
                    raise DataError(f"{', '.join(s.path for s in self.ds.cfg.sources)}: no example fits "
                                    f"seq_len={self.ds.seq_len} (truncation={self.ds.cfg.truncation})")
                self.set(epoch=self.epoch + 1, window=0, consumed=[0] * len(self.consumed), row=0)
                self.readers, self.validators = self.ds.open(self.consumed)
                self._make()
                continue
            self.consumed, self.window, self.row = self._next, self.window + 1, 0
            self._make()
        r = int(self._order[self.row])
        self.row += 1
        self.rows_in_epoch += 1
        return self._win, r
