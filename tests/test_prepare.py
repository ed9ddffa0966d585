"""`tide-ds prepare`: chat rendering, alignment inside message contents, truncation, sources, bad input."""

import json
import os

import numpy as np
import pytest
import tokenizer_assets as assets
import torch

from tide_ds.align import token_byte_table
from tide_ds.cli import main
from tide_ds.config import ConfigError, load_dataclass
from tide_ds.data.chat import SkipRow, conversation_of, render_pair
from tide_ds.data.collate import Collator
from tide_ds.data.prepare import REPORT_NAME, PrepareConfig, load_prepared, prepare
from tide_ds.diffusion import chunk_masked, noise_batch, tokens_of_chunks

CONVERSATIONS = [
    [
        {"role": "user", "content": "Write a function that adds two numbers. 你好!"},
        {"role": "assistant", "content": "def add(a, b):\n\treturn a + b  # café 😀\n\n\nprint(add(1,  2))"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Yes or no?"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because  the   spaces\tand tabs are kept. Ünïcödé ✓"},
    ],
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return str(path)


def make_config(raw: dict) -> PrepareConfig:
    """A PrepareConfig through the same loader as the command line (JSON values are YAML)."""
    return load_dataclass(PrepareConfig, None, [f"{key}={json.dumps(value)}" for key, value in raw.items()])


def sides(student=None, teacher=None, student_max=512, teacher_max=1024) -> dict:
    return {
        "student": {"tokenizer": student or assets.qwen_dir(), "max_length": student_max},
        "teacher": {"tokenizer": teacher or assets.mistral_dir(), "max_length": teacher_max},
    }


def check_rows(data, student_path, teacher_path, teacher_drops_whitespace=False):
    """Every prepared row against the definitions: chunks spell equal bytes on both sides, ids run
    0..n-1 in order, chunk tokens are response tokens, columns are int32. A WordPiece teacher's
    pieces do not hold the whitespace between words."""
    s_table = token_byte_table(assets.load(student_path))
    t_table = token_byte_table(assets.load(teacher_path))
    assert data.features["input_ids"].feature.dtype == "int32"
    assert data.features["teacher_chunk_ids"].feature.dtype == "int32"
    for row in data:
        ids, labels, chunks = map(np.asarray, (row["input_ids"], row["labels"], row["chunk_ids"]))
        t_ids, t_chunks = np.asarray(row["teacher_input_ids"]), np.asarray(row["teacher_chunk_ids"])
        n = row["num_chunks"]
        assert len(ids) == len(labels) == len(chunks) and len(t_ids) == len(t_chunks)
        assert ((labels == -100) | (labels == ids)).all()
        assert (labels[chunks >= 0] != -100).all()  # no chunk in the prompt
        for side in (chunks, t_chunks):
            present = side[side >= 0]
            assert (np.diff(present) >= 0).all() and sorted(set(present.tolist())) == list(range(n))
        for c in range(n):
            s_text = b"".join(s_table[i] for i in ids[chunks == c])
            t_text = b"".join(t_table[i] for i in t_ids[t_chunks == c])
            if t_chunks[0] == c and t_text[:1] == b" " != s_text[:1]:
                t_text = t_text[1:]  # a SentencePiece dummy prefix on the very first token is not text
            if teacher_drops_whitespace:
                s_text = b"".join(s_text.split())
            assert s_text == t_text and s_text
            for side in (chunks, t_chunks):  # a chunk is one run of tokens
                at = np.flatnonzero(side == c)
                assert at[-1] - at[0] + 1 == len(at)
        if n:  # the teacher's sequence ends with its last chunk token, as in the paper's runs
            assert t_chunks[-1] == n - 1


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_pair_finds_contents_and_response_turns():
    qwen, mistral = assets.load(assets.qwen_dir()), assets.load(assets.mistral_dir())
    student, teacher = render_pair(CONVERSATIONS[1], (qwen, qwen.chat_template), (mistral, assets.INST))
    data = student.text.encode()
    assert [data[a:b].decode() for a, b in student.contents] == ["Yes", CONVERSATIONS[1][4]["content"]]
    assert [data[a:b].decode() for a, b in student.responses] == [
        "Yes<|im_end|>\n",
        CONVERSATIONS[1][4]["content"] + "<|im_end|>\n",
    ]
    t_data = teacher.text.encode()
    assert [t_data[a:b].decode() for a, b in teacher.contents] == ["Yes", CONVERSATIONS[1][4]["content"]]


def test_a_user_content_equal_to_template_text_is_found_in_its_own_turn():
    qwen = assets.load(assets.qwen_dir())
    conversation = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "user"}]
    student, _ = render_pair(conversation, (qwen, qwen.chat_template), (qwen, qwen.chat_template))
    a, b = student.contents[0]
    assert student.text.encode()[:a].endswith(b"<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"other": 1}, "missing_column"),
        ({"messages": "not a list"}, "bad_messages"),
        ({"messages": [{"role": "user"}]}, "bad_messages"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
        (
            {"messages": [{"role": "user", "content": "q \ud800"}, {"role": "assistant", "content": "a"}]},
            "invalid_utf8",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_response"),
        ({"text": b"\xff\xfe"}, "invalid_utf8"),
        ({"text": ""}, "empty_content"),
    ],
)
def test_bad_rows_are_refused_with_a_reason(row, reason):
    with pytest.raises(SkipRow) as e:
        conversation_of(row)
    assert e.value.reason == reason


# ---------------------------------------------------------------------------------------------
# End to end


def test_prepare_cross_tokenizer_jsonl_with_bad_rows(tmp_path):
    bad_lines = [
        b'{"messages": [{"role": "user", "content": "caf\xe9 in latin-1"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [ this is not json',
        b'["a list, not a row"]',
    ]
    rows = [{"messages": c} for c in CONVERSATIONS] + [
        {"text": "A plain text row: the whole text is the response.\n\tIndented line."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"id": 7},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows, bad_lines)
    report = prepare(make_config({"data_files": [path], "output_dir": str(tmp_path / "out"), **sides()}))
    assert report["rows"] == 9 and report["kept"] == 3
    assert report["dropped"] == {"empty_content": 1, "invalid_json": 2, "invalid_utf8": 2, "missing_column": 1}
    assert report["chunks"] > 20 and report["mean_chunk_bytes"] >= 1
    assert report["mean_chunk_tokens"]["student"] >= 1 and report["mean_chunk_tokens"]["teacher"] >= 1
    assert 0.8 < report["response_bytes_covered"] <= 1.0
    assert report["student_eos_id"] == assets.load(assets.qwen_dir()).eos_token_id
    on_disk = json.load(open(tmp_path / "out" / REPORT_NAME))
    assert on_disk["kept"] == 3 and on_disk["config"]["student"]["max_length"] == 512

    data = load_prepared(str(tmp_path / "out"))
    assert data.column_names == [
        "input_ids",
        "labels",
        "chunk_ids",
        "teacher_input_ids",
        "teacher_chunk_ids",
        "num_chunks",
    ]
    check_rows(data, assets.qwen_dir(), assets.mistral_dir())
    qwen = assets.load(assets.qwen_dir())
    first = data[0]
    labelled = qwen.decode([i for i in first["labels"] if i != -100])
    assert labelled == CONVERSATIONS[0][1]["content"] + "<|im_end|>\n"
    text_row = data[2]
    assert all(label != -100 for label in text_row["labels"])
    assert text_row["input_ids"][-1] == qwen.eos_token_id  # plain text ends with EOS

    batch = Collator(report["student_eos_id"], 32, report["teacher_pad_id"])([data[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 32 == 0 and batch["num_chunks"] == max(data["num_chunks"])
    # the training step's chunk-consistent masking reads the batch as it is
    noised = noise_batch(
        batch["input_ids"],
        batch["maskable"],
        mask_id=0,
        t=torch.full((3,), 0.5),
        chunk_ids=batch["chunk_ids"],
        generator=torch.Generator().manual_seed(0),
    )
    active = chunk_masked(noised.masked, batch["chunk_ids"], batch["num_chunks"])
    assert active.any()
    assert torch.equal(tokens_of_chunks(active, batch["chunk_ids"]), noised.masked & (batch["chunk_ids"] >= 0))
    teacher_masked = tokens_of_chunks(active, batch["teacher_chunk_ids"])
    assert not (teacher_masked & ~batch["teacher_attention_mask"]).any()


def test_content_a_template_changes_is_skipped(tmp_path):
    from transformers import AutoTokenizer

    # a teacher template that upper-cases contents: they cannot be found on its side
    teacher = AutoTokenizer.from_pretrained(assets.mistral_dir())
    teacher.chat_template = assets.INST.replace("message['content']", "(message['content'] | upper)")
    teacher_dir = str(tmp_path / "upper")
    teacher.save_pretrained(teacher_dir)
    rows = [{"messages": c} for c in CONVERSATIONS]
    rows.append({"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]})
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = prepare(
        make_config({"data_files": [path], "output_dir": str(tmp_path / "out"), **sides(teacher=teacher_dir)})
    )
    assert report["dropped"] == {"content_not_found": 2} and report["kept"] == 1  # digits upper-case to themselves


def test_truncation_keeps_sides_consistent(tmp_path):
    long_answer = " ".join(f"word{i} 词{i}" for i in range(200))
    rows = [
        {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "long prompt " * 100}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = prepare(
        make_config(
            {"data_files": [path], "output_dir": str(tmp_path / "out"), **sides(student_max=96, teacher_max=512)}
        )
    )
    assert report["kept"] == 1 and report["dropped"] == {"student_prompt_too_long": 1} and report["truncated"] == 1
    data = load_prepared(str(tmp_path / "out"))
    check_rows(data, assets.qwen_dir(), assets.mistral_dir())
    row = data[0]
    assert len(row["input_ids"]) == 96 and row["num_chunks"] > 10
    # the teacher is cut where the student's text ends: it never reads further
    qwen, mistral = assets.load(assets.qwen_dir()), assets.load(assets.mistral_dir())
    student_text = qwen.decode(row["input_ids"]).split("assistant\n", 1)[1]
    teacher_text = mistral.decode(row["teacher_input_ids"]).split("[/INST]", 1)[1].strip()
    assert student_text.startswith(teacher_text) and len(teacher_text) > 0.8 * len(student_text)


def test_teacher_prompt_too_long_is_dropped(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "prompt " * 50}, {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(ConfigError, match=r"prepare kept 0 of 1 rows \(teacher_prompt_too_long 1\); nothing written"):
        prepare(
            make_config(
                {
                    "data_files": [write_jsonl(tmp_path / "p.jsonl", rows)],
                    "output_dir": str(tmp_path / "out"),
                    **sides(teacher_max=20),
                }
            )
        )
    assert not (tmp_path / "out").exists()


def test_parquet_dataset_dir_and_wordpiece_teacher(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"messages": c, "source": "x"} for c in CONVERSATIONS]).to_parquet(
        str(tmp_path / "chat.parquet")
    )
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"text": "some plain text, lower case and simple."}, {"text": "Another One With Capitals."}]
            )
        }
    ).save_to_disk(str(tmp_path / "textdir"))
    report = prepare(
        make_config(
            {
                "data_files": [str(tmp_path / "chat.parquet"), str(tmp_path / "textdir")],
                "output_dir": str(tmp_path / "out"),
                **sides(teacher=assets.bert_dir(), teacher_max=512),
            }
        )
    )
    assert report["kept"] == 4 and report["dropped"] == {}
    data = load_prepared(str(tmp_path / "out"))
    check_rows(data, assets.qwen_dir(), assets.bert_dir(), teacher_drops_whitespace=True)
    # BERT (no chat template: the plain one) lower-cases: the capitalised words do not align
    assert data[2]["num_chunks"] > data[3]["num_chunks"] > 0


def test_json_list_file_with_a_bad_byte(tmp_path):
    good = json.dumps([{"messages": CONVERSATIONS[0]}, {"text": "second row"}, {"text": "BAD"}, {"text": "not read"}])
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode().replace(b"BAD", b"bad \xff"))  # a BOM, then one bad byte
    report = prepare(
        make_config({"data_files": [str(path)], "output_dir": str(tmp_path / "out"), "max_samples": 3, **sides()})
    )
    assert report["rows"] == 3 and report["kept"] == 2 and report["dropped"] == {"invalid_utf8": 1}


