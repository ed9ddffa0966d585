"""Schedulers (sequential / overlap), the per-rank data path and the metrics log."""

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_engine import ZERO3, _args, assert_same_weights, launch, tp_teacher  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM

from tide_ds.config import ConfigError, load_config
from tide_ds.data.sampler import Prefetch, RankBatches
from tide_ds.diffusion import RowStreams, noise_batch
from tide_ds.objectives import comp_demo_split
from tide_ds.train import distill

KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "time", "overlap_fraction"}
PHASES = {"data", "teacher", "student_fwd", "backward", "optimizer"}


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("recipe, prefetch", [("tide_shared", 1), ("tide_cross", 2)])
def test_overlap_gives_the_losses_and_weights_of_sequential_bitwise(recipe, prefetch, tiny_overrides, tmp_path):
    """CompDemo (tide_shared) and chunk log-probs (tide_cross), gradient accumulation 2, steps
    and accumulation boundaries crossed by the teacher's prefetch."""
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        f"recipe={recipe}",
        "train.steps=3",
        "train.gradient_accumulation_steps=2",
        f"train.teacher_prefetch={prefetch}",
    ]
    seq = distill(load_config(None, over + [f"output_dir={tmp_path / 'seq'}", "train.scheduler=sequential"]))
    ovl = distill(load_config(None, over + [f"output_dir={tmp_path / 'ovl'}", "train.scheduler=overlap"]))
    terms = [k for k in seq["history"][0] if k not in KEYS]
    assert "loss" not in terms and len(terms) >= 2
    for a, b in zip(seq["history"], ovl["history"], strict=True):
        assert [a[k] for k in ["loss", *terms, "grad_norm", "lr"]] == [
            b[k] for k in ["loss", *terms, "grad_norm", "lr"]
        ]
    assert seq["teacher_calls"]["overlapped"] == 0 and ovl["teacher_calls"] == {"total": 6, "overlapped": 5}
    wa, wb = _weights(seq["student_dir"]), _weights(ovl["student_dir"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlap_on_its_own_cuda_stream_gives_the_losses_and_weights_of_sequential(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        "recipe=tide_shared",
        "train.steps=3",
        "train.gradient_accumulation_steps=2",
        "train.device=cuda",
    ]
    seq = distill(load_config(None, over + [f"output_dir={tmp_path / 'seq'}", "train.scheduler=sequential"]))
    ovl = distill(load_config(None, over + [f"output_dir={tmp_path / 'ovl'}", "train.scheduler=overlap"]))
    assert ovl["teacher_calls"]["overlapped"] == 5
    assert [h["loss"] for h in seq["history"]] == pytest.approx([h["loss"] for h in ovl["history"]], abs=1e-6)
    wa, wb = _weights(seq["student_dir"]), _weights(ovl["student_dir"])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_tensors_of_finds_cached_rows_and_nested_targets():
    from tiny import decoder

    from tide_ds.models import BD3LMStudent
    from tide_ds.pipeline import DistillStep, TeacherTargets, resolve_terms
    from tide_ds.pipeline.terms import Rows
    from tide_ds.tree import tensors_of

    step = DistillStep(BD3LMStudent(decoder(vocab_size=64), 4, 63), None, resolve_terms("ce"))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 60, (2, 8), generator=g), "maskable": torch.ones(2, 8, dtype=torch.bool)}
    noised = step.noise(batch, generator=g)
    cached = noised.masked_rows
    head = torch.nn.Parameter(torch.zeros(3, 4))
    targets = TeacherTargets(rows=Rows(torch.ones(5, 4), head), chunk_logprobs=torch.zeros(2, 3))
    found = {id(t) for t in tensors_of((noised, targets))}
    assert {id(cached[0]), id(cached[1]), id(noised.x_t), id(targets.rows.hidden), id(head)} <= found


