"""Chat data: read, validate, render with the chat template, mask, pack, iterate.

Public API (what ``jaxgpt.train`` and ``jaxgpt.config`` use)::

    cfg = DataConfig(sources=["chats.jsonl"], seq_len=1024)       # or DataConfig.from_dict({...})
    tok = add_chat_template(load_tokenizer(), cfg.template)        # jaxgpt.tokenizer; resize the model to len(tok)
    train, evalset = build_datasets(cfg, tok)                      # PackedDataset, PackedDataset | None
    print(train.stats.summary())                                   # examples, tokens, truncated, efficiency ...
    it = DataIterator(train, global_batch=32, process_index=jax.process_index(),
                      process_count=jax.process_count(), seed=cfg.seed, shuffle=cfg.shuffle)
    batch = next(it)            # this process's rows of the global batch, numpy [global_batch // process_count, seq_len]
    saved = it.state()          # small JSON dict; DataIterator(...).restore(saved) continues with identical batches
    for batch in eval_batches(evalset, global_batch, process_index=pi, process_count=pc): ...

With ``DataConfig(streaming=True)`` the training set is a ``StreamingDataset``
(read lazily, packed a window at a time) behind the same ``DataIterator`` API.

Batches are dicts of numpy arrays ``[B, seq_len]``: ``input_ids``, ``targets``,
``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32). A packed
conversation of tokens ``x`` with token mask ``m`` holds ``x[:-1]`` as inputs,
``x[1:]`` as targets and ``m[1:]`` as loss mask; ``segment_ids`` count 1.. per
conversation in a row (0 = padding) and ``positions`` restart at 0 for each, so
the model's segment masking keeps packed conversations apart.

Pipeline (one way): sources (local json/jsonl/txt read here so errors can name
the line; parquet/csv/arrow files and hub datasets through ``datasets``)
-> records -> validated examples (messages | text) -> tokens + trained-token mask
(chat template's ``{% generation %}`` spans via ``return_assistant_tokens_mask``)
-> truncate / drop -> best-fit-decreasing packing into rows -> iterator.

Formats: ``messages`` ({role, content} lists, OpenAI/TRL), ``sharegpt``
(``conversations: [{from: human|gpt|system, value}]``), ``prompt_completion``
(strings, or TRL conversational message lists), ``alpaca`` (``instruction``,
optional ``input``/``system``, ``output``), ``text`` (continued pre-training:
every token trained, long documents split into ``seq_len`` chunks).

Bad input raises ``DataError`` (a ``ValueError``) naming the file and line
(``path:LINE: ...``) or dataset row (``path row I: ...``); with
``skip_invalid=True`` bad records are skipped and counted instead.

``python -m jaxgpt.data inspect --data FILE`` shows rendered examples with the
trained tokens marked, and the statistics.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import hashlib
import itertools
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxgpt.inputs import Range
from jaxgpt.tokenizer import ENDOFTEXT, IM_END, IM_START, ROLES, add_chat_template, load_tokenizer, template_name

FORMATS = ("auto", "messages", "sharegpt", "prompt_completion", "alpaca", "text")
TEMPLATES = ("chatml", "plain", "tokenizer")
LOSS_ON = ("assistant", "all", "completion")
TRUNCATION = ("truncate", "drop")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet", ".csv", ".arrow")
CONTROL_TOKENS = (IM_START, IM_END, ENDOFTEXT)


class DataError(ValueError):
    """Bad data or data config; the message names the file and line, row or key."""


# ----------------------------------------------------------------------------- config


@dataclass
class DataSource:
    """One dataset: a local file / folder, or a hub dataset id with config ``name`` and ``split``.

    ``weight`` scales this source's share of an epoch: 2.0 repeats every example
    twice, 0.5 keeps a seeded random half.
    """

    path: str
    name: str | None = None
    split: str = "train"
    weight: float = 1.0
    format: str | None = None  # None: DataConfig.format

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"data source path must be a non-empty string, got {self.path!r}")
        self.weight = Range(0, low_open=True).check(f"{self.path}: weight", self.weight, DataError)
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"{self.path}: format={self.format!r}: choose from {', '.join(FORMATS)}")


def help_field(default, help: str):
    """A dataclass field with a help string (shown by ``python -m jaxgpt.train --help``); the run
    config's sections (``jaxgpt.config``) use it too."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_f = help_field


