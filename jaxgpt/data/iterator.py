"""Deterministic, resumable batches of packed rows for each process."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from jaxgpt.config import DataError
from jaxgpt.data.build import StreamCursor, StreamingDataset
from jaxgpt.data.pack import PackedDataset, make_batch


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
        self._stream = StreamCursor(dataset, seed, shuffle) if isinstance(dataset, StreamingDataset) else None
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
        return make_batch(rows, self.dataset.seq_len, self.dataset.pad_id)

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
