"""Entry used by tests/test_engine.py: on each of 2 ranks, a tiny LLaDA2 teacher with its experts
split over the ranks (ep_size=2) against this rank's own unsharded copy, on this rank's own inputs."""

import copy
import json
import sys

import torch
from tiny import llada2

from tide_ds.engine.dist import Dist
from tide_ds.engine.placement import consecutive_group
from tide_ds.models.llada2 import Experts, shard_experts
from tide_ds.models.teacher import LLaDA2Teacher

torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
teacher = LLaDA2Teacher(llada2(seed=0, num_experts=8, num_hidden_layers=3), mask_token_id=63)
whole = copy.deepcopy(teacher)
sharded = shard_experts(teacher, consecutive_group(2, Dist(rank, world)))

shape = (3, 16) if rank == 0 else (2, 8)  # the ranks' micro-batches differ in rows and length
ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(100 + rank))
pad = torch.ones_like(ids)
pad[0, 6:] = 0
with torch.no_grad():
    expected = whole.hidden_states(ids, pad)
    got = teacher.hidden_states(ids, pad)
numel = {
    name: sum(m.numel() for m in model.modules() if isinstance(m, Experts) for m in m.parameters())
    for name, model in (("sharded", teacher), ("whole", whole))
}
result = {
    "rank": rank,
    "layers": sharded,
    "max_diff": (got - expected).abs().max().item(),
    "expert_numel": numel,
    "param_numel": {
        "sharded": sum(p.numel() for p in teacher.parameters()),
        "whole": sum(p.numel() for p in whole.parameters()),
    },
}
with open(f"{sys.argv[-1]}.rank{rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
