"""Loads the CUDA extension: built by setup.py (`tide_ds.kernels._cuda`), else JIT-built from the
sources when a CUDA torch and nvcc are present. The sources live in the repository's kernels/; an
installed (non-editable) copy carries them as tide_ds/kernels/csrc/ (setup.py copies them there)."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

_INSTALLED = Path(__file__).resolve().parent / "csrc"
SOURCES = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[2] / "kernels"
SOURCE_FILES = ("binding.cpp", "tide_kernels.cu")
HEADERS = ("tide_kernels.h", "tide_lse.h")


def source_paths() -> list[Path]:
    """The C++/CUDA sources the extension is built from (setup.py and the JIT build alike)."""
    return [SOURCES / f for f in SOURCE_FILES]


def _fall_back(why: str) -> None:
    warnings.warn(
        f"tide_ds.kernels: no CUDA extension ({why}); the fused ops run on the slower PyTorch twin on GPU "
        "(set TIDE_DS_NO_CUDA_EXT=1 to choose the twin without this warning)",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.cache
def cuda_extension():
    """The compiled CUDA row kernels, or None. Tried once per process; a failure is said once, in
    one warning naming the cause, and the twin runs instead."""
    if not torch.cuda.is_available() or os.environ.get("TIDE_DS_NO_CUDA_EXT"):
        return None
    try:
        from tide_ds.kernels import _cuda  # built by `pip install --no-build-isolation .`

        return _cuda
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME, load

    missing = [str(p) for p in source_paths() + [SOURCES / h for h in HEADERS] if not p.exists()]
    if missing:
        _fall_back(f"sources missing from the installed package: {', '.join(missing)}")
        return None
    if CUDA_HOME is None:
        _fall_back("nvcc not found: set CUDA_HOME or put nvcc on PATH")
        return None
    try:
        return load(
            name="tide_ds_kernels",
            sources=[str(p) for p in source_paths()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
        )
    except Exception as e:  # a failed build must not stop training: the twin is correct, only slower
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        _fall_back(f"building it from {SOURCES} failed: {first}")
        return None
