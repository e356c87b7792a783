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

Preemption: ``PreemptionGuard`` turns SIGTERM into a flag the loop checks once
per step; on several processes it uses JAX's preemption sync point instead, so
every host stops at the same step. See docs/checkpoints.md.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.model import GPT2Config, abstract_model
from jaxgpt.paths import absolute, append_text, create_exclusive, is_url, upath

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


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where a training run keeps its checkpoints."""
    return upath(output_dir) / CHECKPOINT_SUBDIR


# ----------------------------------------------------------------------------- pytree helpers

def _is_nnx_state(tree) -> bool:
    return isinstance(tree, nnx.State)


def _to_pure(params):
    """nnx.State of Params -> plain nested dict of arrays (what goes on disk)."""
    return nnx.to_pure_dict(params) if _is_nnx_state(params) else params


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


# ----------------------------------------------------------------------------- the run folder

LOCK_FILE = "train.lock"


class RunLock:
    """One training at a time writes a run folder: ``<folder>/train.lock`` names the holder's host and pid.

    A lock whose holder is gone (a dead pid on this host: SIGKILL, OOM, a reboot) is taken over with a
    warning; one from another host is not (its pid cannot be checked from here). With several
    processes only process 0 takes the lock, and every process learns whether it did.

    In a bucket (gs://) the lock is an object created with GCS's one atomic create (an upload on
    condition that no such object exists). Its pid cannot be checked from another host, and a TPU VM
    that comes back after a preemption is a new host: so the holder rewrites it every
    ``HEARTBEAT_S`` seconds, and a lock not rewritten for ``STALE_S`` is taken over with a warning.
    """

    HEARTBEAT_S, STALE_S = 60.0, 600.0

    def __init__(self, folder: str | os.PathLike):
        self.folder = upath(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False
        self._beat: threading.Event | None = None

    def __enter__(self):
        error = self._acquire() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if failed and error is None:
                error = CheckpointError(f"{self.folder}: process 0 could not lock the run folder (see its output)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc):
        if self._beat is not None:
            self._beat.set()
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        return False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _acquire(self) -> CheckpointError | None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return CheckpointError(f"{self.folder}: cannot create the run folder ({e.strerror or e})")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "beat": time.time()}
        for _ in range(2):
            try:
                created = create_exclusive(self.path, json.dumps(me))
            except OSError as e:  # a read-only folder: one line, before anything is built
                return CheckpointError(f"{self.folder}: the run folder is not writable ({e.strerror or e})")
            if not created:
                holder = self._holder()
                stale = (is_url(self.path) and holder is not None
                         and time.time() - float(holder.get("beat") or 0) > self.STALE_S)
                if not stale and (holder is None or holder.get("host") != me["host"] or _alive(holder.get("pid"))):
                    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
                           if holder else "unreadable lock")
                    gone = "" if holder and holder.get("host") == me["host"] else (
                        f"; if no training runs there any more, remove {self.path}")
                    return CheckpointError(f"{self.folder} is in use by another training ({who}): wait for it to "
                                           f"finish, or set train.output_dir to another folder{gone}")
                log.warning("taking over %s: its training (pid %s, since %s) is no longer running%s",
                            self.path, holder.get("pid"), holder.get("since"),
                            f" (no heartbeat for {self.STALE_S:.0f} s)" if stale else "")
                self.path.unlink(missing_ok=True)
                continue
            self.held = True
            if is_url(self.path):
                self._beat = threading.Event()
                threading.Thread(target=self._heartbeat, args=(me,), daemon=True, name="jaxgpt-lock").start()
            return None
        return CheckpointError(f"{self.folder}: another training took {self.path} meanwhile")


    def _heartbeat(self, me: dict):
        while not self._beat.wait(self.HEARTBEAT_S):
            try:
                self.path.write_text(json.dumps({**me, "beat": time.time()}))
            except Exception as e:  # a missed beat is retried; only a long outage lets another run take over
                log.warning("cannot refresh %s: %s", self.path, e)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def set_aside_steps(root: Path) -> list[str]:
    """The step folders an earlier restore set aside as incomplete or corrupt (``<step>.corrupt-<time>``)."""
    return sorted(p.name for p in root.iterdir() if CORRUPT_SUFFIX in p.name) if root.is_dir() else []


# ----------------------------------------------------------------------------- preemption

class PreemptionGuard:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C) so the loop can finish its step, save and exit.

    A second SIGINT raises ``KeyboardInterrupt`` at once: an async save in flight is then never
    committed (orbax renames a step into place only when complete), so the last committed step stays.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                ...train step...
                stop = guard.should_stop(step)
                ckpt.save(step, ..., force=stop or step == last)
                if stop:
                    break
        ckpt.close()   # waits for the async save to commit

    With several processes (``jax.process_count() > 1``) SIGTERM usually reaches
    hosts at different steps; JAX's preemption service (started by
    ``jax.distributed.initialize``, which installs its own SIGTERM notifier) picks
    one step for all of them, read with
    ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``.
    The guard then leaves SIGTERM to JAX and asks that sync point; it must be
    called at every step on every process. Orbax's ``PreemptionCheckpointingPolicy``
    (in ``Checkpointer``) asks the same sync point again for the same step; JAX
    records the step and compares it with the agreed one, so both get the same
    answer (``tests/test_checkpoint.py``, two processes).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous = {}
        self._multihost = False
        self._last: tuple[int, bool] | None = None

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:  # Ctrl-C again: the user means now
            self.__exit__()
            raise KeyboardInterrupt
        # Only set a flag: the step in flight (and any async save) finishes normally.
        self.received = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint after the current step, then exiting (Ctrl-C again stops at once)")
        else:
            log.warning("received %s: will save a checkpoint after the current step and exit",
                        signal.Signals(signum).name)

    def __enter__(self):
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    @property
    def requested(self) -> bool:
        return self.received is not None

    def should_stop(self, step: int) -> bool:
        """True when the loop should save now and exit (same answer on every process)."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]  # the sync point must be asked once per step
        if self._multihost:
            from jax.experimental import multihost_utils
            try:
                stop = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
                stop = False
        else:
            stop = self.requested
        self._last = (step, stop)
        return stop


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
            step, self._pending_step = self._pending_step, None
            raise self._save_error(step, e) from e

    def wait(self):
        """Block until the last save has committed (or raise its error)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            step, self._pending_step = self._pending_step, None
            raise self._save_error(step, e) from e
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
        if _is_nnx_state(abstract_params):
            target = jax.tree.map(lambda x: x, abstract_params)  # a copy; the caller's stays abstract
            nnx.replace_by_pure_dict(target, params)
            params = target
        return dict(step=step, params=params, opt_state=out["opt_state"] if abstract_opt_state is not None else None,
                    data_state=state["data_state"], rng=_rng_from_json(state["rng"]), config=out["config"])

    def restore_tokenizer(self, step: int):
        """The tokenizer saved with ``step`` (None if it was saved without one)."""
        return _read_tokenizer(self.step_dir(step))


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


class NonFiniteError(CheckpointError):
    """The parameters hold NaN or infinity: unusable, and never silently replaced by another step."""


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


# ----------------------------------------------------------------------------- inference

def saved_steps(root: Path) -> list[int]:
    """The step folders under a checkpoint root, ascending, read from the folder names alone (orbax
    names a committed step by its number; a save in progress or a set-aside step has a suffix). In a
    bucket orbax writes a step under its number and commits it with ``commit_success.txt``."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(int(p.name) for p in steps if not is_url(root) or (p / "commit_success.txt").exists())


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """(step dirs to try, newest first; whether ``path`` named one step) for an output_dir, root or step dir."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (training output_dir or a step dir), got a file")
    if (path / "params").is_dir() or (path / STEP_METADATA_FILE).exists():
        return [path], True
    root = path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path
    steps = saved_steps(root)[::-1]
    if not steps:
        raise NoCheckpointError(f"{path}: no jaxgpt checkpoint found (looked in {root})")
    return [root / str(s) for s in steps], False


def model_config_from(config: dict, source: str) -> GPT2Config:
    """The GPT2Config saved in a run config: ``config["model_config"]`` or the first dict holding its fields."""
    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    need = {"vocab_size", "n_embd", "n_layer", "n_head"}

    def find(d):
        if isinstance(d, dict):
            if need <= d.keys():
                return d
            for v in d.values():
                found = find(v)
                if found is not None:
                    return found
        return None

    raw = config.get("model_config") if isinstance(config.get("model_config"), dict) else find(config)
    if raw is None:
        raise CheckpointError(f"{source}: the saved config holds no GPT-2 model config (a dict with {sorted(need)})")
    try:
        return GPT2Config(**{k: v for k, v in raw.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad model config: {e}") from None


def _read_tokenizer(step_dir: Path):
    tok_dir = step_dir / "tokenizer"
    if not tok_dir.is_dir():
        return None
    try:
        item = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(tok_dir, args=ocp.args.JsonRestore())
        return _tokenizer_from_files(item, str(step_dir))
    except Exception as e:  # orbax, json and transformers each raise their own types
        raise CheckpointError(f"{tok_dir}: cannot read the saved tokenizer: {_short(e)}") from None


def load_for_inference(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None):
    """(GPT2, tokenizer) from a training output_dir (latest complete step) or a step dir.

    Restores the parameters only (no optimizer state) onto one device, cast to
    ``param_dtype`` (default: ``dtype``); dropout off, remat, attention and kernels
    "auto" (whatever this device and dtype run; training may have used cuDNN's). For an
    output_dir, an incomplete or corrupt latest step is reported and the
    previous one used.
    """
    step_dirs, explicit = _candidates(absolute(path))  # orbax needs absolute paths
    for step_dir in step_dirs:
        try:
            return _load_step(step_dir, dtype, param_dtype or dtype)
        except NonFiniteError:
            raise  # readable, but garbage: an older step is the user's choice to make, by naming it
        except CheckpointError as e:
            if explicit:
                raise
            log.warning("checkpoint is incomplete or corrupt: %s; using the previous one", e)
    raise CheckpointError(f"{path}: no complete jaxgpt checkpoint found (every step is incomplete or corrupt)")


def _load_step(step_dir: Path, dtype: str, param_dtype: str):
    _quiet_closed_event_loop()
    missing = [n for n in (STEP_METADATA_FILE, "params", "config") if not (step_dir / n).exists()]
    if missing:
        raise CheckpointError(f"{step_dir}: incomplete checkpoint (missing {', '.join(missing)})")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))
    try:
        config = ckptr.restore(step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read the saved config: {_short(e)}") from None
    cfg = model_config_from(config, str(step_dir / "config"))
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, dropout=0.0, remat="auto", attention="auto", kernels="auto")
    # The rest (dropout RNG streams) as a fresh init makes it; the parameters as shapes, to restore into.
    if (config.get("lora") or {}).get("rank"):  # a LoRA run saved its adapter: restored onto its base
        from jaxgpt.lora import restore_target

        graphdef, abs_params, rest = nnx.split(restore_target(config, cfg, str(step_dir)), nnx.Param, ...)
    else:
        graphdef, abs_params, rest = abstract_model(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.to_pure_dict(abs_params))
    try:
        meta = ckptr.metadata(step_dir).item_metadata["params"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read parameter metadata: {_short(e)}") from None
    _check_fits(step_dir / "params", abs_pure, meta)
    try:
        pure = ckptr.restore(step_dir, args=ocp.args.Composite(params=ocp.args.StandardRestore(abs_pure)))["params"]
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read parameters (corrupt?): {_short(e)}") from None
    bad = nonfinite_tensor(pure)
    if bad is not None:
        older = [s for s in saved_steps(step_dir.parent) if s < int(step_dir.name)] if step_dir.name.isdigit() else []
        raise NonFiniteError(f"{step_dir}: parameter {bad} holds NaN or infinity; this checkpoint is unusable"
                             + (f" (earlier steps: {', '.join(map(str, older))}; name one, e.g. "
                                f"{step_dir.parent / str(older[-1])})" if older else ""))
    nnx.replace_by_pure_dict(abs_params, pure)
    model = nnx.merge(graphdef, abs_params, rest)
    tokenizer = _read_tokenizer(step_dir)
    if tokenizer is None:
        from jaxgpt.tokenizer import load_tokenizer
        log.warning("%s has no tokenizer; using the vendored GPT-2 tokenizer", step_dir)
        tokenizer = load_tokenizer()
    return model, tokenizer
