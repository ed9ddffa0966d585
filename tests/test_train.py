import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from tide_ds.config import ConfigError, load_config
from tide_ds.objectives import RECIPES
from tide_ds.train import distill


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_and_saves_a_reloadable_student(recipe, tiny_overrides, tmp_path):
    result = distill(load_config(None, tiny_overrides + [f"recipe={recipe}"]))
    hist = result["history"]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert set(RECIPES[recipe].terms) <= set(hist[0])
    model = AutoModelForCausalLM.from_pretrained(result["student_dir"])
    assert model.config.model_type == "qwen3"
    AutoTokenizer.from_pretrained(result["student_dir"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["heldout_loss_after"] == result["heldout_loss_after"]


def test_distillation_moves_the_student_towards_the_teacher(tiny_overrides):
    """With only the KL term, the student's KL to the teacher falls."""
    over = tiny_overrides + ["recipe=kl", "terms={kl: 1.0}", "train.steps=40", "train.lr=3e-3", "train.log_every=1"]
    hist = distill(load_config(None, over))["history"]
    first = sum(h["kl"] for h in hist[:5]) / 5
    last = sum(h["kl"] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_unknown_key_recipe_and_missing_files(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'"):
        load_config(None, tiny_overrides + ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown recipe 'tide_crossx'"):
        load_config(None, tiny_overrides + ["recipe=tide_crossx"])
    with pytest.raises(ConfigError, match="unknown loss term 'klx'"):
        load_config(None, tiny_overrides + ["terms={klx: 1}"])
    with pytest.raises(ConfigError, match="no term a positive weight"):
        load_config(None, tiny_overrides + ["terms={ce: 0}"])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="teacher.path not found"):
        load_config(None, tiny_overrides + [f"teacher.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="data.seq_len .* multiple of diffusion.block_size"):
        load_config(None, tiny_overrides + ["data.seq_len=30"])
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(None, tiny_overrides + ["objective.tidal.axis=sideways"])


def test_vocab_mismatch_stops_before_training(tiny_assets, tiny_overrides, tmp_path):
    from tide_ds.data.corpus import train_tokenizer

    other = train_tokenizer(tiny_assets["files"][:5], 300, str(tmp_path / "other_tok"))
    cfg = Qwen3Config(
        vocab_size=len(other),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other_teacher")
    other.save_pretrained(tmp_path / "other_teacher")
    cfg = load_config(None, tiny_overrides + ["recipe=kl", f"teacher.path={tmp_path / 'other_teacher'}"])
    with pytest.raises(ConfigError, match="needs one shared vocabulary.*differs from the student's"):
        distill(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_prints_one_line_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tide_ds.cli", "distill", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config file not found" in lines[0] and "x.yaml" in lines[0]


@pytest.mark.parametrize("recipe", ["tide_cross", "calm", "tide_shared"])
def test_cross_tokenizer_recipes_train_on_prepared_data(recipe, cross_data, tiny_overrides):
    over = tiny_overrides + [
        f"recipe={recipe}",
        f"data.source={cross_data['prepared']}",
        f"teacher.path={cross_data['teacher']}",
        "train.steps=3",
    ]
    hist = distill(load_config(None, over))["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    term = {"tide_cross": "reverse_calm", "calm": "calm", "tide_shared": "tidal"}[recipe]
    assert any(h[term] != 0 for h in hist)  # the chunk term is live


def test_shared_vocab_recipe_on_cross_tokenizer_data_stops(cross_data, tiny_overrides):
    over = tiny_overrides + [
        "recipe=kl",
        f"data.source={cross_data['prepared']}",
        f"teacher.path={cross_data['teacher']}",
    ]
    with pytest.raises(ConfigError, match="uses kl, which needs one shared vocabulary.*prepared for two tokenizers"):
        distill(load_config(None, over))
