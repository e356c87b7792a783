"""Training checkpoints on orbax: save, resume exactly, restore on any mesh, load for inference.

One ``orbax.checkpoint.CheckpointManager`` does the work: asynchronous saves
every ``save_every`` steps (and whenever the loop forces one), the last ``keep``
kept, and an atomic commit (a step is written under a temporary name and
renamed when complete, or marked with ``commit_success.txt`` on GCS), so an
interrupted save never replaces the previous checkpoint and older steps are
only deleted after a newer one is committed.

Layout of ``<directory>/<step>/`` (one orbax item per sub-folder)::

    params/      StandardSave: the model parameters as a pure dict of arrays
                 ({"h": {0: {"attn": {"c_attn": {"kernel": ...}}}}, "wte": ...}),
                 i.e. ``nnx.to_pure_dict`` of the nnx.Param state
    opt_state/   StandardSave: the optax state pytree, as the loop holds it
    state/       JSON: {"step", "data_state", "rng": {"data", "shape", "impl"}}
    config/      JSON: the full run config (incl. the GPT2Config fields)
    tokenizer/   JSON: {"files": {name: text}} from ``tokenizer.save_pretrained``
    _CHECKPOINT_METADATA, commit_success.txt   (orbax's own)

Arrays are restored onto the shardings of the abstract targets the caller
passes (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves), so a
checkpoint written on one mesh restores onto any other.

A step that is incomplete or corrupt (missing items, unreadable files) is
reported with a warning naming its folder, moved aside to ``<step>.corrupt-<time>``
(never deleted) and the previous step is used.

The run folder's lock is ``jaxgpt.runlock``, preemption ``jaxgpt.preemption``, and loading a
step for inference ``jaxgpt.loader``. See docs/checkpoints.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.paths import absolute, append_text, is_url, upath

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"  # checkpoints live in <train.output_dir>/checkpoints
ITEMS = ("params", "opt_state", "state", "config", "tokenizer")
REQUIRED_ITEMS = ("params", "opt_state", "state", "config")
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax writes it last inside the step folder
CORRUPT_SUFFIX = ".corrupt-"  # <step>.corrupt-<time>: a step set aside, never deleted


def _registry():
    """Which orbax handler reads/writes each item (also lets metadata be read without restoring)."""
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in ITEMS:
        pair = (ocp.args.StandardSave, ocp.args.StandardRestore) if name in ("params", "opt_state") \
            else (ocp.args.JsonSave, ocp.args.JsonRestore)
        for args in pair:
            reg.add(name, args)
    return reg


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the folder."""


class NoCheckpointError(CheckpointError):
    """A folder with no checkpoint step in it (jaxgpt.loader says whether it is an HF folder instead)."""


class NonFiniteError(CheckpointError):
    """The parameters hold NaN or infinity: unusable, and never silently replaced by another step."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where a training run keeps its checkpoints."""
    return upath(output_dir) / CHECKPOINT_SUBDIR


# ----------------------------------------------------------------------------- pytree helpers

