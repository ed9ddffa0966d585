"""The megatron-core teacher placement: equal to the unsharded LLaDA2 teacher at tp=2 and ep=2 on 2
CPU ranks, dist_checkpointing resharding, distillation losses equal to a replicated teacher's, and
bad settings refused before anything is built."""

import importlib.util
import json
import math
import re
import sys

import pytest
import torch
from megatron_main import MOE
from test_engine import ZERO3, _args, launch
from tiny import decoder, llada2
from transformers import AutoTokenizer

from tide_ds.config import ConfigError, load_config
from tide_ds.engine.dist import Dist
from tide_ds.engine.placement import check_placement
from tide_ds.models.teacher import HFBidirectionalTeacher, LLaDA2Teacher

NEEDS_MEGATRON = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None, reason="needs megatron-core (pip install 'tide_ds[megatron]')"
)


def split_numel(whole: dict[str, int], tp: int, ep: int) -> int:
    """Parameters one rank holds: embedding, attention and dense / shared-expert MLPs split by tp,
    routed experts by ep; norms, routers and the output head whole."""
    by_tp = re.compile(r"word_embeddings|query_key_value|attention\.dense|mlp\.(shared_experts\.)?(gate|up|down)_proj")
    by_ep = re.compile(r"mlp\.experts\.")
    return sum(n // tp if by_tp.search(k) else n // ep if by_ep.search(k) else n for k, n in whole.items())


@pytest.mark.multirank
@NEEDS_MEGATRON
def test_megatron_teacher_on_2_ranks_equals_the_unsharded_teacher(tmp_path):
    """tp=2 and ep=2 against the unsharded teacher (each rank with its own inputs and padding), and a
    dist_checkpointing checkpoint written at tp=2 read back at ep=2 and at tp=1."""
    llada2(seed=0, **MOE).save_pretrained(tmp_path / "hf")
    out, seconds = launch(
        "torchrun",
        [str(tmp_path / "mg"), str(tmp_path / "hf"), str(tmp_path / "ckpt")],
        entry="megatron_main",
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"mg.rank{rank}.json").read_text())
        whole = r["whole_numel"]
        for run, tp, ep in (("tp2", 2, 1), ("ep2", 1, 2), ("ep2_from_tp2", 1, 2), ("tp1_from_tp2", 1, 1)):
            assert r[run]["max_diff"] <= 1e-5 and r[run]["head_diff"] == 0, (run, r[run]["max_diff"])
            assert r[run]["numel"] == split_numel(whole, tp, ep), (run, r[run]["numel"])
        assert r["ep2_from_tp2"]["hidden"] == r["ep2"]["hidden"]  # the same weights, the same computation
        diff = (torch.tensor(r["tp1_from_tp2"]["hidden"]) - torch.tensor(r["tp2"]["hidden"])).abs().max()
        assert diff <= 1e-5, diff
    print(f"megatron teacher, 2 ranks: {seconds:.0f} s; max |h_tp2 - h| = {r['tp2']['max_diff']:.1e}")