def test_shared_vocabulary_pipeline_pairs_single_tokens(tmp_path):
    # pipeline B: one vocabulary, two chat templates (ChatML for the student, plain for the teacher)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    shared = sides(teacher=assets.qwen_dir())
    shared["teacher"]["chat_template"] = "plain"
    report = prepare(
        make_config({"data_files": [path], "output_dir": str(tmp_path / "out"), "pipeline": "shared", **shared})
    )
    assert report["kept"] == 2 and report["response_bytes_covered"] > 0.85  # a first word may merge with ": "
    data = load_prepared(str(tmp_path / "out"))
    check_rows(data, assets.qwen_dir(), assets.qwen_dir())
    assert report["mean_chunk_tokens"] == {"student": 1.0, "teacher": 1.0}
    for row in data:
        s_ids, t_ids = np.asarray(row["input_ids"]), np.asarray(row["teacher_input_ids"])
        s_chunks, t_chunks = np.asarray(row["chunk_ids"]), np.asarray(row["teacher_chunk_ids"])
        assert (s_ids[s_chunks >= 0] == t_ids[t_chunks >= 0]).all()  # the same token on both sides

    with pytest.raises(ConfigError, match="one vocabulary"):
        prepare(
            make_config({"data_files": [path], "output_dir": str(tmp_path / "out2"), "pipeline": "shared", **sides()})
        )


