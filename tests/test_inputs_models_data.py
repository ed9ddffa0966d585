"""Model configs, data and config values checked like every other key: a typo in `student.init`,
heads that do not split the width, a model far larger than asked for, held-out rows shared with
training, binary or non-UTF-8 text, and the out-of-range values of train, engine, eval and bench.
Each ends in one line before any work; the worst run end to end through the CLI."""

import json
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from tide_ds import cli
from tide_ds.config import ConfigError, ModelConfig
from tide_ds.data.corpus import TextWindows, holdout_rows, read_text, split_text
from tide_ds.models.build import build_student, fresh_config, meta_param_count


def one_line(capsys, argv, *needles) -> str:
    """Runs the CLI, which must stop with exit 2 and one error line holding every needle."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# -- model configs --------------------------------------------------------------------------------


def test_a_typo_in_student_init_is_one_line_within_seconds_through_the_cli(tiny_overrides, tmp_path, capsys):
    typo = "student.init={hidden_sise: 32, num_hidden_layers: 1}"
    message = "student.init.hidden_sise: unknown key for qwen3; did you mean hidden_size?"
    one_line(capsys, ["distill", "--dry-run", typo, "recipe=ce"], message)
    start = time.perf_counter()
    one_line(capsys, ["distill", *tiny_overrides, typo, "recipe=ce"], message)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "run").exists()  # refused before the run took its directory


@pytest.mark.parametrize(
    "init, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads=4 does not divide hidden_size=30"),
        (
            {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 3},
            "num_key_value_heads=3 does not divide num_attention_heads=4",
        ),
        ({"hidden_size": 32, "num_attention_heads": 4}, "num_key_value_heads=32 does not divide"),  # the default
        ({"hidden_size": 0}, "student.init.hidden_size must be an integer >= 1, got 0"),
        ({"num_hidden_layers": -1}, "student.init.num_hidden_layers must be an integer >= 1, got -1"),
        ({"intermediate_siz": 64}, "unknown key for qwen3; did you mean intermediate_size?"),
    ],
)
def test_bad_init_sizes_are_refused_in_one_line(init, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        fresh_config(ModelConfig(init=init), "student", vocab_size=64)


def test_accepted_init_keys_include_those_transformers_consumes():
    # rope_theta is read into rope_parameters and head_dim frees the width from the head count
    init = {"hidden_size": 30, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 1e4}
    config = fresh_config(ModelConfig(init=init), "student", vocab_size=64)
    assert config.rope_parameters["rope_theta"] == 1e4 and config.head_dim == 8
    assert fresh_config(ModelConfig(kind="llama", init={"hidden_size": 32}), "student").model_type == "llama"


def test_the_parameter_count_is_printed_before_allocation_and_matches_the_model():
    from tiny import STUDENT_INIT, word_tokenizer

    tok, lines = word_tokenizer(), []
    student = build_student(ModelConfig(init=STUDENT_INIT), tok, 4, "<|mask|>", log=lines.append)
    real = sum(p.numel() for p in student.parameters())
    assert len(lines) == 1 and f"a new qwen3 model of {real / 1e6:.2f}M parameters" in lines[0]
    config = fresh_config(ModelConfig(init=STUDENT_INIT), "student", vocab_size=len(tok))
    assert meta_param_count(config) == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_a_default_sized_model_is_refused_before_a_weight_is_allocated():
    from tiny import word_tokenizer

    lines = []
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:  # qwen3's defaults: 10.8B parameters, 43 GB in fp32
        build_student(ModelConfig(init={"num_attention_heads": 32}), word_tokenizer(), 4, "<|mask|>", log=lines.append)
    assert time.perf_counter() - start < 20
    assert "student.init builds a model of 10.81B parameters, over student.max_params=1000000000" in str(e.value)
    assert "left at qwen3's defaults: hidden_size=4096, intermediate_size=22016, num_hidden_layers=32" in str(e.value)
    assert len(lines) == 1  # the count was printed first
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    small = ModelConfig(init={**sizes, "num_key_value_heads": 2}, max_params=10)
    with pytest.raises(ConfigError, match="over student.max_params=10; set the sizes"):
        build_student(small, word_tokenizer(), 4, "<|mask|>")


def test_teacher_init_is_refused(capsys):
    one_line(
        capsys,
        ["distill", "--dry-run", "student.init={hidden_size: 32}", "teacher.path=t", "teacher.init={hidden_size: 32}"],
        "teacher.init is not used: a teacher is a trained model loaded from teacher.path; remove it",
    )


# -- data -----------------------------------------------------------------------------------------


def test_one_text_file_splits_into_disjoint_rows_through_the_cli(tiny_overrides, tiny_assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("".join(read_text(p) for p in tiny_assets["files"][:3]), encoding="utf-8")
    over = [*tiny_overrides, f"data.source={text}", "recipe=ce", "train.steps=1", "data.holdout_fraction=0.1"]
    assert cli.main(["distill", *over]) == 0
    train, held = map(int, re.search(r"(\d+) train / (\d+) held-out rows", capsys.readouterr().out).groups())
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    whole = TextWindows([text], tok, 32)
    assert train + held == len(whole) and held == max(1, int(len(whole) * 0.1))


def test_split_text_shares_no_row_and_too_little_data_names_what_is_needed(tmp_path):
    from tiny import word_tokenizer

    tok = word_tokenizer()
    one = tmp_path / "one.txt"
    one.write_text(" ".join("abcdefghij"[i % 10] for i in range(40)), encoding="utf-8")
    train, held = split_text([one], tok, 8, 0.25, "one.txt")
    whole = TextWindows([one], tok, 8).windows
    assert (len(train), len(held)) == (4, 1)  # 41 tokens (with EOS): 5 windows
    assert torch.equal(torch.cat([train.windows, held.windows]), whole)
    with pytest.raises(ConfigError, match=r"gives 1 row\(s\); a held-out split and training need at least 2"):
        split_text([one], tok, 32, 0.05, "one.txt")
    with pytest.raises(ConfigError, match=r"need at least 2 \(1 held out with data.holdout_fraction=0.9, 1 to train"):
        holdout_rows(1, 0.9, "prepared")
    assert holdout_rows(9, 0.9, "prepared") == 8
    assert holdout_rows(100, 0.0, "prepared") == 1  # at least one row is measured


@pytest.mark.parametrize(
    "content, message",
    [
        (b"abc\x00def", "is binary (a NUL byte at offset 3); give UTF-8 text files"),
        ("caf\u00e9 ok".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3); convert it to UTF-8"),
    ],
)
def test_binary_and_non_utf8_text_are_refused_through_the_cli(tiny_overrides, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    one_line(capsys, ["distill", *tiny_overrides, f"data.source={bad}", "recipe=ce"], f"{bad} {message}")


# -- config values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.betas=[0.9, 1.5]", "train.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
        ("train.betas=[0.9]", "config key 'train.betas' must be a list of 2 values"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0 (0: no clipping), got -1.0"),
        ("train.eval_batches=0", "train.eval_batches must be >= 1"),
        ("data.holdout_fraction=1.5", "data.holdout_fraction must be in [0, 1) (got 1.5)"),
        ("data.holdout_fraction=-0.1", "data.holdout_fraction must be in [0, 1)"),
        ("student.max_params=0", "student.max_params must be >= 1"),
        ("teacher.init={a:", "override 'teacher.init={a:': the value is not valid YAML"),
    ],
)
def test_bad_train_and_data_values_are_one_line(capsys, override, message):
    one_line(capsys, ["distill", "--dry-run", "student.init={hidden_size: 32}", "recipe=ce", override], message)


def test_cuda_on_a_machine_without_one_is_one_line(tiny_overrides, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    over = [*tiny_overrides, "recipe=ce", "train.device=cuda"]
    one_line(capsys, ["distill", *over], "train.device=cuda but this machine has no usable CUDA device")
    one_line(capsys, ["bench", "step", "--device", "cuda"], "--device cuda but this machine has no usable CUDA")
    one_line(capsys, ["generate", "--model", "x", "--prompt", "p", "--device", "cuda"], "--device cuda but this")


def test_a_zero_stage_outside_0_to_3_is_one_line(tiny_overrides, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    over = [*tiny_overrides, "recipe=ce", f"engine.ds_config={ds}"]
    one_line(capsys, ["distill", *over], "zero_optimization.stage is 7; ZeRO stages are 0 to 3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "m", "--tasks", "nll", "--batches", "0"], "--batches must be >= 1, got 0"),
        (["eval", "--model", "m", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["eval", "--model", "m", "--ratios", "0.5,0"], "--ratios must be masking ratios in (0, 1], got 0.0"),
        (["bench", "kernel", "--n", "0"], "--n must be >= 1, got 0"),
        (["bench", "step", "--batch", "-2"], "--batch must be >= 1, got -2"),
        (["bench", "schedule", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["bench", "teacher", "--vocab", "0"], "--vocab must be >= 1, got 0"),
        (["bench", "teacher", "--device", "gpu"], "--device is 'gpu'; choose auto, cpu or cuda"),
    ],
)
def test_bad_eval_and_bench_sizes_are_one_line(capsys, argv, message):
    one_line(capsys, argv, message)
