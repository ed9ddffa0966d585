"""The main job on a miniature setting: same seeds -> identical results.json; finished stages (and
per-seed runs) reused; per-seed results summarised as mean, std and paired differences to ce."""

import argparse
import json
import math
import os

import pytest

from tide_ds import demo

MINI = [
    "corpus.max_files=16",
    "corpus.vocab_size=600",
    "corpus.holdout_fraction=0.25",
    "corpus.distill_fraction=0.5",
    "corpus.tokenizer_chars=200000",
    "teacher.model={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "num_key_value_heads: 1, head_dim: 16, num_experts: 4, num_experts_per_tok: 2, num_shared_experts: 1, "
    "moe_intermediate_size: 32, first_k_dense_replace: 1, n_group: 2, topk_group: 1, tie_word_embeddings: true}",
    "teacher.train={steps: 3, ar_steps: 1, batch_size: 4, seq_len: 64, log_every: 1}",
    "student_steps=2",
    "seeds=[0, 1]",
    "eval={ratios: [0.3, 0.7], batches: 1, humaneval_problems: 2, max_new_tokens: 8, samples: 1, sample_new_tokens: 8}",
]


def run(out, redo=None):
    args = argparse.Namespace(out=str(out), redo=redo, long=False, recipes="ce,tide_full", overrides=MINI)
    assert demo.run(args) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
def test_same_seed_same_results_and_reuse(tmp_path):
    first = run(tmp_path / "a")
    assert run(tmp_path / "b") == first
    a = tmp_path / "a"
    done = os.path.join(a, "teacher", ".done")
    stamp = os.path.getmtime(done)
    assert run(a) == first  # every stage reused
    assert os.path.getmtime(done) == stamp
    for name in ("results.md", "plots/loss_terms.png", "plots/tidal_lambda.png", "plots/heldout_bpb.png"):
        assert os.path.isfile(os.path.join(a, name)), name
    assert os.listdir(os.path.join(a, "tb", "tide_full", "seed1"))

    # Resume: a run whose .done marker is missing is redone, and only that one.
    kept = {
        d: os.path.getmtime(a / "students" / d / ".done") for d in ("ce/seed0", "tide_full/seed0", "tide_full/seed1")
    }
    os.remove(a / "students" / "ce" / "seed1" / ".done")
    assert run(a) == first
    assert os.path.isfile(a / "students" / "ce" / "seed1" / ".done")
    assert {d: os.path.getmtime(a / "students" / d / ".done") for d in kept} == kept

    # The summary against the per-seed numbers.
    results = json.loads(first)
    assert results["seeds"] == [0, 1]
    ce, full = results["models"]["ce"], results["models"]["tide_full"]
    assert set(ce["seeds"]) == {"0", "1"}
    r = "0.3"
    ce_b = [ce["seeds"][s]["bpb"][r]["bpb"] for s in ("0", "1")]
    full_b = [full["seeds"][s]["bpb"][r]["bpb"] for s in ("0", "1")]
    assert ce_b[0] != ce_b[1]  # the seed changes the student
    assert ce["summary"]["bpb"][r]["mean"] == pytest.approx((ce_b[0] + ce_b[1]) / 2)
    assert ce["summary"]["bpb"][r]["std"] == pytest.approx(abs(ce_b[0] - ce_b[1]) / math.sqrt(2))
    d = [full_b[0] - ce_b[0], full_b[1] - ce_b[1]]
    assert full["vs_ce"]["bpb"][r]["mean"] == pytest.approx((d[0] + d[1]) / 2)
    assert full["vs_ce"]["bpb"][r]["std"] == pytest.approx(abs(d[0] - d[1]) / math.sqrt(2))
    assert "vs_ce" not in ce and "vs_ce" not in results["models"]["init"]
    md = open(a / "results.md", encoding="utf-8").read()
    assert "| teacher |" in md and "Δbpb@0.3" in md and " ± " in md