def test_a_teacher_error_in_the_overlapped_step_reaches_the_caller(tiny_overrides, monkeypatch):
    from tide_ds.pipeline import step as step_module

    calls, teacher_targets = [], step_module.DistillStep.teacher_targets

    def failing(self, noised):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher failed on micro-batch 3")
        return teacher_targets(self, noised)

    monkeypatch.setattr(step_module.DistillStep, "teacher_targets", failing)
    with pytest.raises(RuntimeError, match="teacher failed on micro-batch 3"):
        distill(load_config(None, tiny_overrides + ["recipe=kl", "train.scheduler=overlap", "train.steps=6"]))


def test_overlap_runs_in_turn_until_ready_then_ahead_on_its_worker():
    import threading

    from tide_ds.metrics import Phases
    from tide_ds.pipeline import Overlap

    events, threads = [], set()

    def teacher(noised):
        threads.add(threading.current_thread().name)
        events.append(("teacher", int(noised)))
        return int(noised) * 10

    schedule = Overlap(
        teacher, torch.device("cpu"), Phases(torch.device("cpu")), prefetch=1, ready=lambda: len(events) >= 3
    )
    got = []
    for noised, targets in schedule(torch.arange(6)):
        events.append(("student", int(noised)))
        got.append((int(noised), targets))
    schedule.close()
    assert got == [(k, 10 * k) for k in range(6)]
    assert events[:3] == [("teacher", 0), ("student", 0), ("teacher", 1)]  # in turn until ready
    assert (schedule.calls, schedule.ahead) == (6, 4) and threads == {"tide-ds-teacher"}


SHARDED = ("zero3", "expert_parallel", "tensor_parallel", "megatron")


def test_overlap_with_a_sharded_teacher_on_nccl_is_refused_with_one_line():
    from tide_ds.pipeline import check_overlap

    for placement in SHARDED:
        line = rf"^train\.scheduler=overlap with engine\.teacher_placement={placement} on NCCL: .*"
        with pytest.raises(ConfigError, match=line + r"use train\.scheduler=sequential[^\n]*$"):
            check_overlap("overlap", placement, "nccl")
        check_overlap("overlap", placement, "gloo")  # gloo: each group its own connections
        check_overlap("sequential", placement, "nccl")
    check_overlap("overlap", "replicate", "nccl")  # no teacher collectives
    check_overlap("overlap", "zero3", None)  # one process, no process group


def test_distill_refuses_overlap_with_a_sharded_teacher_on_nccl_before_anything_loads(tiny_overrides, monkeypatch):
    from tide_ds import train
    from tide_ds.engine.dist import Dist

    def never(*args, **kwargs):
        raise AssertionError("loaded before the schedule was checked")

    for name in ("student_tokenizer", "build_data", "build_student", "build_teacher"):
        monkeypatch.setattr(train, name, never)
    monkeypatch.setattr(train, "init_distributed", lambda cfg, deepspeed: Dist(0, 2))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    over = tiny_overrides + [f"engine.ds_config={ZERO3}", "train.scheduler=overlap", "engine.teacher_placement=zero3"]
    with pytest.raises(ConfigError, match="use train.scheduler=sequential"):
        train.distill(load_config(None, over))


def _slow_teacher(finished, delays):
    def teacher(noised):
        time.sleep(delays[int(noised)])
        finished.append(int(noised))
        return int(noised) * 10

    return teacher


def test_overlap_submits_teacher_calls_at_the_same_points_of_the_student_work_whatever_their_speed():
    """Where each teacher call is issued against the student's work depends only on the prefetch
    and the data, never on how long calls take: the same on every rank."""
    import random

    from tide_ds.metrics import Phases
    from tide_ds.pipeline import Overlap

    seen = []
    for seed in range(3):
        rng = random.Random(seed)
        finished = []
        teacher = _slow_teacher(finished, [rng.uniform(0, 0.02) for _ in range(7)])
        schedule = Overlap(teacher, torch.device("cpu"), Phases(torch.device("cpu")), prefetch=2)
        issued = []  # teacher calls issued when the student starts on each micro-batch
        for _ in schedule(torch.arange(7)):
            issued.append(schedule.calls)
            time.sleep(rng.uniform(0, 0.02))  # the student's work
        schedule.close()
        assert finished == list(range(7))  # the worker runs them in order
        seen.append(issued)
    assert seen[0] == [3, 4, 5, 6, 7, 7, 7] and seen[0] == seen[1] == seen[2]


