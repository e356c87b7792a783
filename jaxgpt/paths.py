"""Every path a user gives: a local path or a URL (``gs://bucket/folder``, through ``etils.epath``),
and where a model's files are (a local folder, a folder in a bucket, or a hub id fetched into the
Hugging Face cache). The one module that opens user files; see docs/tpu.md for what buckets change.

jax-free, so that the tokenizer, the config checks and the loader can name a path without
importing the model code.
"""

from __future__ import annotations

import os
from pathlib import Path

# Weight files in order of preference.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "flax_model.msgpack", "pytorch_model.bin")


class WeightsError(ValueError):
    """A model folder or hub id that cannot be found, or weights that cannot be read or do not fit the model."""


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``config.json`` and one of ``WEIGHT_FILES``. A jaxgpt training output_dir has
    a ``config.json`` too (the run's), beside its checkpoints, but no weights file."""
    path = upath(path)
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def is_local_path(name: str) -> bool:
    """True if ``name`` can only mean a local path, never a hub id ("org/name"): it starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, or is a URL (``gs://bucket/folder``)."""
    return is_url(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def missing_folder(name: str) -> str:
    """The one-line error for a local path that does not exist, naming what its parent holds."""
    parent = upath(name).parent
    try:
        have = sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) if str(parent) != "." else None
    except OSError:  # no such parent, or not listable
        have = None
    if have is None:
        return f"{name}: no such folder"
    return f"{name}: no such folder (in {parent}/: {', '.join(have[:8]) + (', ...' if len(have) > 8 else '') or 'nothing'})"


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder, a folder in a bucket copied into ``cache_folder()``, or a hub id downloaded
    into the HF cache (config, weights, tokenizer)."""
    if is_url(name_or_path):
        check_remote(name_or_path)
        if not upath(name_or_path).is_dir():
            raise WeightsError(missing_folder(os.fspath(name_or_path)))
        return local_copy(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path}: expected a folder holding config.json and weights, got a file")
    name = str(name_or_path)
    if is_local_path(name):
        raise WeightsError(missing_folder(name))
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    aux = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
           "chat_template.jinja", "chat_template.json"]  # transformers 5 keeps the template in its own file
    try:
        for fname in WEIGHT_FILES:
            try:
                hf_hub_download(name, fname)
            except RemoteEntryNotFoundError:  # the repo exists but lacks this file
                continue
            patterns = aux + [fname] + (["model-*.safetensors"] if fname.endswith("index.json") else [])
            return Path(snapshot_download(name, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if Path(name.split("/")[0]).is_dir():  # runs/gpt2-chta: most likely a mistyped local folder
            raise WeightsError(f"{missing_folder(name)}, and the Hugging Face Hub could not provide it either "
                               f"({type(e).__name__})") from None
        raise WeightsError(
            f"{name}: not a local folder, and the Hugging Face Hub could not provide it "
            f"(offline or unknown repo?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    raise WeightsError(f"{name}: the hub repo has none of {', '.join(WEIGHT_FILES)}")


# ----------------------------------------------------------------------------- paths in buckets
# Every path a user gives may be a URL (gs://bucket/folder, or any fsspec protocol): what TPU users
# point output_dir, data and weights at, as in MaxText and Levanter. ``etils.epath`` (what orbax uses,
# gcsfs underneath for gs://) reads and writes them; local paths stay pathlib Paths.

def is_url(path: str | os.PathLike) -> bool:
    """A path with a protocol (``gs://bucket/x``, ``s3://...``, ``memory://...``)."""
    return "://" in os.fspath(path)


class PathError(ValueError):
    """A path in a bucket that cannot be used (no bucket, unreachable, no credentials); one line."""


def _no_listings_cache() -> None:
    """gcsfs caches folder listings for the life of the process; orbax's tensorstore writes past it
    (a step folder written by tensorstore would stay "missing" to orbax's own checks), as do the other
    processes of a run. A listing is one request: always ask."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def upath(path: str | os.PathLike):
    """A user's path: ``etils.epath.Path`` for a URL, else a pathlib ``Path`` with ``~`` expanded."""
    if not is_url(path):
        return Path(path).expanduser()
    from etils import epath

    _no_listings_cache()
    text = os.fspath(path)
    scheme, rest = text.split("://", 1)
    if scheme in ("gs", "gcs") and not rest.split("/", 1)[0]:
        raise PathError(f"{text}: no bucket name (write gs://BUCKET/folder)")
    return epath.Path(text)


def absolute(path: str | os.PathLike):
    """``upath``, absolute where local (orbax needs absolute paths)."""
    p = upath(path)
    return p if is_url(p) else p.absolute()


_checked: set[str] = set()


def check_remote(path: str | os.PathLike) -> None:
    """For a gs:// path: its endpoint answers, its bucket exists and the credentials work, or one
    PathError naming the path. Once per bucket and process, before any real work: gcsfs retries a
    dead endpoint for half a minute and tensorstore for longer, each printing tracebacks."""
    text = os.fspath(path)
    if not is_url(text) or not text.startswith(("gs://", "gcs://")):
        return
    bucket = upath(text).parts[2]
    if bucket in _checked:
        return
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):  # e.g. the presets' gs://BUCKET/...
        raise PathError(f"{text}: {bucket!r} is not a bucket name (3-222 lowercase letters, digits, '-', '_', '.'): "
                        f"name your bucket, e.g. gs://my-bucket/runs/x")
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    timeout = float(os.environ.get("JAXGPT_GCS_TIMEOUT", "10"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        raise PathError(f"{text}: cannot reach Cloud Storage at {endpoint} ({e.strerror or e}; no network?)") from None
    import fsspec

    try:  # one object listing: what a role like storage.objectUser allows (a bucket's metadata may not be)
        fsspec.filesystem("gs").call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)
    except FileNotFoundError:
        raise PathError(f"{text}: no such bucket gs://{bucket}") from None
    except Exception as e:  # google.auth, aiohttp and gcsfs each raise their own types
        raise PathError(f"{text}: cannot use Cloud Storage ({type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                        f"credentials: gcloud auth application-default login, or a VM service account)") from None
    _checked.add(bucket)


def create_exclusive(path, text: str) -> bool:
    """Write ``text`` to ``path`` only if it does not exist (False if it does): ``O_EXCL`` locally,
    an ``ifGenerationMatch=0`` upload on GCS (its one atomic create); other protocols check, then write."""
    if not is_url(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    import fsspec

    fs, key = fsspec.core.url_to_fs(os.fspath(path))
    if "gs" not in fs.protocol:
        if fs.exists(key):
            return False
        fs.pipe_file(key, text.encode())
        return True
    try:
        fs.pipe_file(key, text.encode(), mode="create")
    except FileExistsError:  # gcsfs' name for 412 Precondition Failed: the object exists
        return False
    return True


def file_size(path) -> int:
    """A file's size in bytes, local or in a bucket (epath's stat names it ``length``)."""
    st = path.stat()
    return st.st_size if hasattr(st, "st_size") else st.length


class Appender:
    """A file written by appending (metrics.jsonl, checkpoint.log, TensorBoard's event files).
    Locally an ordinary append. An object store has no append: the whole object is rewritten at
    ``flush``, at most every ``interval`` seconds unless forced, and on ``close`` (a killed run loses
    at most the last ``interval`` seconds of it; a resumed run logs its steps again)."""

    def __init__(self, path, interval: float = 30.0, keep: bool = True):
        self.path, self.interval = upath(path), interval
        self.remote = is_url(self.path)
        self.last, self.dirty = 0.0, False
        if not self.remote:
            self.file = open(self.path, "ab" if keep else "wb")
            return
        self.data = bytearray(self.path.read_bytes() if keep and self.path.exists() else b"")

    def write(self, chunk) -> None:
        chunk = chunk if isinstance(chunk, bytes) else chunk.encode("utf-8")
        if self.remote:
            self.data += chunk
            self.dirty = True
        else:
            self.file.write(chunk)

    def flush(self, force: bool = False) -> None:
        if not self.remote:
            self.file.flush()
            return
        import time

        if self.dirty and (force or time.monotonic() - self.last >= self.interval):
            self.path.write_bytes(bytes(self.data))
            self.last, self.dirty = time.monotonic(), False

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self.file.close()


def append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` once (a log line); an object is read and rewritten."""
    f = Appender(path)
    f.write(text)
    f.close()


def cache_folder() -> Path:
    """Where folders in buckets are copied for the libraries that read local files only (transformers'
    tokenizers): ``$JAXGPT_CACHE``, else ``~/.cache/jaxgpt``."""
    return Path(os.environ.get("JAXGPT_CACHE") or Path.home() / ".cache" / "jaxgpt")


def descendants(folder) -> list:
    """Everything under ``folder``, folders included (``rglob("*")``, which epath refuses on GCS)."""
    if not is_url(folder):
        return list(upath(folder).rglob("*"))
    import fsspec

    text = os.fspath(upath(folder))
    fs, key = fsspec.core.url_to_fs(text)
    scheme = text.split("://", 1)[0]
    return [upath(f"{scheme}://{k}") for k in fs.find(key, withdirs=True) if k.rstrip("/") != key.rstrip("/")]


def local_copy(url: str | os.PathLike) -> Path:
    """A folder in a bucket (an HF model folder: config, weights, tokenizer), copied into
    ``cache_folder()/remote/<protocol>/<bucket>/<folder>``; files already there at the same size are
    kept. Weights are read from local files (safetensors maps them) like a hub id's snapshot."""
    src = upath(url)
    check_remote(src)
    if not src.is_dir():
        raise WeightsError(f"{url}: no such folder")
    scheme, rest = os.fspath(src).split("://", 1)
    dst = cache_folder() / "remote" / scheme / rest.strip("/")
    for f in descendants(src):
        if f.is_dir():
            continue
        target = dst / os.fspath(f)[len(os.fspath(src)):].lstrip("/")
        if target.is_file() and target.stat().st_size == file_size(f):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(f.read_bytes())
        tmp.replace(target)
    return dst


def upload_folder(local: Path, url: str | os.PathLike) -> None:
    """Copy a local folder's files into a bucket folder (export's --out gs://...)."""
    dst = upath(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            (dst / str(f.relative_to(local))).parent.mkdir(parents=True, exist_ok=True)
            (dst / str(f.relative_to(local))).write_bytes(f.read_bytes())
