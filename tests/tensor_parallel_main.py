"""Entry used by tests/test_engine.py: on each of 2 ranks, a tiny Qwen3 teacher split by AutoTP
(tp_size=2) against this rank's own unsharded copy, on this rank's own inputs, of another shape on
each rank (the tensor-parallel teacher gathers the group's micro-batches and hands each rank its rows)."""

import copy
import json
import sys

import deepspeed
import torch
from tiny import decoder

from tide_ds.engine.dist import local_size_for_autotp, unlink_shm_workspace
from tide_ds.engine.placement import tensor_parallel
from tide_ds.models.teacher import HFBidirectionalTeacher, WeDLMTeacher

local_size_for_autotp()  # under torchrun
deepspeed.init_distributed("gloo")
rank = torch.distributed.get_rank()
unlink_shm_workspace(rank)
result = {"rank": rank}
for name, cls, kw in (("bidirectional", HFBidirectionalTeacher, {}), ("wedlm", WeDLMTeacher, {"block_size": 4})):
    teacher = cls(decoder("qwen3", seed=1, intermediate_size=256), mask_token_id=63, attn_backend="sdpa", **kw)
    whole = copy.deepcopy(teacher)
    split = tensor_parallel(teacher, 2)
    g = torch.Generator().manual_seed(100 + rank)
    shape = (3, 16) if rank == 0 else (2, 8)  # the ranks' micro-batches differ in rows and length
    ids, x0 = torch.randint(0, 64, shape, generator=g), torch.randint(0, 64, shape, generator=g)
    pad = torch.ones_like(ids)
    pad[rank, 6:] = 0
    with torch.no_grad():
        expected, got = whole.hidden_states(ids, pad, x0=x0), split.hidden_states(ids, pad, x0=x0)
    result[name] = {
        "max_diff": (got - expected).abs().max().item(),
        "head_diff": (split.output_weight - whole.output_weight).abs().max().item(),
        "params": [sum(p.numel() for p in m.parameters()) for m in (split, whole)],
    }
with open(f"{sys.argv[-1]}.rank{rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.barrier()