def _to_pure(params):
    """nnx.State of Params -> plain nested dict of arrays (what goes on disk)."""
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def abstract_like(tree):
    """ShapeDtypeStruct leaves (with their shardings) for a tree of arrays or ShapeDtypeStructs."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


def _rng_to_json(rng) -> dict:
    impl = None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        rng = jax.random.key_data(rng)
    if isinstance(rng, jax.Array) and not rng.is_fully_addressable:
        rng = rng.addressable_data(0)  # the RNG is replicated: every process holds all of it
    data = np.asarray(jax.device_get(rng))
    if data.dtype != np.uint32:
        raise CheckpointError(f"rng must be a jax key or its uint32 key data, got dtype {data.dtype}")
    return {"data": data.reshape(-1).tolist(), "shape": list(data.shape), "impl": impl}


def _rng_from_json(d: dict) -> np.ndarray:
    return np.asarray(d["data"], dtype=np.uint32).reshape(d["shape"])


def _same_on_all_processes(value) -> bool:
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:8]
    every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint32)))
    return bool((every == every[0]).all())


def _tokenizer_files(tokenizer) -> dict:
    """The files of ``tokenizer.save_pretrained`` as JSON: text as is, anything else base64."""
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                raw = p.read_bytes()
                name = str(p.relative_to(tmp))
                try:
                    files[name] = {"text": raw.decode("utf-8")}
                except UnicodeDecodeError:
                    files[name] = {"base64": base64.b64encode(raw).decode("ascii")}
    return {"files": files}


def _tokenizer_from_files(item: dict, source: str):
    from jaxgpt.tokenizer import from_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in item["files"].items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if "text" in content:
                path.write_text(content["text"], encoding="utf-8")
            else:
                path.write_bytes(base64.b64decode(content["base64"]))
        tok = from_pretrained(tmp)  # reads everything now; tmp may go
    tok.name_or_path = source
    return tok


def _json_roundtrip(value, what: str):
    # A private copy (the loop may mutate its dict while the async save runs),
    # and an early, clear error for anything JSON cannot hold.
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must be JSON-serialisable: {e}") from None


# ----------------------------------------------------------------------------- Checkpointer

class Checkpointer:
    """Save / restore the full train state with orbax's CheckpointManager.

    ``save`` is called every step by the loop; it writes only every
    ``save_every`` steps (or when ``force``), asynchronously when ``async_save``:
    the arrays are copied to host memory before ``save`` returns, so the next
    (donating) train step may proceed, and the files are written and committed
    in the background. Errors of a background save surface at the next
    ``save`` / ``wait`` / ``close`` as a ``CheckpointError``.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, log_file: str | os.PathLike | None = None):
        if save_every < 1:
            raise CheckpointError(f"checkpoint.save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = absolute(directory)
        self.save_every, self.keep, self.read_only = save_every, keep, read_only
        # Where a corrupt step's full error (tensorstore's specs, the traceback) goes; the log says one line.
        self.log_file = None if log_file is None else absolute(log_file)
        self._pending_step: int | None = None
        self._tok_cache: tuple[int, dict] | None = None
        if not read_only:
            self._check_writable()
        elif not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Save every N steps, plus at JAX's multi-host preemption sync point;
            # orbax's default would also save the very first step.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]),
            # Old steps are deleted by orbax only after the new one has committed.
            preservation_policy=policies.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of killed saves
        )
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())
        except OSError as e:
            raise CheckpointError(f"{self.directory}: cannot open checkpoint directory: {e}") from None

    def _check_writable(self):
        # Fail before training starts rather than at the first save, minutes later.
        if jax.process_index() != 0:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"{self.directory}: checkpoint directory is not writable ({e.strerror or e})") from None

    # -- queries
    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(step)

    # -- save
    def save(self, step: int, *, params, opt_state, data_state: dict, rng, config: dict, tokenizer=None,
             force: bool = False) -> bool:
        """Save the train state after ``step`` optimizer updates; True if a save started.

        ``data_state`` must be the iterator state *after* the batches of
        ``step`` were drawn and ``rng`` the key the next step will use, so that
        resuming from ``step`` continues exactly where this run would have.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only, cannot save")
        self._raise_background_error()
        if not force and not self._mngr.should_save(step):
            latest = self._mngr.latest_step()
            if latest is not None and step <= latest and step % self.save_every == 0:
                self._warn_stale(step, latest)
            return False
        if step in self._mngr.all_steps():
            return False  # already saved (e.g. the final step was also a save_every step)
        latest = self._mngr.latest_step()
        if latest is not None and step < latest:
            self._warn_stale(step, latest)
            return False
        if tokenizer is None:
            log.warning("checkpoint step %d is saved without a tokenizer", step)
        state = {"step": int(step), "data_state": _json_roundtrip(data_state, "data_state"), "rng": _rng_to_json(rng)}
        if not _same_on_all_processes(state):
            # JSON items are written by process 0 only; a per-process iterator state would be lost.
            raise CheckpointError(f"{self.step_dir(step)}: data_state/rng differ between processes; a checkpoint "
                                  f"keeps one copy, so the data iterator state must be global")
        items = dict(
            params=ocp.args.StandardSave(_to_pure(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            state=ocp.args.JsonSave(state),
            config=ocp.args.JsonSave(_json_roundtrip(config, "config")),
        )
        if tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(self._tokenizer_item(tokenizer))
        try:
            saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # orbax/tensorstore raise OSError, ValueError, RuntimeError...
            raise self._save_error(step, e) from e
        if saved:
            self._pending_step = step
        return saved

    def _warn_stale(self, step: int, latest: int):
        # orbax only saves steps after its latest one: say so instead of silently skipping.
        log.warning("checkpoint step %d not saved: %s already holds step %d (a new run in a used "
                    "output_dir without resuming?)", step, self.directory, latest)

    def _tokenizer_item(self, tokenizer) -> dict:
        if self._tok_cache is None or self._tok_cache[0] != id(tokenizer):
            self._tok_cache = (id(tokenizer), _tokenizer_files(tokenizer))
        return self._tok_cache[1]

    def _save_error(self, step, e) -> CheckpointError:
        kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()) if self.directory.is_dir() else []
        return CheckpointError(
            f"{self.step_dir(step)}: saving checkpoint failed ({_short(e)}); "
            f"earlier checkpoints are kept: {kept or 'none'}")

    def _raise_background_error(self):
        try:
            self._mngr.check_for_errors()
            if not self._mngr.is_saving_in_progress():
                self._mngr.wait_until_finished()  # re-raises a failed finalize
        except Exception as e:
            raise self._failed(e) from e

    def _failed(self, e) -> CheckpointError:
        step, self._pending_step = self._pending_step, None
        return self._save_error(step, e)

    def wait(self):
        """Block until the last save has committed (or raise its error)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        self._pending_step = None

    def close(self):
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- restore
    def restore(self, *, abstract_params, abstract_opt_state, step: int | None = None) -> dict:
        """The train state of ``step`` (default: the latest complete checkpoint).

        ``abstract_params`` / ``abstract_opt_state``: trees of
        ``jax.ShapeDtypeStruct`` (or arrays) whose shardings say where each
        restored array goes. ``params`` come back in the same form as
        ``abstract_params`` (nnx.State or pure dict). ``abstract_opt_state=None``
        skips the optimizer state. Returns dict(step, params, opt_state,
        data_state, rng, config); ``rng`` is uint32 key data (numpy).
        """
        if step is not None:
            try:
                return self._restore_step(step, abstract_params, abstract_opt_state)
            except _Corrupt as e:
                raise CheckpointError(f"{self.step_dir(step)}: checkpoint is incomplete or corrupt: {e}") from None
        self._mngr.reload()  # the folder may have changed since this manager listed it
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        for i, s in enumerate(steps):
            problem, error = self._incomplete(s), None
            if problem is None:
                try:
                    return self._restore_step(s, abstract_params, abstract_opt_state)
                except _Corrupt as e:
                    problem, error = str(e), e.__cause__ or e
            moved = self._set_aside(s)
            self._write_details(s, problem, error)
            log.warning("checkpoint %s is incomplete or corrupt (%s); %s; %s%s", self.step_dir(s), problem[:200],
                        f"set aside as {moved.name}" if moved else "left in place",
                        f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier step",
                        f" (details in {self.log_file})" if self.log_file else "")
        raise CheckpointError(f"{self.directory}: every checkpoint is incomplete or corrupt (steps {steps})")

    def _write_details(self, step: int, problem: str, error: BaseException | None):
        if self.log_file is None or jax.process_index() != 0:
            return
        lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S')} checkpoint {self.step_dir(step)} is incomplete or corrupt: "
                 f"{problem}"]
        if error is not None:  # the whole error, tensorstore's spec included
            lines += traceback.format_exception(type(error), error, error.__traceback__)
        try:
            append_text(self.log_file, "\n".join(line.rstrip("\n") for line in lines) + "\n\n")
        except OSError as e:
            log.warning("cannot write %s: %s", self.log_file, e.strerror or e)

    def _incomplete(self, step: int) -> str | None:
        d = self.step_dir(step)
        missing = [name for name in (STEP_METADATA_FILE, *REQUIRED_ITEMS) if not (d / name).exists()]
        return f"missing {', '.join(missing)}" if missing else None

    def _set_aside(self, step: int) -> Path | None:
        # Out of orbax's listing (so later saves at these step numbers work and
        # keep-K does not count it), but never deleted: it may be inspected.
        if self.read_only:
            return None
        src = self.step_dir(step)
        dst = src.with_name(f"{src.name}{CORRUPT_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxgpt_checkpoint_set_aside_{step}")
        self._mngr.reload()
        return dst

    def _restore_step(self, step, abstract_params, abstract_opt_state) -> dict:
        _quiet_closed_event_loop()
        d = self.step_dir(step)
        if not d.is_dir():
            raise CheckpointError(f"{d}: no such checkpoint step (have {self._mngr.all_steps()})")
        abs_pure = abstract_like(_to_pure(abstract_params))
        # A target that does not fit the saved tree is the caller's mistake (a
        # changed model config), not a corrupt checkpoint: say so, fall back never.
        try:
            meta = self._mngr.item_metadata(step)
        except Exception as e:
            raise _Corrupt(f"cannot read metadata: {_short(e)}") from e
        _check_fits(d / "params", abs_pure, meta["params"], warn_dtypes=True)
        if abstract_opt_state is not None:
            _check_fits(d / "opt_state", abstract_like(abstract_opt_state), meta["opt_state"], warn_dtypes=True)
        items = dict(params=ocp.args.StandardRestore(abs_pure), state=ocp.args.JsonRestore(),
                     config=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_like(abstract_opt_state))
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise _Corrupt(_short(e)) from e
        state = out["state"]
        if state is None or out["config"] is None or state.get("step") != step:
            raise _Corrupt("the state/config items are missing or name another step")
        params = out["params"]
        if isinstance(abstract_params, nnx.State):
            target = jax.tree.map(lambda x: x, abstract_params)  # a copy; the caller's stays abstract
            nnx.replace_by_pure_dict(target, params)
            params = target
        return dict(step=step, params=params, opt_state=out["opt_state"] if abstract_opt_state is not None else None,
                    data_state=state["data_state"], rng=_rng_from_json(state["rng"]), config=out["config"])

    def restore_tokenizer(self, step: int):
        """The tokenizer saved with ``step`` (None if it was saved without one)."""
        return read_tokenizer(self.step_dir(step))