def test_worker_processes(tmp_path):
    student, teacher = assets.trained_dirs()
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(24)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = prepare(
        make_config(
            {
                "data_files": [path],
                "output_dir": str(tmp_path / "out"),
                "num_proc": 2,
                "batch_size": 4,
                "max_samples": 20,
                **sides(student=student, teacher=teacher),
            }
        )
    )
    assert report["rows"] == 20 and report["kept"] == 20
    check_rows(load_prepared(str(tmp_path / "out")), student, teacher)


# ---------------------------------------------------------------------------------------------
# Errors that stop at once


def test_missing_file_and_unknown_column_stop_at_once(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversation": CONVERSATIONS[0]}])
    base = {"output_dir": str(tmp_path / "out"), **sides()}
    with pytest.raises(ConfigError, match="data file not found: .*nope.jsonl"):
        prepare(make_config({**base, "data_files": [str(tmp_path / "nope.jsonl")]}))
    with pytest.raises(ConfigError, match="neither a 'messages' nor a 'text' column .*conversation"):
        prepare(make_config({**base, "data_files": [path]}))
    with pytest.raises(ConfigError, match="column 'chat' not found"):
        prepare(make_config({**base, "data_files": [path], "column": "chat"}))
    assert not os.path.exists(tmp_path / "out")

    yaml_file = tmp_path / "prepare.yaml"
    yaml_file.write_text(json.dumps({**base, "data_files": [path]}))
    assert main(["prepare", "--config", str(yaml_file)]) == 2
    assert "neither a 'messages' nor a 'text' column" in capsys.readouterr().err
    assert main(["prepare", "--config", str(yaml_file), "colum=messages"]) == 2
    assert "unknown config key 'colum'; did you mean 'column'?" in capsys.readouterr().err
    yaml_file.write_text(json.dumps({"data_files": [path], "output_dir": "x", "student": {"tokenizer": "t"}}))
    assert main(["prepare", "--config", str(yaml_file)]) == 2
    assert "missing config key 'student.max_length'" in capsys.readouterr().err


def test_cli_runs_prepare(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    yaml_file = tmp_path / "prepare.yaml"
    yaml_file.write_text(
        f"data_files: [{path}]\noutput_dir: {tmp_path / 'out'}\n"
        f"student: {{tokenizer: {assets.qwen_dir()}, max_length: 512}}\n"
        f"teacher: {{tokenizer: {assets.mistral_dir()}, max_length: 1024}}\n"
    )
    assert main(["prepare", "--config", str(yaml_file), "batch_size=1"]) == 0
    assert "kept 2 of 2 rows" in capsys.readouterr().out
    assert main(["prepare", "--config", str(yaml_file)]) == 2  # output exists
    assert main(["prepare", "--config", str(yaml_file), "overwrite=true"]) == 0


def test_bench_align_runs(capsys):
    assert main(["bench", "align", "--samples", "50"]) == 0
    out = capsys.readouterr().out
    assert "align (one core)" in out and "samples/s" in out


def test_last_turn_supervision_marks_only_the_last_answer(tmp_path):
    """supervise=last_turn (the paper's): on a 3-turn chat only the last assistant message (and its
    end-of-turn marker) is maskable; every earlier message, answers included, is prompt."""
    chat = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Second answer."},
        {"role": "user", "content": "Three?"},
        {"role": "assistant", "content": "Third and last answer."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    qwen = assets.load(assets.qwen_dir())
    labelled = {}
    for scope in ("last_turn", "all_turns"):
        out = tmp_path / scope
        report = prepare(make_config({"data_files": [path], "output_dir": str(out), "supervise": scope, **sides()}))
        row = load_prepared(str(out))[0]
        labels = np.asarray(row["labels"])
        labelled[scope] = qwen.decode([int(i) for i in labels if i != -100])
        batch = Collator(report["student_eos_id"], 32, report["teacher_pad_id"], eos_padding="block")([row])
        n = len(labels)
        assert batch["maskable"][0, :n].tolist() == (labels != -100).tolist()
    assert labelled["last_turn"] == "Third and last answer.<|im_end|>\n"
    assert labelled["all_turns"].count("answer.") == 3