@dataclass
class DataConfig:
    """Data knobs (the ``data:`` section of a run config)."""

    sources: list[DataSource] = _f([], "files, folders or hub ids, or {path, name, split, weight, format} each")
    format: str = _f("auto", "auto (from each file's first record) | messages | sharegpt | prompt_completion | "
                     "alpaca | text")
    template: str = _f("chatml", "chatml | plain (no new tokens) | tokenizer (its own template, as is)")
    seq_len: int = _f(1024, "tokens per row (model inputs); a conversation fits if it has <= seq_len + 1 tokens")
    loss_on: str = _f("assistant", "assistant | all | completion (only the final assistant turn / the completion)")
    truncation: str = _f("truncate", "truncate | drop conversations longer than a row")
    skip_invalid: bool = _f(False, "skip and count bad records instead of raising")
    pack: bool = _f(True, "pack several conversations per row; false = one per row (to compare efficiency)")
    seed: int = _f(0, "packing tie-break, eval split, weights and epoch order")
    shuffle: bool = _f(True, "shuffle the rows every epoch")
    eval_fraction: float = _f(0.0, "hold out this share of each source's examples for eval")
    eval_sources: list[DataSource] = _f([], "separate eval data (as sources; weights ignored)")
    max_examples: int | None = _f(None, "read at most this many records per source (smoke runs)")
    streaming: bool = _f(False, "read lazily and pack stream_window examples at a time (data larger than memory)")
    stream_window: int = _f(4096, "examples per packing window when streaming")

    def __post_init__(self):
        self.sources = [_as_source(s, "sources") for s in _as_list(self.sources)]
        self.eval_sources = [_as_source(s, "eval_sources") for s in _as_list(self.eval_sources)]
        for key, choices in (("format", FORMATS), ("template", TEMPLATES), ("loss_on", LOSS_ON),
                             ("truncation", TRUNCATION)):
            if getattr(self, key) not in choices:
                raise DataError(f"data.{key}={getattr(self, key)!r}: choose from {', '.join(choices)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise DataError(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        Range(0, 1, high_open=True).check("data.eval_fraction", self.eval_fraction, DataError)
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"data.max_examples must be >= 1, got {self.max_examples!r}")
        if self.stream_window < 1:
            raise DataError(f"data.stream_window must be >= 1, got {self.stream_window!r}")
        if self.streaming and self.eval_fraction:
            raise DataError("data.eval_fraction needs the whole dataset; with streaming give data.eval_sources")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(x):
    if x is None:
        return []
    return [x] if isinstance(x, (str, dict, DataSource)) else list(x)


def _as_source(s, key: str) -> DataSource:
    if isinstance(s, DataSource):
        return s
    if isinstance(s, str):
        return DataSource(path=s)
    if isinstance(s, dict):
        unknown = sorted(set(s) - {f.name for f in dataclasses.fields(DataSource)})
        if unknown:
            raise DataError(f"data.{key}: unknown key(s) {unknown} in {s!r}")
        return DataSource(**s)
    raise DataError(f"data.{key}: expected a path or a mapping, got {s!r}")


# ----------------------------------------------------------------------------- reading


def _is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or path.lower().endswith(LOCAL_SUFFIXES)


def _local_files(src: DataSource) -> list[Path]:
    p = Path(src.path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{src.path}: folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if not p.is_file():
        raise DataError(f"{src.path}: file not found")
    if p.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"{src.path}: unsupported file type {p.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")
    return [p]


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _read_jsonl(path: Path, skip: int = 0) -> Iterator[tuple[str, Any]]:
    """(``path:LINE``, record) per non-blank line; a bad line yields a DataError in place of its record.

    Lazy, so it streams files larger than memory; ``skip`` passes over records without parsing them.
    """
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not part of the record
                raw = raw[len(codecs.BOM_UTF8):]
            if skipped < skip:  # the same blank-line test as below, so a resume skips exactly these records
                if raw.decode("utf-8", errors="replace").strip():
                    skipped += 1
                continue
            where = f"{path}:{lineno}"
            try:
                line = _utf8(raw, where)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.pos + 1})") from None
            except DataError as e:
                yield where, e
                continue
            yield where, rec
    return skipped


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of records; each record is named by the line it starts on."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not part of the JSON
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})") from None
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i):
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def bad(e: json.JSONDecodeError):
        return DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})")

    i = skip(0)
    if i == len(text):
        raise DataError(f"{path}: empty file (no records)")
    if text[i] != "[":
        try:
            dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise bad(e) from None
        raise DataError(f"{path}:1: expected a JSON array of records (or one record per line in a .jsonl file)")
    i, line, counted = skip(i + 1), 1, 0
    while i < len(text) and text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        try:
            rec, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise bad(e) from None
        yield f"{path}:{line}", rec
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i >= len(text) or text[i] != "]":
            e = json.JSONDecodeError("Expecting ',' delimiter", text, min(i, len(text)))
            raise bad(e)