class _Corrupt(Exception):
    """Reading a checkpoint step failed: treated as incomplete/corrupt."""


def _quiet_closed_event_loop():
    """Before reading a step. After a failed read, tensorstore's reads still in flight finish into
    orbax's event loop, closed by then; each prints an "Event loop is closed" traceback (dozens per
    step, some while the read still fails, the rest as they are collected). They say nothing the
    error does not: drop them, and leave every other unraisable to the hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxgpt_quiet", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            log.debug("after a failed checkpoint read: %s", u.exc_value)
        else:
            previous(u)

    hook._jaxgpt_quiet = True
    sys.unraisablehook = hook


def _short(e: BaseException) -> str:
    """``Type: message`` without tensorstore's multi-kilobyte spec dump."""
    msg = str(e).split(" [tensorstore_spec=")[0].strip()
    return f"{type(e).__name__}: {msg[:500]}"


def _flat_names(tree) -> dict[str, Any]:
    """{"0.mu.h.0.attn.c_attn.kernel.value": leaf}: orbax's own naming of tree paths."""
    def name(entry):
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)
    return {".".join(name(e) for e in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nonfinite_tensor(params) -> str | None:
    """The name of the first parameter holding NaN or infinity (``h.0.attn.c_attn.kernel``), or None.

    One jitted reduction per tensor, read back once: works on sharded arrays (every process takes part)."""
    names = list(_flat_names(_to_pure(params)))
    leaves = jax.tree.leaves(_to_pure(params))
    if not leaves:
        return None
    finite = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))(leaves)
    finite = np.asarray(finite.addressable_data(0))  # replicated: every process holds the whole flag vector
    bad = np.flatnonzero(~finite)
    return names[int(bad[0])] if bad.size else None


