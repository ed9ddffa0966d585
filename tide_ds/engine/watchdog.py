"""A heartbeat per rank, so that a rank that is alive but stalled (stopped, swapping, in a
debugger, stuck on a filesystem) stops the job with a line naming it, instead of leaving the others
blocked in a collective.

The loop calls `beat()` at each phase of a micro-batch (a counter in this process). A thread per
rank publishes `<thread ticks>:<beats>` under its rank in a TCPStore client of its own (the
rendezvous store at MASTER_ADDR:MASTER_PORT: no process group, so nothing of the collectives'
order changes) and reads every rank's. A rank is silent when its ticks stop (the whole process is
stopped, or its machine), or when its beats are behind another rank's and have not moved for
`timeout_s` (the others wait for it). Every rank that sees a silent one prints the line and exits;
the launcher then stops the rest. Ranks that are all at the same beat are not judged: that is a
long step or save, or a collective that hangs on every rank, which the process groups' own
timeouts end.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch

_beats = 0


def beat() -> None:
    """The main thread made progress (called at each phase of a micro-batch)."""
    global _beats
    _beats += 1


class Watchdog:
    def __init__(self, dist, timeout_s: float, interval_s: float | None = None):
        self.dist, self.timeout_s = dist, timeout_s
        self.interval_s = interval_s or min(5.0, max(0.5, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.dist.world > 1 and "MASTER_ADDR" in os.environ:
            self._thread = threading.Thread(target=self._watch, name="tide-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 5)

    def _store(self):
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job's keys start afresh
        return torch.distributed.PrefixStore(f"tide_watchdog/{attempt}/", store)

    def _watch(self) -> None:
        try:
            store = self._store()
        except Exception:  # no store to reach (another rendezvous): the process groups' timeouts remain
            return
        me, ranks = str(self.dist.rank), {str(r) for r in range(self.dist.world)}
        start = time.monotonic()
        seen: dict[str, tuple[str, str, float, float]] = {}  # rank -> (ticks, beats, ticks changed, beats changed)
        ticks = 0
        try:
            while True:  # publishes at once: a rank that stalls in its first seconds is named too
                ticks += 1
                store.set(me, f"{ticks}:{_beats}")
                now = time.monotonic()
                for key in sorted(ranks):
                    if not store.check([key]):
                        continue
                    t, b = store.get(key).decode().split(":")
                    if t == "done":  # that rank's loop is over: expect no more from it
                        ranks.discard(key)
                        seen.pop(key, None)
                        continue
                    old = seen.get(key)
                    changed = (old is None or old[0] != t, old is None or old[1] != b)
                    seen[key] = (t, b, now if changed[0] else old[2], now if changed[1] else old[3])
                silent = self.silent(seen, sorted(ranks), now, start)
                if silent:
                    self._fail(silent)
                if self._stop.wait(self.interval_s):
                    break
            store.set(me, f"done:{_beats}")
        except Exception:
            if not self._stop.is_set():  # the store's host (rank 0 or the launcher) stalled while this loop runs
                where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                self._fail(f"the rendezvous store at {where} (rank 0 or the launcher) does not answer")

    def silent(self, seen: dict, keys: list[str], now: float, start: float) -> str | None:
        """A line naming the silent rank(s), or None."""
        never = [k for k in keys if k not in seen]
        if never and now - start > self.timeout_s:
            return f"rank {', '.join(never)} sent no heartbeat in {now - start:.0f} s"
        stopped = [(k, now - v[2]) for k, v in seen.items() if now - v[2] > self.timeout_s]
        if stopped:
            k, for_s = max(stopped, key=lambda x: x[1])
            return f"rank {k} has sent no heartbeat for {for_s:.0f} s (its process is stopped, or its machine hangs)"
        if len(seen) < len(keys):
            return None
        ahead = max(int(v[1]) for v in seen.values())
        behind = [(k, now - v[3]) for k, v in seen.items() if int(v[1]) < ahead and now - v[3] > self.timeout_s]
        if behind:
            k, for_s = max(behind, key=lambda x: x[1])
            return (
                f"rank {k} has made no progress for {for_s:.0f} s while the others wait for it (swapping, in a "
                f"debugger, or stuck on a filesystem?)"
            )
        return None

    def _fail(self, what: str) -> None:
        print(
            f"[rank {self.dist.rank}] tide-ds: error: {what}, longer than engine.timeout_s={self.timeout_s:g}; "
            f"stopping every rank (resume from the last checkpoint with --resume latest)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)  # no teardown: the main thread may be blocked in a collective with the silent rank
