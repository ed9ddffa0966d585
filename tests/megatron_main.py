"""Entry used by tests/test_megatron.py: on each of 2 ranks, the megatron-core LLaDA2 teacher
(tp=2, then ep=2, then tp=1 from a dist_checkpointing checkpoint written at tp=2) against this
rank's own unsharded teacher, on this rank's own inputs. Writes <prefix>.rank<r>.json."""

import json
import sys

import torch
from tiny import llada2

from tide_ds.engine import megatron
from tide_ds.engine.placement import TensorParallelTeacher
from tide_ds.models.teacher import LLaDA2Teacher


def main(prefix: str, hf_dir: str, ckpt_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    from megatron.core import parallel_state

    hf = llada2(seed=0, **MOE)
    whole = LLaDA2Teacher(hf, mask_token_id=63)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 64, (3, 16) if rank == 0 else (2, 8), generator=g)  # shapes differ by rank
    pad = torch.ones_like(ids)
    pad[rank, 6:] = 0
    with torch.no_grad():
        expected = whole.hidden_states(ids, pad)

    def run(tp, ep, **source):
        t = megatron.build_megatron_teacher(hf.config, 63, tp=tp, ep=ep, dtype=torch.float32, **source)
        call = t if tp == 1 else TensorParallelTeacher(t, parallel_state.get_tensor_model_parallel_group())
        with torch.no_grad():
            got = call.hidden_states(ids, pad)
        numel = {n: p.numel() for n, p in t.model.named_parameters()}
        return t, {
            "max_diff": (got - expected).abs().max().item(),
            "head_diff": (t.output_weight - whole.output_weight).abs().max().item(),
            "numel": sum(numel.values()),
            "hidden": got.tolist(),
        }

    result = {"whole_numel": {n: p.numel() for n, p in hf.named_parameters()}}
    t, result["tp2"] = run(2, 1, hf_path=hf_dir)
    megatron.save_dist_checkpoint(t, ckpt_dir)
    _, result["ep2"] = run(1, 2, hf_path=hf_dir)
    _, result["ep2_from_tp2"] = run(1, 2, checkpoint=ckpt_dir)
    _, result["tp1_from_tp2"] = run(1, 1, checkpoint=ckpt_dir)
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# 16 experts in 4 groups; megatron-core and LLaDA2 score a group alike when top_k / topk_group = 2
MOE = dict(num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)

if __name__ == "__main__":  # dist_checkpointing's writer starts worker processes
    main(*sys.argv[-3:])
