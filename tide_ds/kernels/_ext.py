"""Loads the CUDA extension: built by setup.py (`tide_ds.kernels._cuda`), else JIT-built from the
sources in the repository's kernels/ folder when a CUDA torch and nvcc are present."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parents[2] / "kernels"
SOURCE_FILES = ("binding.cpp", "tide_kernels.cu")


@functools.cache
def cuda_extension():
    """The compiled CUDA row kernels, or None (with a warning) when they cannot be had."""
    if not torch.cuda.is_available() or os.environ.get("TIDE_DS_NO_CUDA_EXT"):
        return None
    try:
        from tide_ds.kernels import _cuda  # built by `pip install --no-build-isolation -e .`

        return _cuda
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = [SOURCES / f for f in SOURCE_FILES]
    if CUDA_HOME is None or not all(p.exists() for p in sources):
        warnings.warn(
            "tide_ds.kernels: no CUDA extension (needs nvcc and the kernels/ sources); using the PyTorch twin on GPU",
            stacklevel=3,
        )
        return None
    try:
        return load(
            name="tide_ds_kernels",
            sources=[str(p) for p in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
        )
    except Exception as e:  # a failed build must not stop training: the twin is correct, only slower
        warnings.warn(
            f"tide_ds.kernels: building the CUDA extension failed ({e}); using the PyTorch twin", stacklevel=3
        )
        return None
