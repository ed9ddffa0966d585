"""Step metrics: phase times without host syncs, and one JSONL line (plus TensorBoard scalars) per log step.

`<output_dir>/metrics.jsonl` gets one JSON object per log step, appended and flushed at once, so a
crash loses nothing logged before it:
  step, loss, one key per loss term, lr, grad_norm, tokens_per_s,
  time: {data, teacher, student_fwd, backward, optimizer} seconds since the previous log step,
  overlap_fraction: the share of the teacher's time hidden under other work,
      (sum of phase times - wall time) / teacher time, clamped to [0, 1] (0 when run in turn).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict

import torch

PHASES = ("data", "teacher", "student_fwd", "backward", "optimizer")


class Phases:
    """Seconds per phase, summed between reads. On CUDA through events on the calling thread's
    current stream (read, with a wait, only in `read`); on CPU, and for `host=True`, the host clock.
    Phases may be timed from several threads (the teacher's worker)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._host: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str, host: bool = False):
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._events[name].append((start, end))
            return
        t0 = time.perf_counter()
        yield
        with self._lock:
            self._host[name] += time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (waits for the timed GPU work: logging only)."""
        with self._lock:
            host, events = self._host, self._events
            self._host, self._events = defaultdict(float), defaultdict(list)
        out = {name: host.get(name, 0.0) for name in PHASES}
        for name, pairs in events.items():
            for start, end in pairs:
                end.synchronize()
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


def overlap_fraction(times: dict[str, float], wall: float) -> float:
    """Teacher time hidden under other work / teacher time: phases that ran at once add up to more
    than the wall time."""
    teacher = times.get("teacher", 0.0)
    if teacher <= 0:
        return 0.0
    return min(1.0, max(0.0, (sum(times.values()) - wall) / teacher))


class MetricsLog:
    """Appends one JSON line per log step to <output_dir>/metrics.jsonl (and TensorBoard scalars
    under <output_dir>/tb when tensorboard is installed). Only the main rank writes."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.file = self.tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # in the OS's hands: survives a killed process
        if self.tb is not None:
            for name, value in _scalars(record):
                self.tb.add_scalar(name, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        for f in (self.file, self.tb):
            if f is not None:
                f.close()
        self.file = self.tb = None


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}{key}", value