def test_drain_waits_for_every_teacher_call_in_flight():
    from tide_ds.metrics import Phases
    from tide_ds.pipeline import Overlap

    finished = []
    schedule = Overlap(
        _slow_teacher(finished, [0.0] + [0.3] * 5), torch.device("cpu"), Phases(torch.device("cpu")), prefetch=3
    )
    pairs = schedule(torch.arange(6))
    next(pairs)  # micro-batch 0; calls 1, 2, 3 are in flight
    assert schedule.calls == 4 and len(finished) < 4
    schedule.drain()
    assert finished == [0, 1, 2, 3]
    assert [int(n) for n, _ in pairs] == [1, 2, 3, 4, 5]  # the drained results are still handed out
    schedule.close()


def test_the_preemption_save_starts_after_the_teacher_calls_in_flight_finish(monkeypatch):
    from types import SimpleNamespace

    from tide_ds import train
    from tide_ds.engine.dist import Dist
    from tide_ds.metrics import Phases
    from tide_ds.pipeline import Overlap

    finished, at_save = [], []
    schedule = Overlap(
        _slow_teacher(finished, [0.0, 0.3, 0.3]), torch.device("cpu"), Phases(torch.device("cpu")), prefetch=2
    )
    pairs = schedule(torch.arange(3))
    next(pairs)
    monkeypatch.setattr(
        train.checkpoint, "save", lambda engine, cfg, step, tok: at_save.append(list(finished)) or "ckpt"
    )
    engine = SimpleNamespace(dist=Dist())
    cfg = SimpleNamespace(train=SimpleNamespace(steps=5))
    out = train.preempted(engine, cfg, 1, None, signal.SIGTERM, schedule)
    schedule.close()
    assert at_save == [[0, 1, 2]] and out["preempted"] == signal.SIGTERM


class CountingRows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.fetched = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.fetched.append(i)
        return torch.full((8,), i)


def _ranks(dataset, rank, world=4, micro=2, accum=3, noise=None, seed=5):
    def collate(rows):
        ids = torch.stack(rows)
        return {"input_ids": ids, "maskable": torch.ones_like(ids, dtype=torch.bool)}

    def identity(batch, generator):
        return batch

    return RankBatches(
        dataset,
        collate,
        noise or identity,
        global_batch=world * micro * accum,
        micro_batch=micro,
        accumulation=accum,
        rank=rank,
        seed=seed,
    )


def test_a_rank_builds_only_its_own_rows():
    """4 ranks x 3 accumulation steps x 2 rows: each rank fetches its 6 rows per step, no more, and
    the ranks together fetch each row of the global batch exactly once."""
    world, steps = 4, 5
    fetched = []
    for rank in range(world):
        data = CountingRows(100)
        batches = list(_ranks(data, rank).iterate(0, steps))
        assert len(batches) == steps * 3 and all(b["input_ids"].shape == (2, 8) for b in batches)
        assert len(data.fetched) == steps * 3 * 2  # its own rows only
        fetched.append(data.fetched)
    per_epoch = 100 // 24
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(100, generator=torch.Generator().manual_seed(5 + 7919 * epoch))
        got = [i for rank in range(world) for i in fetched[rank][step * 6 : (step + 1) * 6]]
        assert got == order[k * 24 : (k + 1) * 24].tolist()


def test_the_epoch_permutation_is_computed_once_per_epoch(monkeypatch):
    calls = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or randperm(*a, **k))
    list(_ranks(CountingRows(100), rank=0).iterate(0, 10))  # 4 steps per epoch: epochs 0, 1, 2
    assert len(calls) == 3


