"""`tide-ds eval`: bad input stops with one line naming the fix; held-out NLL on a tiny student."""

import pytest
import torch

from tests.tiny import saved_student, word_tokenizer
from tide_ds.cli import main
from tide_ds.eval.cli import parse_tasks
from tide_ds.eval.loss import masked_nll, masked_token_loss


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    return str(path), saved_student(path)


def one_error_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_missing_model_dir(capsys, tmp_path):
    one_error_line(capsys, ["eval", "--model", str(tmp_path / "nope"), "--tasks", "humaneval"], "--model not found")


def test_unknown_task(capsys, student_dir):
    one_error_line(
        capsys, ["eval", "--model", student_dir[0], "--tasks", "nll,mmlu"], "unknown task 'mmlu'", "humaneval"
    )


def test_tokenizer_that_does_not_match(capsys, student_dir, tmp_path):
    other = word_tokenizer()
    other.add_tokens([f"w{i}" for i in range(50)])
    other.save_pretrained(tmp_path)
    one_error_line(
        capsys,
        [
            "eval",
            "--model",
            student_dir[0],
            "--tokenizer",
            str(tmp_path),
            "--tasks",
            "humaneval",
            "--humaneval-problems",
            "1",
        ],
        "does not match the model",
        "--tokenizer",
    )


def test_nll_task_needs_data(capsys, student_dir):
    one_error_line(capsys, ["eval", "--model", student_dir[0], "--tasks", "nll"], "needs --data")


def test_parse_tasks():
    assert parse_tasks("nll, humaneval") == ["nll", "humaneval"]


def test_masked_nll_at_fixed_ratio_matches_a_direct_computation(student_dir):
    student = student_dir[1].eval()
    x0 = torch.randint(1, 27, (3, 8))
    batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}
    got = masked_nll(student, [batch], [1.0, 0.5], seed=3)
    logits = student(torch.full_like(x0, student.mask_token_id), x0)  # ratio 1: everything masked
    want = -torch.log_softmax(logits.float(), -1).gather(-1, x0[..., None]).mean().item()
    assert got["1"] == pytest.approx(want, rel=1e-5)
    assert got["0.5"] == masked_token_loss(student, [batch], seed=3, ratio=0.5)
