"""Host memory that a freed tensor hands back to the system at once.

glibc's malloc serves a block of at least its mmap threshold from a mapping of its own, returned to
the system on free, and anything smaller from its heap, where freed memory stays with the process
for reuse. It raises that threshold to the size of each large block freed (up to 32 MiB), so after
the first step a training process takes its activations, logits blocks and optimizer temporaries
from the heap, and the heap fragments: the process stays resident well above the tensors alive
(`tide-ds bench floor` shows the difference, docs/kernels.md). A fixed threshold turns that
adjustment off. Accelerator memory has its own allocator; this is about the host's.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 128 << 10  # glibc's initial value, kept fixed
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve host blocks of `threshold` bytes and more from their own mappings for the rest of the
    process. False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator behaves otherwise
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
