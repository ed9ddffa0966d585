"""Sharded construction: each sharding placement builds its teacher without its weights and reads
only its part of the checkpoint; the result equals the whole teacher."""

import json

import pytest
from test_engine import launch


@pytest.mark.multirank
def test_every_sharding_placement_reads_its_part_and_equals_the_whole_teacher(tmp_path):
    out, seconds = launch("torchrun", [str(tmp_path / "sb")], entry="sharded_build_main", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"sb.rank{rank}.json").read_text())
        for name in ("zero3", "expert_parallel", "expert_parallel_bf16", "tensor_parallel", "zero3_dense"):
            got = r[name]
            assert got["max_diff"] <= 1e-5 and got["meta_left"] == 0, (name, got)
            assert got["held"] < 0.75 * got["whole"], (name, got)
        # the dtype the config asks for, read straight into it (the checkpoint is float32)
        assert r["expert_parallel_bf16"]["dtypes"] == ["torch.bfloat16"], r
        assert r["zero3"]["dtypes"] == ["torch.float32"], r
        assert r["zero3"]["held"] * 2 == r["zero3"]["whole"], r  # an even split: every tensor partitioned
    print(f"sharded construction, 2 ranks: {seconds:.0f} s")