def _read_txt(path: Path) -> Iterator[tuple[str, Any]]:
    """A .txt file is one document (continued pre-training), or several separated by ``<|endoftext|>``."""
    with open(path, "rb") as f:
        lines = [_utf8(raw, f"{path}:{n}") for n, raw in enumerate(f, 1)]
    text = "".join(lines).removeprefix("\ufeff")
    docs = text.split(ENDOFTEXT)
    if len(docs) == 1:
        yield f"{path}:1", {"text": text}
        return
    line = 1
    for doc in docs:
        if doc.strip():  # named by its first non-blank line; the newlines around a separator are dropped
            start = line + doc[: len(doc) - len(doc.lstrip())].count("\n")
            yield f"{path}:{start}", {"text": doc.strip("\r\n")}
        line += doc.count("\n")


def _read_with_datasets(src: DataSource, file: Path | None, streaming: bool = False) -> Iterator[tuple[str, Any]]:
    """A hub dataset (``file`` None) or one local parquet / csv / arrow file, through ``datasets``."""
    import datasets

    if file is not None:
        builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}[file.suffix.lower()]
        name, kwargs, where = builder, {"data_files": [str(file)]}, str(file)
        split = "train"
    else:
        name, kwargs, where, split = src.path, {"name": src.name}, src.path, src.split
    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming, **kwargs)
    except Exception as e:  # datasets raises many types (connection, not found, arrow); name the source
        raise DataError(f"{where}: cannot load dataset (split={split!r}): {type(e).__name__}: {e}") from None
    for i, rec in enumerate(ds):
        yield f"{where} row {i}", rec


def _skipping(records: Iterator, skip: int):
    """``records`` after the first ``skip``; returns how many it skipped."""
    skipped = 0
    for item in records:
        if skipped < skip:
            skipped += 1
            continue
        yield item
    return skipped


