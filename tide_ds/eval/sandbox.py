"""Runs untrusted generated code in a child process with CPU-time, memory and wall-clock limits and
no network.

The child is a fresh isolated interpreter (`python -I`) in its own session and empty temporary
directory, with limits set before it starts: RLIMIT_CPU (a busy loop is killed), RLIMIT_AS (an
unbounded allocation fails), RLIMIT_FSIZE and RLIMIT_CORE. Network: where the kernel allows it,
the child gets its own empty network namespace (no interface but a down loopback); in any case a
prelude replaces the socket constructors before the program runs. The parent kills the whole
process group at the wall-clock limit. Any non-zero exit, signal or timeout counts as a failure.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it after fork

# Runs in the child before the program: no sockets of any family, even through _socket.
_PRELUDE = """\
import socket as _socket_mod, _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    if hasattr(_socket_mod, _name):
        setattr(_socket_mod, _name, _no_network)
    if hasattr(_socket, _name):
        setattr(_socket, _name, _no_network)
del _name, _socket_mod, _socket
"""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    memory_mb: int = 512
    wall_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "failed", "timeout", "killed by <signal>"


def _unshare_network() -> None:
    """A new network namespace for this (child) process; silently kept when not permitted."""
    if _LIBC.unshare(CLONE_NEWNET) != 0:
        _LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET)


def _child_setup(limits: Limits):
    def setup() -> None:
        os.setsid()  # its own process group, killed as a whole
        _unshare_network()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        mem = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return setup


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Executes `program` (Python source) under the limits; passed means exit status 0."""
    with tempfile.TemporaryDirectory(prefix="tide-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + "\n" + program + "\n")
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", path],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_child_setup(limits),
        )
        try:
            code = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(False, "timeout")
        _kill_group(proc)  # anything it left running in its group
    if code == 0:
        return Outcome(True, "passed")
    if code < 0:
        return Outcome(False, f"killed by {signal.Signals(-code).name}")
    return Outcome(False, "failed")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
