"""Sources -> (where, record) pairs -> validated ``Example``s (the formats); errors name the file and line or row."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from jaxgpt.config import DataError, DataSource
from jaxgpt.paths import PathError, check_remote, is_url, upath
from jaxgpt.tokenizer import ENDOFTEXT, IM_END, IM_START, ROLES

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet", ".csv", ".arrow")
CONTROL_TOKENS = (IM_START, IM_END, ENDOFTEXT)


def is_local(path: str) -> bool:
    """A file or folder (local, or in a bucket: gs://...), not a hub dataset."""
    if is_url(path):
        return True
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or path.lower().endswith(LOCAL_SUFFIXES)


def local_files(src: DataSource) -> list[Path]:
    try:
        check_remote(src.path)
        p = upath(src.path)
    except PathError as e:
        raise DataError(str(e)) from None
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
    with path.open("rb") as f:
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
    with path.open("rb") as f:
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
    if not is_local(src.path):
        yield from _skipping(_read_with_datasets(src, None, streaming), skip)
        return
    readers = []
    for f in local_files(src):  # a folder's files in name order
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