def read_records(src: DataSource, *, streaming: bool = False, skip: int = 0) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs of one source after its first ``skip``; ``where`` names the file and line or row.

    ``streaming`` reads hub / parquet / csv data with ``datasets``' streaming mode
    (JSONL is always read lazily; a .json array or .txt file is read whole).
    """
    if not _is_local(src.path):
        yield from _skipping(_read_with_datasets(src, None, streaming), skip)
        return
    readers = []
    for f in _local_files(src):  # a folder's files in name order
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            readers.append(lambda skip, f=f: _read_jsonl(f, skip))
        elif suffix == ".json":
            readers.append(lambda skip, f=f: _skipping(_read_json(f), skip))
        elif suffix == ".txt":
            readers.append(lambda skip, f=f: _skipping(_read_txt(f), skip))
        else:  # parquet / csv / arrow, one file at a time so that errors name the right one
            readers.append(lambda skip, f=f: _skipping(_read_with_datasets(src, f, streaming), skip))
    for read in readers:
        skip -= yield from read(skip)


# ----------------------------------------------------------------------------- formats


@dataclass
class Example:
    """One validated record: a conversation, or a text document."""

    where: str
    messages: list[dict[str, str]] | None = None
    n_prompt: int = 0  # messages[:n_prompt] are the prompt for loss_on=completion
    text: str | None = None


def detect_format(rec: dict) -> str | None:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    return None


def _field(rec: dict, key: str, where: str, types=str, optional=False):
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(f"{where}: field {key!r} must be {want}, got {type(value).__name__}")
    return value


def _check_text(text: str, what: str, where: str) -> str:
    if not text.strip():
        raise DataError(f"{where}: {what} is empty")
    for t in CONTROL_TOKENS:
        if t in text:
            line = text.count("\n", 0, text.index(t)) + 1
            at = f" (on line {line} of the {what})" if "\n" in text else ""
            raise DataError(f"{where}: {what} contains the control token {t!r}{at}")
    return text


def _messages(items, where: str, key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    if not isinstance(items, list):
        raise DataError(f"{where}: field {key!r} must be a list, got {type(items).__name__}")
    if not items:
        raise DataError(f"{where}: field {key!r} is an empty conversation")
    out = []
    for j, m in enumerate(items):
        at = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} must be an object, got {type(m).__name__}")
        role = _field(m, role_key, f"{where}: {at}")
        if role not in roles:
            raise DataError(f"{where}: {at} has unknown {role_key} {role!r} (expected one of {', '.join(roles)}; "
                            "tool and function-call turns are not supported)")
        content = _field(m, content_key, f"{where}: {at}")
        out.append({"role": roles[role], "content": _check_text(content, f"{at}.{content_key}", where)})
    return out


def to_example(rec: Any, fmt: str, where: str) -> Example:
    """Validate one record of format ``fmt`` into an ``Example``; raises DataError naming ``where``."""
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    plain = {r: r for r in ROLES}
    if fmt == "text":
        return Example(where, text=_check_text(_field(rec, "text", where), "text", where))
    if fmt == "messages":
        msgs = _messages(_field(rec, "messages", where, list), where, "messages", "role", "content", plain)
        n_prompt = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
    elif fmt == "sharegpt":
        msgs = _messages(_field(rec, "conversations", where, list), where, "conversations", "from", "value",
                         SHAREGPT_ROLES)
        system = _field(rec, "system", where, optional=True)  # LLaMA-Factory's layout keeps it beside the turns
        if system and system.strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": _check_text(system, "system", where)})
        n_prompt = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
    elif fmt == "prompt_completion":
        prompt, completion = _field(rec, "prompt", where, (str, list)), _field(rec, "completion", where, (str, list))
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": _check_text(prompt, "prompt", where)},
                    {"role": "assistant", "content": _check_text(completion, "completion", where)}]
            n_prompt = 1
        else:
            p = _messages(prompt, where, "prompt", "role", "content", plain)
            c = _messages(completion, where, "completion", "role", "content", plain)
            msgs, n_prompt = p + c, len(p)
    elif fmt == "alpaca":
        instruction = _check_text(_field(rec, "instruction", where), "instruction", where)
        extra = _field(rec, "input", where, optional=True)
        if extra and extra.strip():
            instruction = instruction.strip() + "\n\n" + _check_text(extra, "input", where).strip()
        msgs = [{"role": "user", "content": instruction},
                {"role": "assistant", "content": _check_text(_field(rec, "output", where), "output", where)}]
        system = _field(rec, "system", where, optional=True)
        if system and system.strip():
            msgs.insert(0, {"role": "system", "content": _check_text(system, "system", where)})
        n_prompt = len(msgs) - 1
    else:
        raise DataError(f"{where}: unknown format {fmt!r}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: conversation ends with a {msgs[-1]['role']} turn, not an assistant turn")
    return Example(where, messages=msgs, n_prompt=n_prompt)


# ----------------------------------------------------------------------------- statistics


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


# ----------------------------------------------------------------------------- tokenizing


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


# ----------------------------------------------------------------------------- packing


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
        return _batch([(self, int(r)) for r in rows], self.seq_len, self.pad_id)


def _batch(rows: list[tuple[PackedDataset, int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    b, t = len(rows), seq_len
    out = {"input_ids": np.full((b, t), pad_id, np.int32), "targets": np.full((b, t), pad_id, np.int32),
           "loss_mask": np.zeros((b, t), np.float32), "segment_ids": np.zeros((b, t), np.int32),
           "positions": np.zeros((b, t), np.int32)}
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
            at += n
    return out


# ----------------------------------------------------------------------------- building


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
    stats.examples = len(segs)
    stats.tokens = int(sum(len(t) for t, _ in segs))
    stats.trained_tokens = int(sum(int(m[1:].sum()) for _, m in segs))
    stats.non_pad_tokens = int(lengths.sum())
    stats.rows, stats.seq_len = len(rows), cfg.seq_len
    return PackedDataset(segs, rows, cfg.seq_len, _pad_id(tok), len(tok), stats, wheres)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


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
        self.pad_id, self.vocab_size = _pad_id(tok), len(tok)
        # The data itself is not read ahead: local sources are known by their files' sizes, hub datasets
        # by name only (a hub dataset that changes under the same name is not detected).
        sizes = [[(f.name, f.stat().st_size) for f in _local_files(src)] if _is_local(src.path) else None
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


class _StreamCursor:
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


# ----------------------------------------------------------------------------- iterating


class DataIterator:
    """Endless, deterministic batches of packed rows; this process's share of each global batch.

    The row stream is epoch 0's permutation of the rows, then epoch 1's, ... (each
    seeded by ``(seed, epoch)``); global batch ``k`` is rows ``k*B .. k*B+B-1`` of
    that stream and process ``p`` of ``P`` takes the ``p``-th contiguous ``B/P``
    of them. A batch may straddle an epoch boundary: no row is ever dropped.
    The state is a global row position, so a run may resume with another batch
    size or process count. A ``StreamingDataset`` works the same way, its stream
    being windows of rows (every process reads the whole stream).
    """

    def __init__(self, dataset: PackedDataset | StreamingDataset, global_batch: int, *, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch < 1 or global_batch % process_count:
            raise DataError(f"global batch {global_batch} must be a positive multiple of process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} not in [0, {process_count})")
        self.dataset, self.global_batch = dataset, global_batch
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.seed, self.shuffle = seed, shuffle
        self.position = 0  # index of the next global row in the endless stream
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._stream = _StreamCursor(dataset, seed, shuffle) if isinstance(dataset, StreamingDataset) else None
        if self._stream is None and dataset.num_rows == 0:
            raise DataError("dataset has no rows")

    @property
    def epoch(self) -> int:
        return self._stream.epoch if self._stream else self.position // self.dataset.num_rows

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = self.dataset.num_rows
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _row(self, g: int) -> int:
        n = self.dataset.num_rows
        return int(self._order(g // n)[g % n])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.process_index * self.local_batch
        if self._stream is not None:
            rows = [self._stream.next_row() for _ in range(self.global_batch)][first: first + self.local_batch]
        else:
            rows = [(self.dataset, self._row(self.position + first + j)) for j in range(self.local_batch)]
        self.position += self.global_batch
        return _batch(rows, self.dataset.seq_len, self.dataset.pad_id)

    def state(self) -> dict[str, Any]:
        """A small JSON-able dict; ``restore`` continues exactly after it."""
        common = {"seed": self.seed, "shuffle": self.shuffle, "fingerprint": self.dataset.fingerprint}
        if self._stream is not None:
            return {**self._stream.state(), "streaming": True, **common}
        n = self.dataset.num_rows
        return {"epoch": self.position // n, "position": self.position % n, "rows_per_epoch": n, **common}

    def restore(self, state: dict[str, Any], *, strict: bool = True) -> "DataIterator":
        """Continue from ``state()``. ``strict``: refuse a state saved on different data or seed."""
        keys = ("epoch", "window", "row") if self._stream is not None else ("epoch", "position")
        for key in keys:
            if not isinstance(state.get(key), int):
                raise DataError(f"data state: missing or non-integer {key!r} in {state!r}")
        if bool(state.get("streaming")) != (self._stream is not None):
            raise DataError("data state: saved with streaming=%s, now streaming=%s"
                            % (bool(state.get("streaming")), self._stream is not None))
        if strict:
            mine = self.state()
            for key in ("fingerprint", "rows_per_epoch", "seed", "shuffle"):
                if key in state and state[key] != mine[key]:
                    raise DataError(f"data state: {key} {state[key]!r} != {mine[key]!r} of this dataset; the data, "
                                    "seq_len, tokenizer or seed changed since it was saved. Resume with the data "
                                    "it was saved with, or train on the new data in a new train.output_dir "
                                    "(from Python, restore(strict=False) continues anyway)")
        if self._stream is not None:
            consumed = state.get("consumed")
            if not isinstance(consumed, list) or len(consumed) != len(self.dataset.cfg.sources):
                raise DataError(f"data state: 'consumed' must list one count per source, got {consumed!r}")
            self._stream.set(epoch=state["epoch"], window=state["window"], consumed=consumed, row=state["row"])
        else:
            self.position = state["epoch"] * self.dataset.num_rows + state["position"]
        return self


def eval_batches(dataset: PackedDataset, global_batch: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch is filled with all-padding rows (loss_mask 0)."""
    if global_batch < 1 or global_batch % process_count:
        raise DataError(f"global batch {global_batch} must be a positive multiple of process_count={process_count}")
    local = global_batch // process_count
    n = dataset.num_rows
    for start in range(0, n, global_batch):
        first = start + process_index * local
        yield dataset.batch([r if r < n else -1 for r in range(first, first + local)])


