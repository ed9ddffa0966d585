"""Each rank's micro-batches, built by that rank alone and ahead of time.

Global batch i is positions [0, G) of the epoch's shuffled order, from i's place in its epoch on
(one permutation per epoch, computed once). Rank r's micro-step j takes positions
[(r*A + j)*m, (r*A + j + 1)*m) for A accumulation steps of m rows, so a rank fetches, collates
and noises only its own rows. The noise of a row is a pure function of (seed, step, position in
the global batch) (`tide_ds.diffusion.RowStreams`), so any split of one global batch over ranks
and accumulation steps sees the same rows with the same noise, and a resumed run continues with
exactly the data and noise of an uninterrupted one. With `targets` (a `tide-ds teach` directory's
reader) each micro-batch also gets the teacher's stored outputs for its (step, positions) rows.

`Prefetch` runs the building on a background thread, a bounded queue ahead of the loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tide_ds.config import ConfigError
from tide_ds.diffusion.noise import RowStreams, mix_seed
from tide_ds.tree import map_tensors


def batches_per_epoch(rows: int, global_batch: int) -> int:
    if rows < global_batch:
        raise ConfigError(
            f"the global batch ({global_batch}) is larger than the training set ({rows} rows); "
            f"lower train.micro_batch_size or train.gradient_accumulation_steps, or add data"
        )
    return rows // global_batch


class RankBatches:
    """This rank's noised micro-batches (CPU tensors), in order, from a given step on."""

    def __init__(
        self,
        dataset,
        collate: Callable[[list], dict],
        noise: Callable[..., Any],
        *,
        global_batch: int,
        micro_batch: int,
        accumulation: int,
        rank: int,
        seed: int,
        targets: Callable[[int, range, Any], Any] | None = None,
    ):
        self.per_epoch = batches_per_epoch(len(dataset), global_batch)
        self.dataset, self.collate, self.noise = dataset, collate, noise
        self.global_batch, self.micro, self.accum, self.rank, self.seed = (
            global_batch,
            micro_batch,
            accumulation,
            rank,
            seed,
        )
        self.targets = targets  # (step, positions, noised) -> noised with stored teacher targets
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's shuffled row order (computed once per epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=g)
        return self._order

    def positions(self, j: int) -> range:
        """Positions in the global batch of this rank's micro-step j."""
        first = (self.rank * self.accum + j) * self.micro
        return range(first, first + self.micro)

    def rows(self, step: int, j: int) -> list[int]:
        """Dataset indices of this rank's micro-step j of optimizer step `step`."""
        epoch, k = divmod(step, self.per_epoch)
        order = self.order(epoch)
        return [int(order[k * self.global_batch + p]) for p in self.positions(j)]

    def build(self, step: int, j: int):
        batch = self.collate([self.dataset[i] for i in self.rows(step, j)])
        streams = RowStreams([mix_seed(self.seed, step, p) for p in self.positions(j)])
        noised = self.noise(batch, generator=streams)
        return noised if self.targets is None else self.targets(step, self.positions(j), noised)

    def iterate(self, first: int, last: int) -> Iterator:
        """Micro-batches of steps [first, last), accumulation steps in order."""
        for step in range(first, last):
            for j in range(self.accum):
                yield self.build(step, j)


class Prefetch:
    """Iterates `items` on a background thread, up to `depth` items ahead (pinned for a fast copy
    to the GPU when `pin`). An exception there is raised here, at the item it stopped."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2, pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pin = pin
        self._thread = threading.Thread(target=self._run, args=(items,), name="tide-ds-data", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if self._pin:
                    item = map_tensors(item, lambda t: t.pin_memory())
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)  # a daemon: never waited for longer
