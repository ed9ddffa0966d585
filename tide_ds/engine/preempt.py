"""Pre-emption: SIGTERM, SIGINT and SIGUSR1 ask a run to stop after its current optimizer step.

Clusters stop jobs with SIGTERM (then SIGKILL after a grace period), SLURM can send SIGUSR1 before
the time limit (`--signal=USR1@120`), Ctrl-C sends SIGINT. The handler only records the signal;
the loop reads it once per optimizer step through `StepGuard` (one collective, so every rank stops
at the same step), saves a checkpoint and exits with 128 + the signal's number, which SLURM's
requeue logic and shells read as "killed by that signal". The same signal a second time stops the
process at once, without saving.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preemption:
    """Context manager that records the first of SIGNALS (`signum`, 0 until one arrives)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if signum == self.signum:  # asked twice: stop now
            os.write(2, f"tide-ds: {name} again: stopping without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self.signum:
            self.signum = signum
            # os.write, not print: the handler may run while the main thread is inside print
            os.write(2, f"tide-ds: {name}: stopping after this optimizer step to save a checkpoint\n".encode())


def resume_command(world: int, argv: list[str] | None = None) -> str:
    """This run's `tide-ds distill` command line, resuming from the newest complete checkpoint."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = args[args.index("distill") :] if "distill" in args else ["distill", *args]
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--resume", "--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--resume=", "--local_rank=", "--local-rank=", "train.resume=")):
            kept.append(a)
    command = "tide-ds " + shlex.join(kept + ["--resume", "latest"])
    return command if world == 1 else f"{command} (under the same launcher, {world} ranks)"
