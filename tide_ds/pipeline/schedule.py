"""Schedulers: where each micro-batch's teacher call runs against the student's work.

A scheduler turns the stream of a rank's noised micro-batches (CPU tensors, noise already drawn)
into a stream of (noised, targets) on the device; the loop runs the student's forward, backward
and optimizer step on each pair. The teacher is frozen and reads only the noised batch, never
the student's weights, so its call for a later micro-batch may run at any time before it is used.

  sequential  the teacher call of micro-batch k, then the student's work on k (the reference)
  overlap     the teacher calls of micro-batches k+1 .. k+prefetch run on a worker thread while
              the student runs forward and backward on k, across gradient-accumulation and
              optimizer-step boundaries

Overlap on CUDA: the worker thread runs the teacher on its own stream (`torch.cuda.stream` is per
thread). The student's stream waits on an event recorded after the teacher call before it reads
the results, and every tensor made on the teacher's stream is marked as used by the student's
(`record_stream`), so that the caching allocator never hands its memory to the teacher's next
call while the student still reads it.

Collectives: a sharded teacher's (ZeRO-3 gathers, expert all-to-all, AutoTP all-reduce and
gathers) run on process groups of their own (`tide_ds.engine`), issued by the worker thread in
one order on every rank, the student's by the main thread in one order on every rank; but how the
two streams interleave differs between ranks. Over gloo that is safe: each group has its own
connections and a blocked call holds no other group up. Over NCCL it is not: a collective's
kernel waits on the GPU for its peers, and another communicator's kernel queued behind it on a
peer that issued them the other way round never runs (NCCL's user guide, "Using multiple NCCL
communicators concurrently"). `check_overlap` therefore refuses overlap with a sharded teacher
on NCCL before anything loads; a replicated teacher makes no collectives and overlaps anywhere.
`drain` waits for every teacher call in flight, so that a save's collectives never meet one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import torch

from tide_ds.config import ConfigError
from tide_ds.metrics import Phases
from tide_ds.tree import tensors_of, to_device

SCHEDULERS = ("sequential", "overlap")


def _no_guard(fn):
    return fn()


def check_overlap(scheduler: str, placement: str, backend: str | None) -> None:
    """Refuses, before anything loads, the one combination whose collectives could deadlock: a
    sharded teacher (its collectives on the worker thread) overlapped with the student over NCCL."""
    if scheduler == "overlap" and placement != "replicate" and "nccl" in (backend or ""):
        raise ConfigError(
            f"train.scheduler=overlap with engine.teacher_placement={placement} on NCCL: the teacher's "
            f"collectives (worker thread) and the student's (main thread) could interleave in another order "
            f"on each rank and deadlock; use train.scheduler=sequential, or engine.teacher_placement=replicate "
            f"to keep the overlap"
        )


class Sequential:
    """The teacher call of each micro-batch right before the student's work on it."""

    def __init__(self, teacher_targets: Callable, device: torch.device, phases: Phases):
        self.teacher_targets, self.device, self.phases = teacher_targets, device, phases
        self.calls = self.ahead = 0  # teacher calls, and those started ahead of the student's work

    def __call__(self, micro_batches: Iterable) -> Iterator:
        batches = iter(micro_batches)
        while (cpu := self._next(batches)) is not None:
            noised = to_device(cpu, self.device)
            with self.phases("teacher"):
                targets = self.teacher_targets(noised)
            self.calls += 1
            yield noised, targets

    def _next(self, batches):
        with self.phases("data", host=True):
            return next(batches, None)

    def drain(self) -> None:
        """Waits for the teacher calls in flight (none here: each runs before its student work)."""

    def close(self) -> None:
        pass


class Overlap(Sequential):
    """Up to `prefetch` teacher calls in flight on a worker thread (its own CUDA stream on a GPU)
    while the student works on the current micro-batch. `guard` wraps each call on the worker
    (the loop passes `tide_ds.engine.dist.fail_fast`, so an error there stops every rank at once)."""

    def __init__(
        self,
        teacher_targets: Callable,
        device: torch.device,
        phases: Phases,
        prefetch: int = 1,
        guard: Callable = _no_guard,
        ready: Callable[[], bool] = lambda: True,
    ):
        super().__init__(teacher_targets, device, phases)
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.prefetch, self.guard, self.ready = prefetch, guard, ready
        self.cuda = device.type == "cuda"
        self.stream = self.consumer = None
        if self.cuda:
            self.consumer = torch.cuda.current_stream(device)  # the student's stream
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(self.consumer)  # the teacher's weights were copied on the student's stream
        self.worker = _Worker(device)
        self.pending: deque[Future] = deque()  # teacher calls submitted, their results not yet taken

    def __call__(self, micro_batches: Iterable) -> Iterator:
        batches = iter(micro_batches)
        pending = self.pending

        def submit(ahead: bool = False) -> bool:
            cpu = self._next(batches)
            if cpu is not None:
                pending.append(self.worker.submit(lambda: self.guard(lambda: self._teacher(cpu))))
                self.calls, self.ahead = self.calls + 1, self.ahead + ahead
            return cpu is not None

        submit()
        while pending:
            noised, targets, done = pending.popleft().result()
            # The next teacher calls run while the student works on this micro-batch, once the two
            # may run at once (`ready`, e.g. after DeepSpeed's first steps); until then in turn.
            while self.ready() and len(pending) < self.prefetch and submit(ahead=True):
                pass
            if done is not None:
                self.consumer.wait_event(done)
            yield noised, targets
            if not pending:
                submit()

    def _teacher(self, cpu):
        """On the worker thread: the copy to the device and the teacher call, on the teacher's stream."""
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            noised = to_device(cpu, self.device)
            with self.phases("teacher"):
                targets = self.teacher_targets(noised)
            if not self.cuda:
                return noised, targets, None
            done = self.stream.record_event()
            for t in tensors_of((noised, targets)):
                if not isinstance(t, torch.nn.Parameter):  # parameters belong to the model, not to this call
                    t.record_stream(self.consumer)
            return noised, targets, done

    def drain(self) -> None:
        """Waits until every submitted teacher call has finished (its result kept for the loop): on
        every rank the same calls, so their collectives are complete everywhere, e.g. before a save."""
        concurrent.futures.wait(list(self.pending))
        if self.cuda:  # a returned call may still have kernels (its collectives too) queued on its stream
            self.stream.synchronize()

    def close(self) -> None:
        self.worker.close()


class _Worker:
    """One daemon thread running submitted calls in order: the teacher's collectives keep the same
    order on every rank. A daemon, so that a rank stopping on an error never waits for it."""

    def __init__(self, device: torch.device):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, args=(device,), name="tide-ds-teacher", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def _run(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if self._closing:  # the loop stopped early: calls it will never use are skipped
                future.cancel()
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # raised where the loop asks for this result
                future.set_exception(e)

    def close(self) -> None:
        """Idle after a finished run, the thread ends at once; after an error it may be inside a
        call (or a collective another rank will never join): it is left behind, a daemon."""
        self._closing = True
        self._jobs.put(None)
        self._thread.join(timeout=1.0)


def build_scheduler(
    name: str,
    teacher_targets: Callable,
    device: torch.device,
    phases: Phases,
    *,
    prefetch: int = 1,
    guard: Callable = _no_guard,
    ready: Callable[[], bool] = lambda: True,
):
    if name == "sequential":
        return Sequential(teacher_targets, device, phases)
    if name == "overlap":
        return Overlap(teacher_targets, device, phases, prefetch=prefetch, guard=guard, ready=ready)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
