"""What megatron-core 0.16 needs to run the megatron teacher placement without CUDA (CPU ranks, gloo).

megatron-core's tensor-parallel layers run on CPU as they are; its MoE token dispatcher, rotary
embedding and attention buffers call CUDA-only functions. `apply()` replaces exactly those calls,
and only when torch has no usable CUDA device, so nothing changes on a GPU. Each shim names the
upstream call it replaces. One more, `te_general_gemm`, is not about CUDA: without Transformer
Engine megatron-core's router references a name it never defined, so that one applies whenever
Transformer Engine is missing (where it makes megatron-core take its own torch fallback).
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


class _Event:
    def synchronize(self) -> None:  # CPU work is already complete when the event is recorded
        pass


class _Stream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so waiting is a no-op."""

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None) -> _Event:
        return _Event()


def _as_list(sizes):
    return sizes.tolist() if hasattr(sizes, "tolist") else sizes


def apply() -> None:
    """Installs the shims (idempotent). Call before building a megatron-core model."""
    global _applied
    if _applied:
        return
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        # moe_utils.RouterGatingLinearFunction reads `te_general_gemm`, imported only with TE
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        _applied = True
        return
    # torch.cuda.current_device(): megatron-core places buffers (rotary inv_freq, all_to_all
    # outputs, the attention matmul buffer) on "the current CUDA device"; here that is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # torch.cuda.Stream / current_stream / stream(): MoEAlltoAllTokenDispatcher copies the
    # exchange sizes to the host on a side stream (_maybe_dtoh_and_synchronize).
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _Stream()
    torch.cuda.current_stream = lambda device=None: _Stream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # torch.cuda.synchronize(): dist_checkpointing's writer (filesystem_async.preload_tensors)
    # waits for device copies before writing; CPU copies are done already.
    torch.cuda.synchronize = lambda device=None: None
    # torch.distributed.all_to_all_single in tensor_parallel.mappings.all_to_all: on CUDA the
    # dispatcher hands it host numpy split sizes; on CPU they stay tensors, which gloo refuses.
    upstream = mappings.all_to_all

    def all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None):
        return upstream(group, input_, _as_list(output_split_sizes_), _as_list(input_split_sizes))

    token_dispatcher.all_to_all = all_to_all
    _applied = True
