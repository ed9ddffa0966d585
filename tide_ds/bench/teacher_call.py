"""The teacher benchmark's model, inputs and CALM call, and its CPU peak-memory sampler: the same for
one process (`tide-ds bench teacher`) and for placed ranks (`tide-ds bench teacher --placement`)."""

from __future__ import annotations

import os
import resource
import threading
import time


def bench_teacher(args, device, seed: int = 0):
    """The benchmark's teacher (the same for every variant and placement) and its inputs (seeded)."""
    import torch

    from tide_ds.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
    from tide_ds.models.teacher import LLaDA2Teacher

    torch.manual_seed(0)
    heads = max(2, args.hidden // 16)
    # 16 experts in 4 groups, top 4 of the best 2 groups: a shape every MoE placement takes
    config = LLaDA2MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=args.hidden // heads,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=args.hidden // 2,
        mask_token_id=args.vocab - 1,
        pad_token_id=0,
    )
    teacher = LLaDA2Teacher(LLaDA2MoeModelLM(config), config.mask_token_id).to(device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=g).to(device)
    targets = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=g).to(device)
    return teacher, ids, targets


def calm_call(teacher, ids, targets, block_rows=None):
    """Hidden states, then per-token target log-probs: the op the training step uses for CALM targets."""
    from tide_ds.kernels import target_logprobs

    hidden = teacher.hidden_states(ids)
    return target_logprobs(
        hidden.flatten(0, 1), teacher.output_weight, targets.flatten(), bias=teacher.output_bias, block_rows=block_rows
    )[0]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak(call) -> tuple[int, float]:
    """(peak RSS during call - RSS before, seconds)."""
    before = _rss()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:  # the call set a new lifetime maximum: that maximum is its peak
        peak[0] = max(peak[0], max_after)
    return peak[0] - before, seconds
