"""The paper presets: each passes `tide-ds distill --dry-run` without loading a model or data, and
its resolved values are the official scripts' (scripts/distill_llada2.sh, scripts/distill_wedlm.sh
of the paper's code, with the paper's 10 epochs)."""

import pathlib

import pytest
import yaml

import tide_ds
from tide_ds.cli import main

PAPER = pathlib.Path(tide_ds.__file__).parent / "configs" / "paper"

# The official runs, written out by hand from the scripts and their trainer's defaults.
A = {
    "student.path": "dllm-collection/Qwen3-0.6B-diffusion-bd3lm-v0.1",
    "teacher.path": "inclusionAI/LLaDA2.0-mini",
    "teacher.mask_token_id": 156895,
    "train.micro_batch_size": 8,
    "train.global_batch_size": 64,
}
B = {
    "student.path": "dllm-collection/Qwen3-0.6B-diffusion-bd3lm-v0.1",
    "teacher.path": "tencent/WeDLM-8B-Instruct",
    "teacher.mask_token_id": 151665,
    "teacher.block_order": "x0_xt",
    "objective.shared_vocab_size": 151646,
    "train.micro_batch_size": 10,
    "train.global_batch_size": 80,
}
BOTH = {
    "train.lr": 5e-5,
    "train.epochs": 10,
    "train.warmup_ratio": 0.1,
    "train.min_lr_ratio": 0.0,
    "train.precision": "bf16",
    "train.seed": 42,
    "diffusion.block_size": 32,
    "data.supervise": "last_turn",
    "data.eos_padding": "block",
    "objective.demo_ratio": 0.5,
}
TIDAL = {"lambda_init": 0.1, "lambda_max": 0.9, "schedule": "cosine", "axis": "both"}
EXPECTED = {
    "a_calm": (A, {"ce": {"weight": 1.0}, "calm": {"weight": 1.0, "temperature": 5.0}}),
    "a_tide_cross": (A, {"ce": {"weight": 1.0}, "reverse_calm": {"weight": 1.0, "temperature": 5.0}}),
    "a_tide_shared": (
        A,
        {
            "ce": {"weight": 1.0},
            "tidal": {"weight": 1.0, "temperature": 5.0, "tidal": {**TIDAL, "timestep_weight": "uniform"}},
        },
    ),
    "b_kl": (B, {"ce": {"weight": 1.0}, "kl": {"weight": 1.0, "temperature": 2.0}}),
    "b_tide_shared": (
        B,
        {
            "ce": {"weight": 1.0},
            "tidal": {"weight": 1.0, "temperature": 2.0, "tidal": {**TIDAL, "timestep_weight": "midrange"}},
        },
    ),
    "b_tide_cross": (B, {"ce": {"weight": 1.0}, "reverse_kl": {"weight": 1.0, "temperature": 2.0}}),
}
COMP_DEMO = {"a_tide_shared", "b_tide_shared"}


def test_every_preset_is_listed():
    assert sorted(p.stem for p in PAPER.glob("[ab]_*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_dry_run_prints_the_official_values(name, capsys, monkeypatch):
    import tide_ds.train as train

    def refuse(*a, **k):
        raise AssertionError("a dry run loaded a model or data")

    for fn in ("build_student", "build_teacher", "build_data", "student_tokenizer", "init_distributed"):
        monkeypatch.setattr(train, fn, refuse)
    assert main(["distill", "--config", str(PAPER / f"{name}.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    out = yaml.safe_load(text)
    assert set(out) >= {"recipe", "terms", "student", "teacher", "diffusion", "objective", "data", "train", "engine"}
    side, terms = EXPECTED[name]
    for key, want in {**side, **BOTH}.items():
        section, field = key.split(".")
        assert out[section][field] == want, key
    for term, want in terms.items():
        got = out["terms"][term]
        for k, v in want.items():
            assert got[k] == v, (term, k)
        assert got["temperature"] > 0  # every term shows its own temperature
    assert set(out["terms"]) == set(terms)
    assert ("CompDemo" in text) == (name in COMP_DEMO)
    assert "not a local directory" in text  # hub names: said so, not refused


def test_dry_run_still_refuses_bad_values(capsys):
    assert main(["distill", "--config", str(PAPER / "b_kl.yaml"), "--dry-run", "terms.kl.temperature=0"]) == 2
    assert "terms.kl.temperature must be > 0" in capsys.readouterr().err


def test_comp_demo_is_one_checked_key_defaulting_from_the_recipe():
    from tide_ds.config import ConfigError, load_config
    from tide_ds.pipeline import resolve_terms

    def comp_demo(*over):
        cfg = load_config(None, ["student.path=s", "teacher.path=t", *over], check_files=False)
        return resolve_terms(cfg.recipe, cfg.terms, "shared", cfg.objective).comp_demo

    assert comp_demo("recipe=tide_shared") and not comp_demo("recipe=kl")
    assert not comp_demo("recipe=tide_shared", "terms={ce: 1, kl: 1}", "objective.comp_demo=false")
    assert comp_demo("recipe=kl", "objective.comp_demo=true")
    assert not comp_demo("recipe=tide_shared", "terms={ce: 1}")  # no term reads the teacher
    with pytest.raises(ConfigError, match=r"^objective\.comp_demo=true but no term reads the teacher"):
        load_config(None, ["student.path=s", "recipe=ce", "objective.comp_demo=true"], check_files=False)
