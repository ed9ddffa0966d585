"""The main job on a miniature setting: same seed -> identical results.json; finished stages reused."""

import argparse
import os

import pytest

from tide_ds import demo

MINI = [
    "corpus.max_files=16",
    "corpus.vocab_size=600",
    "corpus.holdout_fraction=0.25",
    "corpus.tokenizer_chars=200000",
    "teacher.model={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "num_key_value_heads: 1, head_dim: 16, num_experts: 4, num_experts_per_tok: 2, num_shared_experts: 1, "
    "moe_intermediate_size: 32, first_k_dense_replace: 1, n_group: 2, topk_group: 1, tie_word_embeddings: true}",
    "teacher.train={steps: 3, ar_steps: 1, batch_size: 4, seq_len: 64, log_every: 1}",
    "student_steps=2",
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
    done = os.path.join(tmp_path, "a", "teacher", ".done")
    stamp = os.path.getmtime(done)
    assert run(tmp_path / "a") == first  # every stage reused
    assert os.path.getmtime(done) == stamp
    for name in ("results.md", "plots/loss_terms.png", "plots/tidal_lambda.png", "plots/heldout_bpb.png"):
        assert os.path.isfile(os.path.join(tmp_path, "a", name)), name
    assert os.listdir(os.path.join(tmp_path, "a", "tb", "tide_full"))


def test_unknown_stage_and_recipe_are_refused():
    from tide_ds.config import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        demo.load_job(argparse.Namespace(redo="teach", long=False, recipes=None, overrides=[]))
    with pytest.raises(ConfigError, match="unknown tide"):
        demo.load_job(argparse.Namespace(redo=None, long=False, recipes="tide", overrides=[]))
    with pytest.raises(ConfigError, match="ar_steps=300 must be"):
        demo.load_job(argparse.Namespace(redo=None, long=False, recipes=None, overrides=["teacher.train.ar_steps=300"]))


def test_the_long_run_has_its_own_folder():
    """--long never reuses a short run's finished stages (a stage is reused when its folder is done)."""
    assert demo.output_dir(argparse.Namespace(out=None, long=True)) == "runs/demo_long"
    assert demo.output_dir(argparse.Namespace(out=None, long=False)) == "runs/demo"
    assert demo.output_dir(argparse.Namespace(out="x", long=True)) == "x"