# ----------------------------------------------------------------------------- inspect CLI


def render_marked(tok, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """Decoded tokens with trained ones (targets with loss) marked: green, or between ⟦ ⟧."""
    trained = mask.astype(bool).copy()
    trained[0] = False  # the first token is never a target
    on, off = ("\033[1;32m", "\033[0m") if color else ("⟦", "⟧")
    parts, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or trained[j] != trained[start]:
            text = tok.decode(ids[start:j].tolist())
            parts.append(on + text + off if trained[start] else text)
            start = j
    return "".join(parts)


def inspect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.data inspect",
                                description="Show rendered examples with the trained tokens marked, and statistics.")
    p.add_argument("--data", action="append", default=[], help="file, folder or hub id (repeatable)")
    p.add_argument("--config", help="YAML/JSON run config or a shipped config's name (demo); its `data:` section "
                                    "(or the whole file) is the DataConfig")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--template", choices=TEMPLATES)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--loss-on", choices=LOSS_ON)
    p.add_argument("--truncation", choices=TRUNCATION)
    p.add_argument("--skip-invalid", action="store_true", default=None)
    p.add_argument("--no-pack", action="store_true", help="one conversation per row")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the vendored GPT-2 files)")
    p.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = p.parse_args(argv)
    try:
        d: dict[str, Any] = {}
        if args.config:
            d = _read_config(args.config)
        if args.data:
            d["sources"] = args.data
        for key in ("format", "template", "seq_len", "loss_on", "truncation", "skip_invalid"):
            if getattr(args, key) is not None:
                d[key] = getattr(args, key)
        if args.no_pack:
            d["pack"] = False
        from jaxgpt.config import from_dict  # the run config's value conversion and key checks (config imports data)

        cfg = from_dict({"data": d}, args.config or "command line").data
        if not cfg.sources:
            raise DataError(f"{args.config}: no data.sources (or give --data PATH)" if args.config
                            else "give --data PATH or --config FILE")
        tok = load_tokenizer(args.tokenizer)
        train, evalset = build_datasets(cfg, tok)
        stats = train.stats
        if isinstance(train, StreamingDataset):  # show the first packing window
            cursor = _StreamCursor(train, cfg.seed, cfg.shuffle)
            train = cursor.next_row()[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    mark = "green" if color else "⟦ ⟧"
    print(f"template={cfg.template} loss_on={cfg.loss_on} seq_len={cfg.seq_len} vocab={len(tok)}; "
          f"trained tokens shown in {mark}\n")
    seen = set()
    for k in range(train.num_segments):
        if len(seen) >= args.n:
            break
        where = train.segment_sources[k]
        if where in seen:
            continue
        seen.add(where)
        ids, mask = train.segment(k)
        print(f"── {where}  ({len(ids)} tokens, {int(mask[1:].sum())} trained)")
        print(render_marked(tok, ids, mask, color).rstrip("\n"))
        print()
    print("train (first streaming window):" if cfg.streaming else "train:")
    print(stats.summary())
    if evalset is not None:
        print("\neval:")
        print(evalset.stats.summary())
    return 0


def _read_config(path: str) -> dict:
    from jaxgpt.config import SECTIONS, config_path, load_config  # config imports data

    p = config_path(path)  # a file, or the name of a shipped config
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a mapping")
    if any(k in SECTIONS for k in d):  # a run config: read as `train` reads it (bundled paths, value types)
        return load_config(p).data.to_dict()
    return dict(d)  # a data section on its own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        argv = argv[1:]
    return inspect_main(argv)


if __name__ == "__main__":
    sys.exit(main())
