"""Entry used by tests/test_sharded_build.py: on each of 2 ranks, every sharding placement builds its
teacher on the meta device (or under zero.Init), reads only its part of the saved weights, and is
compared with the whole teacher loaded as `replicate` loads it, on this rank's own inputs."""

import json
import os
import sys

import deepspeed
import torch
from tiny import STUDENT_INIT, decoder, llada2, word_tokenizer

from tide_ds.config import Config
from tide_ds.engine import build, placement
from tide_ds.engine.dist import Dist, local_size_for_autotp, unlink_shm_workspace
from tide_ds.models import build_student, build_teacher

local_size_for_autotp()
deepspeed.init_distributed("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
unlink_shm_workspace(rank)
out = sys.argv[-1]
paths = {"moe": f"{out}.moe", "dense": f"{out}.dense"}
if rank == 0:
    llada2(seed=0, num_experts=8, num_hidden_layers=3).save_pretrained(paths["moe"])
    decoder("qwen3", seed=1, intermediate_size=256, tie_word_embeddings=True).save_pretrained(paths["dense"])
torch.distributed.barrier()


class Step:
    """What a placement needs of the distillation step: the teacher and its one call."""

    def __init__(self, teacher, ids):
        self.teacher, self.ids = teacher, ids

    def teacher_targets(self, _noised):
        return self.teacher.hidden_states(self.ids)

    def with_teacher(self, teacher):
        return Step(teacher, self.ids)


DS = {
    "train_micro_batch_size_per_gpu": 3,
    "gradient_accumulation_steps": 1,
    "train_batch_size": 3 * world,
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    "steps_per_print": 10**9,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
result = {"rank": rank}
for name, model, dtype in (
    ("zero3", "moe", "float32"),
    ("expert_parallel", "moe", "float32"),
    ("expert_parallel_bf16", "moe", "bfloat16"),
    ("tensor_parallel", "dense", "float32"),
    ("zero3_dense", "dense", "float32"),
    ("zero3_persistent", "moe", "float32"),
):
    cfg = Config()
    cfg.teacher.path, cfg.teacher.mask_token_id, cfg.teacher.dtype = paths[model], 63, dtype
    cfg.teacher.attn_backend = "sdpa"
    cfg.engine.teacher_placement = name.split("_bf16")[0].removesuffix("_dense").removesuffix("_persistent")
    cfg.engine.ep_size = 2 if cfg.engine.teacher_placement == "expert_parallel" else 1
    cfg.engine.tp_size = 2 if cfg.engine.teacher_placement == "tensor_parallel" else 1
    whole = build_teacher(cfg.teacher, "<|mask|>")
    meta = build_teacher(cfg.teacher, "<|mask|>", weights=False)
    assert placement.is_meta(meta)
    meta_bytes = build.param_bytes(meta)  # tied weights one parameter, as in the loaded teacher
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(100 + rank))
    placement.check_placement(cfg, meta, Dist(rank, world))
    # zero3_persistent: ZeRO-3 keeps its small parameters whole on every rank, gathered once from the
    # partitions read here
    ds = {**DS, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10**5}}
    ds = ds if name == "zero3_persistent" else DS
    placed = placement.PLACEMENTS[cfg.engine.teacher_placement](Step(meta, ids), cfg, Dist(rank, world), ds)
    with torch.no_grad():
        got, expected = placed.call(None), whole.hidden_states(ids)
    held = placed.module
    result[name] = {
        "max_diff": (got.float() - expected.float()).abs().max().item(),
        "dtypes": sorted({str(p.dtype) for p in held.parameters()}),
        "meta_left": sum(p.is_meta for p in held.parameters()) + sum(b.is_meta for b in held.buffers()),
        "held": build.teacher_bytes(held),
        "whole": build.param_bytes(whole),
        "meta_whole": meta_bytes,
    }
# The ZeRO-3 student, built partitioned: a new model (the same initial values and random draws after
# it as one process's whole build) and a checkpoint's (each rank reading its partition).
for name in ("student_init", "student_checkpoint"):
    cfg = Config()
    cfg.student.init = dict(STUDENT_INIT, num_hidden_layers=2, tie_word_embeddings=True)
    if name == "student_checkpoint":
        cfg.student.path = f"{out}.student"
    torch.manual_seed(0)
    whole = build_student(cfg.student, word_tokenizer(), 4, "<|mask|>")
    draw_whole = torch.rand(4)
    if name == "student_init" and rank == 0:
        whole.model.save_pretrained(cfg.student.path or f"{out}.student")
    torch.distributed.barrier()
    torch.manual_seed(0)
    held = build.build_zero3_student(cfg, DS, word_tokenizer(), Dist(rank, world))
    draw_held = torch.rand(4)
    with deepspeed.zero.GatheredParameters(list(held.parameters())):
        got = dict(held.named_parameters())
        diff = max((got[n] - p).abs().max().item() for n, p in whole.named_parameters())
    result[name] = {
        "max_diff": diff,
        "same_draws": torch.equal(draw_whole, draw_held),
        "dtypes": sorted({str(p.dtype) for p in held.parameters()}),
        "meta_left": sum(p.is_meta for p in held.parameters()) + sum(b.is_meta for b in held.buffers()),
        "held": build.teacher_bytes(held),
        "whole": build.param_bytes(whole),
        "meta_whole": build.param_bytes(held),
    }
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.barrier()
sys.stdout.flush()
os._exit(0)