def test_the_noise_of_a_row_depends_only_on_its_place_in_the_global_batch():
    """Rows noised in a micro-batch of 4 or of 2, padded wider or not: the same t, mask and CompDemo split."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (4, 24), generator=g)
    maskable = torch.rand(4, 24, generator=g) > 0.2
    chunks = torch.arange(24).expand(4, 24) // 2

    def noised(rows, width):
        pad = width - 24
        ids = torch.nn.functional.pad(x0[rows], (0, pad), value=0)
        can = torch.nn.functional.pad(maskable[rows], (0, pad), value=False)
        ch = torch.nn.functional.pad(chunks[rows], (0, pad), value=-1)
        streams = RowStreams([1000 + r for r in rows])
        n = noise_batch(ids, can, 99, chunk_ids=ch, generator=streams)
        m_a, _ = comp_demo_split(n.masked, 0.5, generator=streams)
        return n.t, n.masked[:, :24], n.x_t[:, :24], m_a[:, :24]

    whole = noised([0, 1, 2, 3], 24)
    for rows, width in (([2, 3], 24), ([2, 3], 40), ([1], 64)):
        part = noised(rows, width)
        for a, b in zip(whole, part):
            assert torch.equal(a[rows], b)
    assert whole[1].any() and not whole[1].all()


def test_prefetch_keeps_order_and_raises_where_the_builder_failed():
    def items():
        yield from range(5)
        raise ValueError("row 5 is broken")

    it = Prefetch(items(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="row 5 is broken"):
        next(it)
    it.close()
    done = Prefetch(iter(range(3)), depth=1)
    assert list(done) == [0, 1, 2]
    done.close()


def test_bad_schedule_settings_stop_with_one_line(tiny_overrides):
    with pytest.raises(ConfigError, match="train.scheduler.*choose one of 'sequential', 'overlap'"):
        load_config(None, tiny_overrides + ["train.scheduler=parallel"])
    with pytest.raises(ConfigError, match="train.teacher_prefetch must be >= 1"):
        load_config(None, tiny_overrides + ["train.teacher_prefetch=0"])


def test_metrics_jsonl_has_a_line_per_log_step_with_every_key(tiny_overrides, tmp_path):
    result = distill(
        load_config(
            None,
            tiny_overrides + ["recipe=tide_cross", "train.steps=5", "train.log_every=2", "train.scheduler=overlap"],
        )
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["step"] for r in records] == [0, 2, 4] == [h["step"] for h in result["history"]]
    for r in records:
        assert KEYS | {"ce", "reverse_calm"} <= set(r) and set(r["time"]) == PHASES
        assert r["tokens_per_s"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and 0 <= r["overlap_fraction"] <= 1
        assert r["time"]["teacher"] > 0 and r["time"]["backward"] > 0
    if importlib.util.find_spec("tensorboard") is None:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "tb"))
    tb.Reload()
    assert {"loss", "reverse_calm", "lr", "grad_norm", "tokens_per_s", "time/teacher", "overlap_fraction"} <= set(
        tb.Tags()["scalars"]
    )
    assert [e.step for e in tb.Scalars("loss")] == [0, 2, 4]
    assert [e.value for e in tb.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_a_killed_run_keeps_every_logged_line(tiny_overrides, tmp_path):
    out = tmp_path / "killed"
    args = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        f"output_dir={out}",
        "recipe=ce",
        "train.steps=100000",
        "train.log_every=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tide_ds.cli", "distill", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = out / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        seen = len(path.read_text().splitlines())
        assert seen >= 3, "no metrics written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = path.read_text().splitlines()
    assert len(lines) >= seen
    assert [json.loads(x)["step"] for x in lines] == list(range(len(lines)))


# -- 2 ranks (gloo, deepspeed launcher) ----------------------------------------------------------


@pytest.mark.multirank
@pytest.mark.slow
def test_overlap_matches_sequential_on_2_ranks_for_each_teacher_placement(tiny_overrides, tp_teacher, tmp_path):
    """ZeRO-3 student; replicated, ZeRO-3, expert-parallel and tensor-parallel teacher; CompDemo;
    accumulation 2: all in one launch, each run once per scheduler."""
    from tiny import llada2
    from transformers import AutoTokenizer

    tok_dir = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("student.tokenizer="))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    moe = tmp_path / "llada2"
    llada2(vocab_size=len(tok), num_experts=8, mask_token_id=len(tok) - 1).save_pretrained(moe)
    tok.save_pretrained(moe)
    base = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        "recipe=tide_shared",
        "train.steps=3",
        "train.warmup_steps=0",
        "train.lr=3e-3",
        "train.gradient_accumulation_steps=2",
        f"engine.ds_config={ZERO3}",
    ]
    placements = {
        "replicate": [],
        "zero3": ["engine.teacher_placement=zero3"],
        "expert_parallel": [f"teacher.path={moe}", "engine.teacher_placement=expert_parallel", "engine.ep_size=2"],
        "tensor_parallel": [
            f"teacher.path={tp_teacher}",
            "engine.teacher_placement=tensor_parallel",
            "engine.tp_size=2",
        ],
    }
    runs = [
        {"name": name, "overrides": base + extra, "output_dir": str(tmp_path / name)}
        for name, extra in placements.items()
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    out, seconds = launch(
        "deepspeed", [str(tmp_path / "runs.json"), str(tmp_path / "results.json")], entry="overlap_main", timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(placements)
    for name, r in results.items():
        seq, ovl = r["sequential"], r["overlap"]
        assert len(seq["history"]) == 3
        for a, b in zip(seq["history"], ovl["history"], strict=True):
            for key in ("loss", "ce", "tidal", "grad_norm"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (name, key, a[key], b[key])
        assert seq["teacher_calls"] == {"total": 6, "overlapped": 0}
        # ZeRO-3 runs its first steps in turn (Engine.overlap_ready), then overlaps
        assert ovl["teacher_calls"]["total"] == 6 and ovl["teacher_calls"]["overlapped"] >= 2, (name, ovl)
        worst = assert_same_weights(seq["student_dir"], ovl["student_dir"], atol=1e-5, adam_lr=3e-3)
        print(f"{name}: max |w_overlap - w_sequential| = {worst:.1e}")
    print(f"4 placements x 2 schedulers on 2 ranks: {seconds:.0f} s")


@pytest.mark.multirank
def test_a_teacher_failure_in_an_overlapped_step_stops_every_rank(tiny_overrides, tmp_path):
    out, seconds = launch(
        "deepspeed",
        _args(
            tiny_overrides,
            tmp_path / "fail",
            "recipe=tide_shared",
            "train.scheduler=overlap",
            "train.steps=8",
            "engine.teacher_placement=zero3",
            f"engine.ds_config={ZERO3}",
            "engine.timeout_s=60",
        ),
        entry="teacher_failure_main",
        timeout=300,
    )
    assert out.returncode != 0
    assert "[rank 1] error: RuntimeError: injected teacher failure on this rank" in out.stderr, out.stderr[-3000:]
    assert "in _teacher" in out.stderr  # raised on the worker thread
    assert seconds < 150, seconds  # start-up and five steps on a busy machine; no collective timeout


def test_bench_schedule_prints_both_schedules():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tide_ds.cli",
            "bench",
            "schedule",
            "--length",
            "32",
            "--hidden",
            "32",
            "--vocab",
            "256",
            "--batch",
            "2",
            "--block-size",
            "8",
            "--steps",
            "1",
            "--student-layers",
            "1",
            "--teacher-layers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(x for x in lines if x.startswith("schedule"))
    assert header.split() == ["schedule", "step", "data", "teacher", "student_fwd", "backward", "optimizer", "overlap"]
    for name in ("sequential", "overlap"):
        row = next(x for x in lines if x.startswith(name + " "))
        assert len(row.split()) == 8 and float(row.split()[1]) > 0
    assert "overlap step / max(teacher, student) =" in out.stdout