# Parameter names from before the projections were Linear modules (h.0.attn.c_attn_kernel).
_OLD_PARAM_NAME = re.compile(r"\b(c_attn|c_proj|c_fc)_(kernel|bias)\b")


def _check_fits(item_dir: Path, abstract, metadata, *, warn_dtypes: bool = False):
    """Refuse a target whose tree or shapes differ from the saved ones; ``warn_dtypes``: say when
    orbax will cast (a resume after ``model.param_dtype`` changed)."""
    saved, want = _flat_names(metadata), _flat_names(abstract)
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    renamed = [k for k in extra if _OLD_PARAM_NAME.search(k)]
    if renamed:  # refused, not mapped: the optimizer state would need the same renaming
        now = _OLD_PARAM_NAME.sub(r"\1.\2", renamed[0])
        raise CheckpointError(
            f"{item_dir}: {renamed[0]} is a parameter name of an earlier jaxgpt (now {now}); export that "
            f"checkpoint with the jaxgpt that wrote it (python -m jaxgpt.export) and start from the HF folder")
    if missing or extra:
        raise CheckpointError(
            f"{item_dir}: saved tree does not match the model/optimizer being restored "
            f"(not in checkpoint: {missing[:4]}, only in checkpoint: {extra[:4]}); did the config change?")
    for k, a in want.items():
        shape = tuple(getattr(saved[k], "shape", ()) or ())
        if shape != tuple(a.shape):
            raise CheckpointError(f"{item_dir}: {k} has shape {shape} in the checkpoint but {tuple(a.shape)} "
                                  f"in the model being restored; did the config change?")
    if not warn_dtypes:
        return
    cast = [(k, saved[k].dtype, a.dtype) for k, a in want.items()
            if getattr(saved[k], "dtype", None) is not None and np.dtype(saved[k].dtype) != np.dtype(a.dtype)]
    if cast:
        k, old, new = cast[0]
        log.warning("%s: %d arrays are cast on restore, e.g. %s from %s to %s (model.param_dtype changed "
                    "since the checkpoint was saved?)", item_dir, len(cast), k, np.dtype(old), np.dtype(new))


