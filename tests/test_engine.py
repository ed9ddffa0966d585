"""The DeepSpeed engine: config merge, ZeRO-3 student + ZeRO-3 teacher on 2 CPU ranks (gloo),
checkpoints, resume, export, and bad input."""

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tide_ds
from tide_ds import checkpoint
from tide_ds.config import Config, ConfigError, load_config
from tide_ds.engine import settle
from tide_ds.train import distill

REPO = Path(tide_ds.__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ZERO3 = str(REPO / "ds_configs" / "zero3.json")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: str,
    args: list[str],
    entry: str = "tide_ds.cli",
    timeout: int = 600,
    env: dict | None = None,
    command: str = "distill",
):
    """Starts 2 CPU ranks with `launcher` running `python -m entry command args` (extra `env` variables)."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "DS_ACCELERATOR": "cpu",
        **(env or {}),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = str(_port())
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", port, "--module", entry]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", entry]
    elif launcher == "mpirun":
        env["MASTER_PORT"] = port
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        forward = [
            a
            for k in ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "MASTER_PORT", "PATH", "TORCH_EXTENSIONS_DIR")
            if k in env
            for a in ("-x", k)
        ]
        cmd = ["mpirun", *root, "--oversubscribe", "-n", "2", *forward, sys.executable, "-m", entry]
    elif launcher == "srun":  # ranks from SLURM_PROCID / SLURM_NTASKS (tide_ds/engine/dist.py)
        env["MASTER_PORT"] = port
        cmd = ["srun", "--nodes=1", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m", entry]
    else:
        raise ValueError(launcher)
    start = time.time()
    out = subprocess.run(cmd + [command, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return out, time.time() - start


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_weights(a, b, atol=1e-5, adam_lr=0.0):
    """Same weights within atol. With adam_lr, a few elements may differ by up to a tenth of the
    learning rate: Adam divides by sqrt(v), so a gradient near zero turns reduction-order rounding
    (one all-reduce over 2 ranks vs one sum in one process) into a visible update difference."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    worst = diff.max().item()
    if adam_lr:
        assert worst <= 0.1 * adam_lr and (diff > atol).float().mean().item() <= 1e-3, (worst, int((diff > atol).sum()))
    else:
        assert worst <= atol, worst
    return worst


# -- the run plan: ds_config and YAML settled before any model is built ---------------------------


def _json(tmp_path, ds: dict) -> list[str]:
    """An override pointing engine.ds_config at `ds`, written as a file."""
    path = tmp_path / "my.json"
    path.write_text(json.dumps(ds))
    return [f"engine.ds_config={path}"]


