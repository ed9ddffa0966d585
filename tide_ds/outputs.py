"""Output directories written whole or not at all, and a write that fails told in one line.

`write_dir(out, write)` has `write` fill a temporary sibling (`<out>.partial`), fsyncs it and
renames it to `out`; an existing `out` is replaced only then. A full disk (or another I/O error)
removes the partial directory and stops with one line naming the directory and its free space
(`write_failed`, the line checkpoint saves print too). Commands that write a model directory
refuse a non-empty one unless told to overwrite it (`check_out_dir`), before any work.
"""

from __future__ import annotations

import os
import shutil

from tide_ds.config import ConfigError

PARTIAL = ".partial"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def is_write_error(e: Exception) -> bool:
    """An OSError, or torch.save's report of a full disk (a RuntimeError of its zip writer, no errno)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")
    )


def write_failed(e: Exception, where: str, what: str, kept: str, fix: str) -> str:
    """The one line for a failed write of `what` in directory `where`: the reason, the free space
    there, what is intact (`kept`) and what to do (`fix`)."""
    try:
        usage = shutil.disk_usage(where)
        free, full = f"{usage.free / 2**20:.1f} MiB free", usage.free < max(64 * 2**20, 0.001 * usage.total)
    except OSError:
        free, full = "free space unknown", False
    if isinstance(e, OSError) and e.errno is not None:
        reason = os.strerror(e.errno)
    elif full:
        reason = "No space left on device"
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{what} in {where} failed: {reason} ({free} there); {kept}; {fix}"


def check_out_dir(out: str, overwrite: bool, flag: str) -> None:
    """Refuses a file, or a non-empty directory without `overwrite`, as the output directory `flag`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{flag}: {out} is an existing file; give a directory path for the model")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(
            f"{flag}: {out} is not empty; give a new directory, or add --overwrite to replace its contents"
        )


def check_out_file(path: str, flag: str) -> None:
    """Refuses, before any work, an output file path (`flag`) that names a directory or cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: the folder {parent} does not exist; create it or give another path")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise ConfigError(f"{flag} {path} cannot be written (permission denied); give a path you may write")


def write_dir(out: str, write) -> str:
    """Runs write(tmp) on an empty temporary sibling of `out`, then puts it in place of `out`."""
    out = os.path.abspath(out)
    parent, tmp, old = os.path.dirname(out), out + PARTIAL, out + ".old"
    if not os.path.isdir(out) and os.path.isdir(old):  # a write cut short between its two renames
        os.rename(old, out)
    existed = os.path.isdir(out)
    try:
        for leftover in (tmp, old):  # from a write that was cut short
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        fsync_tree(tmp)
        if existed:  # a kill between the renames leaves the old contents in <out>.old (put back next time)
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(parent)
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if existed and not os.path.isdir(out) and os.path.isdir(old):
            os.rename(old, out)
        kept = f"{out} is as it was" if existed else f"nothing was left at {out}"
        fix = "free space there, or write to a larger disk"
        raise ConfigError(write_failed(e, parent, f"writing {os.path.basename(out)}", kept, fix)) from None
    shutil.rmtree(old, ignore_errors=True)
    return out
