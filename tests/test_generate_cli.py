"""`tide-ds a2d`, `tide-ds generate` and `tide-ds bench teacher` end to end on tiny models."""

from __future__ import annotations

import json

from tiny import decoder, word_tokenizer

from tide_ds.cli import main


def ar_checkpoint(path, max_positions=64):
    tokenizer = word_tokenizer(mask_token=None)
    decoder(vocab_size=len(tokenizer), max_position_embeddings=max_positions).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a2d_then_generate(tmp_path, capsys):
    ar, student = ar_checkpoint(tmp_path / "ar"), str(tmp_path / "student")
    assert main(["a2d", "--model", ar, "--out", student, "--block-size", "4", "--dtype", "float32"]) == 0
    with open(f"{student}/config.json") as f:
        assert json.load(f)["bd3lm"] == {"block_size": 4, "mask_token_id": 28}
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                student,
                "--prompt",
                "a b c",
                "--prompt",
                "d",
                "--max-new-tokens",
                "6",
                "--no-stop-at-eos",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line.split()) <= 6 for line in lines)


def test_generate_errors_are_clear(tmp_path, capsys):
    ar = ar_checkpoint(tmp_path / "ar", max_positions=16)
    assert main(["generate", "--model", ar, "--prompt", "a"]) == 2
    assert "not a BD3LM student" in capsys.readouterr().err
    student = str(tmp_path / "student")
    main(["a2d", "--model", ar, "--out", student, "--block-size", "4", "--dtype", "float32"])
    capsys.readouterr()
    assert main(["generate", "--model", student, "--prompt", " ".join("abcdefghijkl"), "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "12 tokens" in err and "max_position_embeddings" in err


def test_bench_teacher_prints_the_figures(capsys):
    assert main(["bench", "teacher", "--batch", "2", "--length", "256", "--vocab", "20000", "--block-rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "full fp32 logits" in out and "calm" in out and "% of full fp32 logits" in out