def test_unknown_stage_and_recipe_are_refused():
    from tide_ds.config import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        demo.load_job(argparse.Namespace(redo="teach", long=False, recipes=None, overrides=[]))
    with pytest.raises(ConfigError, match="unknown tide"):
        demo.load_job(argparse.Namespace(redo=None, long=False, recipes="tide", overrides=[]))
    with pytest.raises(ConfigError, match="distinct integers"):
        demo.load_job(argparse.Namespace(redo=None, long=False, recipes=None, overrides=["seeds=[1, 1]"]))
    with pytest.raises(ConfigError, match="ar_steps=450 must be"):
        demo.load_job(argparse.Namespace(redo=None, long=False, recipes=None, overrides=["teacher.train.ar_steps=450"]))


def test_the_long_run_has_its_own_folder():
    """--long never reuses a short run's finished stages (a stage is reused when its folder is done)."""
    assert demo.output_dir(argparse.Namespace(out=None, long=True)) == "runs/demo_long"
    assert demo.output_dir(argparse.Namespace(out=None, long=False)) == "runs/demo"
    assert demo.output_dir(argparse.Namespace(out="x", long=True)) == "x"


def test_distillation_set_is_a_fixed_part_of_the_training_files(tmp_path, monkeypatch):
    """The teacher reads every training file, the students' prepared data only the distillation set,
    held-out files neither; the choice is fixed by the file names; a bad fraction is refused first."""
    from tide_ds.config import ConfigError
    from tide_ds.mainjob import data as data_stage
    from tide_ds.mainjob import teacher as teacher_stage

    overrides = MINI
    cfg = demo.load_job(argparse.Namespace(redo=None, long=False, recipes="ce", overrides=overrides))
    train, held = data_stage.split_files(cfg.corpus)
    distill = data_stage.distill_files(cfg.corpus, train)
    assert set(distill) < set(train) and not set(held) & set(train)
    assert 0 < len(distill) < len(train)
    assert data_stage.distill_files(cfg.corpus, list(reversed(train))) == list(reversed(distill))

    read = {}

    def stop_at_teacher(setup, tokenizer, files, out, seed):
        read["teacher"] = list(files)
        raise RuntimeError("teacher reached")

    monkeypatch.setattr(teacher_stage, "pretrain", stop_at_teacher)
    args = argparse.Namespace(out=str(tmp_path / "job"), redo=None, long=False, recipes="ce", overrides=overrides)
    with pytest.raises(RuntimeError, match="teacher reached"):
        demo.run(args)
    assert read["teacher"] == train

    data_dir = tmp_path / "job" / "data"

    def texts(files):
        return {piece for p in files for piece in data_stage.text_pieces(p, cfg.corpus.piece_chars)}

    from datasets import load_from_disk

    rows = {json.loads(line)["text"] for line in open(data_dir / "distill.jsonl", encoding="utf-8")}
    assert rows == texts(distill)
    assert rows - texts(train) == set() and not rows & (texts(held) - texts(train))  # held-out text stays unread
    summary = json.loads((data_dir / "summary.json").read_text())
    assert len(load_from_disk(str(data_dir / "prepared_distill"))) == summary["distill_prepare"]["kept"] > 0
    assert (summary["train_files"], summary["distill_files"]) == (len(train), len(distill))

    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=rf"distill_fraction={bad} must be in \(0, 1\]"):
            demo.load_job(
                argparse.Namespace(redo=None, long=False, recipes=None, overrides=[f"corpus.distill_fraction={bad}"])
            )
    few = [o for o in MINI if not o.startswith("corpus.distill_fraction")] + ["corpus.distill_fraction=1e-4"]
    empty = argparse.Namespace(out=str(tmp_path / "empty"), redo=None, long=False, recipes="ce", overrides=few)
    with pytest.raises(ConfigError, match="selects none of the 10 training files"):
        demo.run(empty)
    assert not os.path.exists(tmp_path / "empty" / "data")  # refused before any work
