"""One training at a time per run folder: ``<folder>/train.lock`` names the holder's host and pid."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import jax
import numpy as np

from jaxgpt.checkpoint import CheckpointError
from jaxgpt.paths import create_exclusive, is_url, upath

log = logging.getLogger("jaxgpt.checkpoint")

LOCK_FILE = "train.lock"


class RunLock:
    """The run folder's lock, held while a training writes it.

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
