"""Preemption and Ctrl-C: finish the step, save a checkpoint, exit (the same step on every host)."""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("jaxgpt.checkpoint")


class PreemptionGuard:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C) so the loop can finish its step, save and exit.

    A second SIGINT raises ``KeyboardInterrupt`` at once: an async save in flight is then never
    committed (orbax renames a step into place only when complete), so the last committed step stays.

    The loop asks ``should_stop(step)`` after every step and saves with ``force=True`` when it says
    so (docs/checkpoints.md).

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