def test_auto_values_are_filled_from_the_yaml_and_the_config_is_left_as_given(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.gradient_accumulation_steps=3", "train.grad_clip=0.5"])
    plan, ds = settle(cfg, json.loads(Path(ZERO3).read_text()), world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 and plan.config.train.global_batch_size == 12
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and plan.deepspeed and plan.world == 2
    assert cfg.train.global_batch_size == 0  # settle returns a new config; the given one is unchanged


def test_a_json_value_the_yaml_leaves_unset_is_adopted(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    plan, ds = settle(cfg, {"gradient_clipping": 0.25, "bf16": {"enabled": True}}, world=1)
    assert plan.config.train.grad_clip == 0.25 and plan.config.train.precision == "bf16"
    assert ds["bf16"]["enabled"] is True and cfg.train.precision == "fp32"


def test_one_process_without_a_ds_config_is_plain():
    plan, ds = settle(Config(), None, world=1)
    assert ds is None and not plan.deepspeed and plan.config.train.global_batch_size == 8


@pytest.mark.parametrize(
    "json_part, message",
    [
        ({"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu=4 .* train\.micro_batch_size=2"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, r"optimizer\.params\.lr=0\.1 .* train\.lr=0\.001"),
        ({"train_batch_size": 6}, r"global batch \(6\) must be a multiple of micro batch \(2\) x ranks \(2\)"),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' section"),
    ],
)
def test_a_ds_config_that_disagrees_with_the_yaml_names_both(tiny_overrides, tmp_path, json_part, message):
    cfg = load_config(None, tiny_overrides + _json(tmp_path, json_part))
    with pytest.raises(ConfigError, match=message):
        settle(cfg, json_part, world=2)


def test_precision_conflict_and_global_batch_conflict(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["train.precision=fp32"] + _json(tmp_path, {"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"my\.json selects bf16 .* train\.precision=fp32"):
        settle(cfg, {"bf16": {"enabled": True}}, world=1)
    cfg = load_config(None, tiny_overrides + ["train.global_batch_size=8", "train.gradient_accumulation_steps=1"])
    with pytest.raises(ConfigError, match=r"global batch 8 != micro batch 2 x gradient accumulation 1 x ranks 2"):
        settle(cfg, {}, world=2)


def test_fp16_is_refused_by_the_run_plan_with_or_without_deepspeed(tiny_overrides):
    """The fused loss writes its gradients in the forward, before the loss scale: fp16 would lose
    small gradient terms, so the plan refuses it and names bf16."""
    cfg = load_config(None, tiny_overrides + ["train.precision=fp16"])
    for ds, world in ((None, 1), ({}, 1), ({}, 2)):
        with pytest.raises(ConfigError, match=r"^train\.precision=fp16.*: fp16 is not supported .*bf16$"):
            settle(cfg, ds, world=world)
    plan, ds = settle(load_config(None, tiny_overrides + ["train.precision=bf16"]), {}, world=2)
    assert plan.config.train.precision == "bf16" and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_a_batch_disagreement_stops_distill_in_seconds_before_anything_is_built(tiny_overrides, tmp_path, monkeypatch):
    """Whatever the models' size, the plan is settled first: nothing is loaded before the error."""
    from tide_ds import train

    def never(*args, **kwargs):
        raise AssertionError("built before the batch sizes were checked")

    for name in ("init_distributed", "student_tokenizer", "build_data", "build_student", "build_teacher"):
        monkeypatch.setattr(train, name, never)
    huge = ["student.init={hidden_size: 8192, num_hidden_layers: 64, intermediate_size: 32768}"]
    cases = [
        (
            ["train.global_batch_size=7"],
            {},
            r"global batch \(7\) must be a multiple of micro batch \(2\) x ranks \(1\)",
        ),
        ([], {"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu=4 .* train\.micro_batch_size=2"),
        (["train.precision=fp16"], {}, r"fp16 is not supported .* use train\.precision=bf16"),
        ([], {"fp16": {"enabled": True}}, r"fp16\.enabled in .*my\.json\): fp16 is not supported .*=bf16"),
    ]
    for extra, ds, message in cases:
        cfg = load_config(None, tiny_overrides + huge + extra + _json(tmp_path, ds))
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=message):
            train.distill(cfg)
        assert time.perf_counter() - start < 5.0


def test_missing_ds_config(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="engine.ds_config not found"):
        load_config(None, tiny_overrides + [f"engine.ds_config={tmp_path / 'x.json'}"])


@pytest.fixture
def llada2_teacher(tiny_assets, tmp_path):
    """A tiny LLaDA2-style MoE teacher (8 experts) on the student's tokenizer."""
    from tiny import llada2

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    path = tmp_path / "llada2"
    llada2(vocab_size=len(tok), num_experts=8, mask_token_id=len(tok) - 1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["engine.ep_size=3"], r"engine.ep_size=3 does not divide the teacher's 8 experts per layer"),
        (["engine.ep_size=2"], r"engine.ep_size=2 does not divide the number of ranks \(1\)"),
        (["engine.ep_size=2", "engine.teacher_placement=zero3"], r"engine.ep_size=2 is read only by .*expert_parallel"),
        (["teacher.path=DENSE"], r"expert_parallel needs an MoE teacher .* Qwen3ForCausalLM has no routed experts"),
    ],
)
def test_bad_expert_parallel_settings_stop_before_training(
    tiny_overrides, tiny_assets, llada2_teacher, tmp_path, extra, message
):
    extra = [x.replace("DENSE", tiny_assets["teacher"]) for x in extra]
    cfg = load_config(
        None,
        tiny_overrides
        + ["recipe=tide_shared", f"teacher.path={llada2_teacher}", "engine.teacher_placement=expert_parallel", *extra],
    )
    with pytest.raises(ConfigError, match=message):
        distill(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["teacher.path=MOE"], r"tensor_parallel \(AutoTP\) is for dense teachers; LLaDA2MoeModelLM is an MoE"),
        (["engine.tp_size=2"], r"engine.tp_size=2 does not divide the number of ranks \(1\)"),
        ([], r"teacher_placement=tensor_parallel needs DeepSpeed"),
    ],
)
def test_bad_tensor_parallel_settings_stop_before_training(tiny_overrides, llada2_teacher, tmp_path, extra, message):
    extra = [x.replace("MOE", llada2_teacher) for x in extra]
    cfg = load_config(None, tiny_overrides + ["recipe=tide_shared", "engine.teacher_placement=tensor_parallel", *extra])
    with pytest.raises(ConfigError, match=message):
        distill(cfg)


def test_tensor_parallel_on_cpu_needs_every_rank_on_one_machine(tiny_overrides, monkeypatch):
    from tiny import decoder

    from tide_ds.engine.dist import Dist
    from tide_ds.engine.placement import check_placement
    from tide_ds.models.teacher import HFBidirectionalTeacher

    teacher = HFBidirectionalTeacher(decoder(), mask_token_id=63)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    cfg = load_config(None, tiny_overrides + ["engine.teacher_placement=tensor_parallel", "engine.tp_size=2"])
    with pytest.raises(ConfigError, match=r"tp_size \(2\) must equal the number of ranks \(4\) .*LOCAL_SIZE=unset"):
        check_placement(cfg, teacher, Dist(rank=0, world=4))
    with pytest.raises(ConfigError, match=r"LOCAL_SIZE=unset"):
        check_placement(cfg, teacher, Dist(rank=0, world=2))
    monkeypatch.setenv("LOCAL_SIZE", "2")
    check_placement(cfg, teacher, Dist(rank=0, world=2))


@pytest.mark.parametrize("tasks, local", [("2", "2"), ("4(x2)", "4"), ("3,1", None)])
def test_local_size_for_autotp_under_srun(monkeypatch, tasks, local):
    from tide_ds.engine.dist import local_size_for_autotp

    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks)
    local_size_for_autotp()
    assert os.environ.get("LOCAL_SIZE") == local


# -- checkpoints (single process) ----------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tiny_overrides, tmp_path):
    over = tiny_overrides + [
        "recipe=tide_shared",
        "train.steps=6",
        "train.save_every=3",
        "train.gradient_accumulation_steps=2",
    ]
    full = distill(load_config(None, over + [f"output_dir={tmp_path / 'full'}"]))
    ckpt = tmp_path / "full" / "checkpoints" / "step3"
    assert (ckpt / checkpoint.MARKER).is_file()
    resumed = distill(load_config(None, over + [f"output_dir={tmp_path / 'resumed'}", f"train.resume={ckpt}"]))
    assert resumed["first_step"] == 3
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"][3:]], abs=1e-6)
    assert_same_weights(full["student_dir"], resumed["student_dir"], atol=1e-6)


def test_missing_or_incomplete_checkpoint_stops_before_training(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="train.resume: checkpoint .*nowhere not found"):
        distill(load_config(None, tiny_overrides + [f"train.resume={tmp_path / 'nowhere'}"]))
    (tmp_path / "ck" / "step2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"step2 is incomplete \(no tide_state.json"):
        distill(load_config(None, tiny_overrides + [f"train.resume={tmp_path / 'ck' / 'step2'}"]))
    assert not (tmp_path / "run").exists()


def test_export_of_a_plain_checkpoint_loads_and_generates(tiny_overrides, tmp_path):
    result = distill(load_config(None, tiny_overrides + ["recipe=ce"]))
    out = checkpoint.export(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "exported"))
    assert_same_weights(result["student_dir"], out, atol=0)


# -- 2 ranks (gloo) ------------------------------------------------------------------------------


def _args(tiny_overrides, out, *extra):
    return [o for o in tiny_overrides if not o.startswith("output_dir=")] + [f"output_dir={out}", *extra]


def _slurm_answers() -> bool:
    """srun on PATH and a controller that answers `scontrol ping` (see docs/distributed.md for one machine)."""
    if not (shutil.which("srun") and shutil.which("scontrol")):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and " is UP" in out.stdout


HAVE_MPI = shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None
HAVE_SLURM = _slurm_answers()
NEEDS_SLURM = pytest.mark.skipif(not HAVE_SLURM, reason="needs srun and a SLURM controller (scontrol ping)")
LAUNCHERS = [
    "deepspeed",
    "torchrun",
    pytest.param("mpirun", marks=pytest.mark.skipif(not HAVE_MPI, reason="needs mpirun and mpi4py")),
    pytest.param("srun", marks=NEEDS_SLURM),
]


# Each launcher once and each recipe on two launchers (CompDemo off and on): the launchers differ in how
# ranks learn who they are, not in what a recipe computes.
LAUNCHER_RECIPES = [
    pytest.param("deepspeed", "tide_cross", id="tide_cross-deepspeed"),
    pytest.param("torchrun", "tide_shared", id="tide_shared-torchrun"),
    pytest.param("mpirun", "tide_shared", id="tide_shared-mpirun", marks=LAUNCHERS[2].marks),
    pytest.param("srun", "tide_cross", id="tide_cross-srun", marks=NEEDS_SLURM),
]


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("launcher, recipe", LAUNCHER_RECIPES)
def test_zero3_student_and_teacher_on_2_ranks_match_one_process(launcher, recipe, tiny_overrides, tmp_path):
    ds = json.loads(Path(ZERO3).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    common = [f"recipe={recipe}", "train.steps=5", "train.warmup_steps=0", "train.lr=3e-3"]
    out, seconds = launch(
        launcher,
        _args(
            tiny_overrides,
            tmp_path / "dist",
            *common,
            f"engine.ds_config={tmp_path / 'zero3.json'}",
            "engine.teacher_placement=zero3",
            "engine.activation_checkpointing=true",  # under ZeRO-3 too: the one process keeps its activations
        ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[rank 1] teacher (zero3): 0.04 MiB of parameters on this rank (of 0.08 MiB)" in out.stdout + out.stderr
    assert "activation checkpointing on" in out.stdout
    dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert dist["world"] == 2 and dist["history"][-1]["loss"] < dist["history"][0]["loss"]
    # one process, plain PyTorch, the same global batch of 4 as 2 accumulation steps of 2
    single = distill(
        load_config(None, _args(tiny_overrides, tmp_path / "one", *common, "train.gradient_accumulation_steps=2"))
    )
    assert [h["loss"] for h in dist["history"]] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    worst = assert_same_weights(dist["student_dir"], single["student_dir"], atol=1e-5, adam_lr=3e-3)
    print(f"{launcher} {recipe}: {seconds:.0f} s for 2 ranks; max |w_2rank - w_1proc| = {worst:.2e}")


@pytest.mark.multirank
@NEEDS_SLURM
def test_srun_distill_on_2_ranks(tiny_overrides, tmp_path):
    """`srun -n2` starts the ranks itself; both train a ZeRO-3 student and teacher, save, and exit 0."""
    ds = json.loads(Path(ZERO3).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    out, seconds = launch(
        "srun",
        _args(
            tiny_overrides,
            tmp_path / "srun",
            "recipe=tide_cross",
            "train.steps=3",
            f"engine.ds_config={tmp_path / 'zero3.json'}",
            "engine.teacher_placement=zero3",
        ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]  # srun: 0 only when every task exits 0
    log = out.stdout + out.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] teacher (zero3): 0.04 MiB of parameters on this rank (of 0.08 MiB)" in log, log[-3000:]
    run = json.loads((tmp_path / "srun" / "metrics.json").read_text())
    assert run["world"] == 2 and len(run["history"]) == 3
    assert all(math.isfinite(h["loss"]) for h in run["history"]), run["history"]
    step = tmp_path / "srun" / "checkpoints" / "step3"
    assert (step / checkpoint.MARKER).is_file()
    for rank in (0, 1):  # each rank wrote its own partition at the end
        assert (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    print(f"srun: distill on 2 ranks, {seconds:.0f} s")


@pytest.mark.multirank
@pytest.mark.slow
def test_the_teacher_keeps_its_dtype_whatever_its_placement(tiny_overrides, tmp_path):
    """A bf16 student with an fp32 teacher: the teacher computes in teacher.dtype whatever the student's
    precision, so replicating it or partitioning it (ZeRO-3, a DeepSpeed engine of its own) gives the
    same losses. (A bf16 teacher with an fp32 student holds too; it takes minutes on CPU.)"""
    common = ["recipe=tide_cross", "train.steps=3", "train.precision=bf16", "teacher.dtype=float32"]
    losses = {}
    for placement in ("replicate", "zero3"):
        out_dir = tmp_path / placement
        args = [*common, f"engine.ds_config={ZERO3}", f"engine.teacher_placement={placement}"]
        out, _ = launch("torchrun", _args(tiny_overrides, out_dir, *args))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        losses[placement] = [h["loss"] for h in json.loads((out_dir / "metrics.json").read_text())["history"]]
    assert losses["zero3"] == pytest.approx(losses["replicate"], abs=1e-6, rel=0), losses


@pytest.mark.multirank
@pytest.mark.slow
def test_zero3_resume_and_export_on_2_ranks(tiny_overrides, tmp_path):
    common = [
        "recipe=tide_cross",
        "train.steps=4",
        "train.save_every=2",
        f"engine.ds_config={ZERO3}",
        "engine.teacher_placement=zero3",
    ]
    out, _ = launch("torchrun", _args(tiny_overrides, tmp_path / "full", *common))
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = tmp_path / "full" / "checkpoints" / "step2"
    out, _ = launch("torchrun", _args(tiny_overrides, tmp_path / "resumed", *common, f"train.resume={ckpt}"))
    assert out.returncode == 0, out.stderr[-3000:]
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["first_step"] == 2
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"][2:]], abs=1e-6)
    assert_same_weights(full["student_dir"], resumed["student_dir"], atol=1e-6)

    # the final ZeRO-3 checkpoint exported to transformers gives the in-engine model's logits
    exported = checkpoint.export(str(tmp_path / "full" / "checkpoints"), str(tmp_path / "exported"))
    a = AutoModelForCausalLM.from_pretrained(exported).eval()
    b = AutoModelForCausalLM.from_pretrained(full["student_dir"]).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-6, rtol=0)
    assert a.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_failure_on_one_rank_stops_every_rank(launcher, tiny_overrides, tmp_path):
    out, seconds = launch(
        launcher,
        _args(tiny_overrides, tmp_path / "fail", "recipe=ce", f"engine.ds_config={ZERO3}", "engine.timeout_s=60"),
        entry="rank_failure_main",
        timeout=300,
    )
    assert out.returncode != 0
    assert "[rank 1] error: RuntimeError: injected failure on this rank" in out.stderr, out.stderr[-3000:]
    assert seconds < 120, seconds


@pytest.mark.multirank
def test_expert_parallel_teacher_equals_the_unsharded_teacher(tmp_path):
    """Each rank feeds its own inputs, so tokens cross ranks both ways in the all_to_alls."""
    out, seconds = launch("torchrun", [str(tmp_path / "ep")], entry="expert_parallel_main", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"ep.rank{rank}.json").read_text())
        assert r["layers"] == 2 and r["max_diff"] <= 1e-5, r
        assert 2 * r["expert_numel"]["sharded"] == r["expert_numel"]["whole"], r  # half the experts
        assert r["param_numel"]["whole"] - r["param_numel"]["sharded"] == r["expert_numel"]["sharded"], r
    print(f"expert parallel, 2 ranks: {seconds:.0f} s; max |h_ep - h| = {r['max_diff']:.1e}")


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun"])  # the deepspeed launcher runs it in the overlap test
def test_distill_with_an_expert_parallel_teacher(launcher, tiny_overrides, llada2_teacher, tmp_path):
    common = ["recipe=tide_shared", f"teacher.path={llada2_teacher}", "train.steps=3", "train.warmup_steps=0"]
    out, seconds = launch(
        launcher,
        _args(
            tiny_overrides,
            tmp_path / "ep",
            *common,
            f"engine.ds_config={ZERO3}",
            "engine.teacher_placement=expert_parallel",
            "engine.ep_size=2",
        ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] teacher \(expert_parallel\): [0-9.]+ MiB of parameters on this rank", log)
    ep = json.loads((tmp_path / "ep" / "metrics.json").read_text())
    assert ep["world"] == 2 and all(math.isfinite(h["loss"]) for h in ep["history"])
    # the same run with the teacher replicated: the same losses
    out, _ = launch(launcher, _args(tiny_overrides, tmp_path / "rep", *common, f"engine.ds_config={ZERO3}"))
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [h["loss"] for h in ep["history"]] == pytest.approx([h["loss"] for h in rep["history"]], abs=1e-5)
    print(f"{launcher}: distill with an expert-parallel teacher, 2 ranks, {seconds:.0f} s")


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_tensor_parallel_teacher_equals_the_unsharded_teacher(launcher, tmp_path):
    """AutoTP, tp_size=2, each rank with its own inputs; torchrun runs it too (LOCAL_SIZE from LOCAL_WORLD_SIZE)."""
    out, seconds = launch(launcher, [str(tmp_path / "tp")], entry="tensor_parallel_main", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"tp.rank{rank}.json").read_text())
        for kind in ("bidirectional", "wedlm"):
            assert r[kind]["max_diff"] <= 1e-5 and r[kind]["head_diff"] == 0, r
            split, whole = r[kind]["params"]
            assert split < 0.6 * whole, r
    print(f"{launcher}: tensor parallel, 2 ranks: {seconds:.0f} s; max |h_tp - h| = {r['wedlm']['max_diff']:.1e}")


@pytest.fixture
def tp_teacher(tiny_assets, tmp_path):
    """A tiny Qwen3 teacher whose heads and MLP split evenly over 2 ranks, on the student's tokenizer."""
    from tiny import decoder

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    path = tmp_path / "tp_teacher"
    decoder("qwen3", vocab_size=len(tok), intermediate_size=128).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed"])  # srun's rank discovery: the zero3 and srun tests
def test_distill_with_a_tensor_parallel_teacher(launcher, tiny_overrides, tp_teacher, tmp_path):
    common = [
        "recipe=tide_shared",
        f"teacher.path={tp_teacher}",
        "train.steps=3",
        "train.warmup_steps=0",
        f"engine.ds_config={ZERO3}",
    ]
    out, seconds = launch(
        launcher,
        _args(tiny_overrides, tmp_path / "tp", *common, "engine.teacher_placement=tensor_parallel", "engine.tp_size=2"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] teacher \(tensor_parallel\): [0-9.]+ MiB of parameters on this rank", log)
    tp = json.loads((tmp_path / "tp" / "metrics.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in tp["history"])
    out, _ = launch(launcher, _args(tiny_overrides, tmp_path / "rep", *common))
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [h["loss"] for h in tp["history"]] == pytest.approx([h["loss"] for h in rep["history"]], abs=1e-5)
    print(f"{launcher}: distill with a tensor-parallel teacher, 2 ranks, {seconds:.0f} s")


def test_every_teacher_placement_the_config_names_has_one_function():
    import typing

    from tide_ds.config import EngineConfig
    from tide_ds.engine.placement import PLACEMENTS

    names = typing.get_args(typing.get_type_hints(EngineConfig)["teacher_placement"])
    assert list(PLACEMENTS) == list(names)
    assert all(fn.__name__ == f"place_{name}" for name, fn in PLACEMENTS.items())