# ----------------------------------------------------------------------------- reading a step without a manager

def saved_steps(root: Path) -> list[int]:
    """The step folders under a checkpoint root, ascending, read from the folder names alone (orbax
    names a committed step by its number; a save in progress or a set-aside step has a suffix). In a
    bucket orbax writes a step under its number and commits it with ``commit_success.txt``."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(int(p.name) for p in steps if not is_url(root) or (p / "commit_success.txt").exists())


def set_aside_steps(root: Path) -> list[str]:
    """The step folders an earlier restore set aside as incomplete or corrupt (``<step>.corrupt-<time>``)."""
    return sorted(p.name for p in root.iterdir() if CORRUPT_SUFFIX in p.name) if root.is_dir() else []


def read_tokenizer(step_dir: Path):
    """The tokenizer saved with a step, or None if it was saved without one."""
    tok_dir = step_dir / "tokenizer"
    if not tok_dir.is_dir():
        return None
    try:
        item = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(tok_dir, args=ocp.args.JsonRestore())
        return _tokenizer_from_files(item, str(step_dir))
    except Exception as e:  # orbax, json and transformers each raise their own types
        raise CheckpointError(f"{tok_dir}: cannot read the saved tokenizer: {_short(e)}") from None


def _reader():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))


def read_config(step_dir: Path) -> dict:
    """The run config saved with a step (checking first that the step holds parameters)."""
    _quiet_closed_event_loop()
    missing = [n for n in (STEP_METADATA_FILE, "params", "config") if not (step_dir / n).exists()]
    if missing:
        raise CheckpointError(f"{step_dir}: incomplete checkpoint (missing {', '.join(missing)})")
    try:
        return _reader().restore(step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read the saved config: {_short(e)}") from None


def read_params(step_dir: Path, abstract: dict) -> dict:
    """A step's parameters as a pure dict, onto ``abstract``'s shapes, dtypes and shardings (no optimizer state)."""
    reader = _reader()
    try:
        meta = reader.metadata(step_dir).item_metadata["params"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read parameter metadata: {_short(e)}") from None
    _check_fits(step_dir / "params", abstract, meta)
    try:
        return reader.restore(step_dir, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read parameters (corrupt?): {_short(e)}") from None