@pytest.fixture
def moe_teacher(tiny_assets, tmp_path):
    """A tiny LLaDA2 teacher megatron-core can split (16 experts, even vocabulary) on the student's tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    path = tmp_path / "moe_teacher"
    vocab = len(tok) + len(tok) % 2
    llada2(seed=0, vocab_size=vocab, mask_token_id=len(tok) - 1, **MOE).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.multirank
@pytest.mark.slow
@NEEDS_MEGATRON
def test_distill_with_a_megatron_teacher_matches_a_replicated_one(tiny_overrides, moe_teacher, tmp_path):
    """ZeRO-3 student, tide_cross, 5 steps: tp=2 and ep=2 give the losses of a replicated teacher."""
    common = [
        "recipe=tide_cross",
        f"teacher.path={moe_teacher}",
        "train.steps=5",
        "train.warmup_steps=0",
        f"engine.ds_config={ZERO3}",
    ]
    losses = {}
    for name, extra in (
        ("replicate", []),
        ("tp2", ["engine.teacher_placement=megatron", "engine.tp_size=2"]),
        ("ep2", ["engine.teacher_placement=megatron", "engine.ep_size=2"]),
    ):
        out, seconds = launch("torchrun", _args(tiny_overrides, tmp_path / name, *common, *extra))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        if extra:
            assert re.search(r"\[rank 1\] teacher \(megatron\): [0-9.]+ MiB of parameters", out.stdout + out.stderr)
        losses[name] = [h["loss"] for h in json.loads((tmp_path / name / "metrics.json").read_text())["history"]]
        print(f"{name}: {seconds:.0f} s")
    assert len(losses["replicate"]) == 5 and all(math.isfinite(x) for x in losses["replicate"])
    for name in ("tp2", "ep2"):
        assert losses[name] == pytest.approx(losses["replicate"], abs=1e-5), (name, losses)


def test_a_missing_megatron_core_names_the_extra(tiny_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # import fails as if not installed
    cfg = load_config(None, tiny_overrides + ["engine.teacher_placement=megatron", "engine.tp_size=2"])
    with pytest.raises(ConfigError, match=r"needs megatron-core .*pip install 'tide_ds\[megatron\]'"):
        check_placement(cfg, LLaDA2Teacher(llada2(**MOE), 63), Dist(rank=0, world=2))


@NEEDS_MEGATRON
@pytest.mark.parametrize(
    "extra, model, message",
    [
        (["engine.tp_size=2"], "dense", r"builds the LLaDA2-style MoE teacher .* Qwen3ForCausalLM is not one"),
        (["engine.tp_size=3"], "moe", r"tp_size=3 and engine.ep_size=1 must each divide the number of ranks \(2\)"),
        (["engine.ep_size=2"], "odd_vocab", None),  # ep does not split the vocabulary
        (["engine.tp_size=2"], "odd_vocab", r"tp_size=2 does not divide the teacher's vocab_size \(65\)"),
        (["engine.ep_size=2"], "llada2_groups", r"num_experts_per_tok / topk_group = 3 / 2 must be 2"),
        (["engine.megatron_checkpoint=/nowhere"], "moe", r"engine.megatron_checkpoint=/nowhere not found"),
        (
            ["engine.teacher_placement=zero3", "engine.megatron_checkpoint=/x"],
            "moe",
            r"megatron_checkpoint is read only by engine.teacher_placement=megatron \(here zero3\)",
        ),
    ],
)
def test_bad_megatron_settings_are_refused_before_building(tiny_overrides, extra, model, message):
    models = {
        "dense": lambda: HFBidirectionalTeacher(decoder(), 63),
        "moe": lambda: LLaDA2Teacher(llada2(**MOE), 63),
        "odd_vocab": lambda: LLaDA2Teacher(llada2(vocab_size=65, **MOE), 63),
        "llada2_groups": lambda: LLaDA2Teacher(llada2(), 63),
    }  # top 3 of 2 groups: LLaDA2 only
    cfg = load_config(None, tiny_overrides + ["engine.teacher_placement=megatron", *extra])
    if message is None:
        check_placement(cfg, models[model](), Dist(rank=0, world=2))
        return
    with pytest.raises(ConfigError, match=message):
        check_placement(cfg, models[model](), Dist(rank=0, world=2))


@pytest.mark.multirank
@pytest.mark.slow
@NEEDS_MEGATRON
def test_bench_teacher_with_a_placement_prints_the_figures(capsys):
    from tide_ds.cli import main

    common = ["bench", "teacher", "--batch", "1", "--length", "64", "--vocab", "2000", "--ranks", "2"]
    assert main(common + ["--placement", "megatron", "--tp-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "placement megatron (tp 2, ep 1) on 2 ranks" in out and "teacher MiB/rank" in out, out
    held, whole = map(float, out.strip().splitlines()[-1].split()[:2])
    assert held < whole


@NEEDS_MEGATRON
def test_megatron_groups_get_the_runs_timeout(monkeypatch):
    """engine.timeout_s (made torch's default group timeout by group_timeout) reaches megatron's
    own groups, which it would otherwise give 30 minutes."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    from tide_ds.engine import megatron
    from tide_ds.engine.dist import group_timeout

    asked = {}
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # group_timeout sets them: restored after
        monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name, None), raising=False)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kw: asked.update(kw))
    monkeypatch.setattr("megatron.core.tensor_parallel.random.initialize_rng_tracker", lambda **kw: None)
    group_timeout(100)  # 110 s with the watchdog's grace: 2 whole minutes
    megatron.init_groups(tp=2, ep=1)
    assert asked["distributed_timeout_minutes"] == 2 and asked["tensor_model_parallel_size"] == 2
