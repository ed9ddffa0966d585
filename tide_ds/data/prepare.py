"""`tide-ds prepare`: tokenize a chat or text dataset for student and teacher and align it, once.

Reads JSONL / JSON / Parquet files or local datasets (`save_to_disk` directories), renders every
row with each side's chat template, tokenizes both sides with `datasets.map`, aligns the response
contents into chunks, truncates both sides consistently, and writes a `save_to_disk` dataset plus
`prepare_report.json` (rows kept, rows dropped and why, chunk statistics). Training reads the result
with `load_prepared` and never tokenizes again. See docs/prepare.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from tide_ds.config import ConfigError, load_dataclass
from tide_ds.data.chat import AUTO_COLUMNS
from tide_ds.data.rows import JSON_COLUMN, OUTPUT_COLUMNS, STAT_COLUMNS, RowPreparer, Side

REPORT_NAME = "prepare_report.json"
JSON_SUFFIXES = (".jsonl", ".json")
PEEK_ROWS = 1000  # JSON rows read up front to find the column


@dataclass(kw_only=True)
class SideConfig:
    tokenizer: str  # a tokenizer directory (anything transformers' AutoTokenizer loads)
    max_length: int  # tokens per row; the paper uses 512 (student) and 1024 (teacher)
    chat_template: str | None = None  # None: the tokenizer's own, "plain" if it has none; "plain"; or Jinja text


@dataclass(kw_only=True)
class PrepareConfig:
    data_files: list[str]  # .jsonl / .json / .parquet files or save_to_disk directories
    output_dir: str
    student: SideConfig
    teacher: SideConfig
    pipeline: Literal["cross", "shared"] = "cross"  # shared: one vocabulary, two chat templates (pipeline B)
    column: str = "auto"  # "auto": each row's "messages", else its "text"; or one column's name
    supervise: Literal["all_turns", "last_turn"] = "all_turns"  # last_turn: the paper's (earlier turns are prompt)
    split: str = "train"  # for a directory holding a DatasetDict
    max_samples: int | None = None  # read at most this many rows (all files together)
    num_proc: int = 1  # processes for datasets.map
    batch_size: int = 256  # rows per datasets.map call
    overwrite: bool = False  # replace an existing output_dir
    cache_dir: str | None = None  # where intermediate files go (default: a temporary directory)


def validate(cfg: PrepareConfig) -> None:
    for path in cfg.data_files:
        if not os.path.exists(path):
            raise ConfigError(f"data file not found: {path} (fix data_files)")
        if os.path.isfile(path) and not path.endswith(JSON_SUFFIXES + (".parquet",)):
            raise ConfigError(
                f"data file {path}: unknown format; use .jsonl, .json, .parquet or a save_to_disk directory"
            )
    checks = [
        (bool(cfg.data_files), "data_files is empty; list the .jsonl / .json / .parquet files or dataset directories"),
        (cfg.student.max_length >= 1, "student.max_length must be >= 1"),
        (cfg.teacher.max_length >= 1, "teacher.max_length must be >= 1"),
        (cfg.num_proc >= 1, "num_proc must be >= 1"),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.max_samples is None or cfg.max_samples >= 1, "max_samples must be >= 1 (or null for all rows)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for side in ("student", "teacher"):
        if not os.path.isdir(getattr(cfg, side).tokenizer):
            raise ConfigError(
                f"{side}.tokenizer not found: {getattr(cfg, side).tokenizer} (give a tokenizer directory)"
            )
    if os.path.exists(cfg.output_dir) and os.listdir(cfg.output_dir) and not cfg.overwrite:
        raise ConfigError(f"output_dir {cfg.output_dir} is not empty; choose another or set overwrite=true")


def prepare(cfg: PrepareConfig) -> dict:
    """Runs the preparation; returns the report (also written to output_dir)."""
    import datasets

    validate(cfg)
    started = time.time()
    student, teacher = _load_sides(cfg)
    with tempfile.TemporaryDirectory(dir=cfg.cache_dir, prefix="tide-prepare-") as tmp:
        # Read every source first, so a missing column stops before any tokenization.
        sources = []
        remaining = cfg.max_samples
        for path in cfg.data_files:
            rows = _read(path, cfg, tmp)
            if remaining is not None:
                rows = rows.select(range(min(len(rows), remaining)))
                remaining -= len(rows)
            sources.append((path, rows))
        outputs = []
        for i, (path, rows) in enumerate(sources):
            preparer = RowPreparer(
                cfg.column,
                _side_spec(cfg.student),
                _side_spec(cfg.teacher),
                (student, teacher),
                supervise=cfg.supervise,
            )
            outputs.append(
                rows.map(
                    preparer,
                    batched=True,
                    batch_size=cfg.batch_size,
                    num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                    remove_columns=rows.column_names,
                    features=_output_features(),
                    cache_file_name=os.path.join(tmp, f"prepared-{i}.arrow"),
                    desc=f"prepare {os.path.basename(path)}",
                )
            )
        prepared = datasets.concatenate_datasets(outputs)
        report = _report(prepared, cfg, student, teacher)
        if report["kept"] == 0:
            dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "no rows read"
            raise ConfigError(
                f"prepare kept 0 of {report['rows']} rows ({dropped}); nothing written to "
                f"{cfg.output_dir}: check data_files and column, or raise student/teacher.max_length"
            )
        report["tokenizers"] = {
            "student": vocab_fingerprint(student.tokenizer),
            "teacher": vocab_fingerprint(teacher.tokenizer),
        }
        kept = prepared.filter(
            lambda reasons: [r == "" for r in reasons], input_columns=["skip_reason"], batched=True, keep_in_memory=True
        ).remove_columns(list(STAT_COLUMNS))
        if os.path.exists(cfg.output_dir):
            shutil.rmtree(cfg.output_dir)
        kept.save_to_disk(cfg.output_dir)
    report["seconds"] = round(time.time() - started, 2)
    with open(os.path.join(cfg.output_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def load_prepared(path: str):
    """The prepared dataset at `path` (from `tide-ds prepare`), checked for its columns."""

    if not os.path.isdir(path):
        raise ConfigError(f"prepared dataset not found: {path} (run `tide-ds prepare --config FILE` first)")
    data = _load_from_disk(path)
    missing = [c for c in OUTPUT_COLUMNS if c not in data.column_names]
    if missing:
        raise ConfigError(
            f"{path} is not a prepared dataset (missing columns {', '.join(missing)}); make it with `tide-ds prepare`"
        )
    return data


def read_report(path: str) -> dict:
    """The prepare_report.json of the prepared dataset at `path`."""
    file = os.path.join(path, REPORT_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # a copy cut short, a write that never finished
        raise ConfigError(
            f"{file} is truncated or damaged ({type(e).__name__}: {e}); run `tide-ds prepare` for {path} again"
        ) from None


def _load_from_disk(path: str):
    import datasets

    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is a directory but not a saved dataset (no save_to_disk files in it); give "
            f".jsonl / .json / .parquet files or a directory written by save_to_disk"
        ) from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: a truncated .arrow file
        raise ConfigError(
            f"{path} holds a truncated or damaged dataset file ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:200]}); run `tide-ds prepare` for it again"
        ) from None


def vocab_fingerprint(tokenizer, drop: str | None = None) -> str:
    """A short hash of a tokenizer's vocabulary (every token and its id, but `drop`): data prepared
    with one tokenizer is only read by a run whose tokenizer has the same fingerprint."""
    items = sorted(((t, i) for t, i in tokenizer.get_vocab().items() if t != drop), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def check_tokenizers(source_key: str, source: str, report: dict, sides) -> None:
    """Each side must read the ids the data was prepared with: the report's vocabulary fingerprints
    (a report without them: the vocabulary of the tokenizer it names). `sides`: (side, a function
    giving its tokenizer, how to fix a mismatch, a token the side may have added since, or None:
    a student's mask token)."""
    from tide_ds.models import load_tokenizer

    prints = report.get("tokenizers", {})
    for side, load, fix, added in sides:
        prepared_with, tokenizer = report["config"][side]["tokenizer"], load()
        if side in prints:
            same = prints[side] in {vocab_fingerprint(tokenizer), vocab_fingerprint(tokenizer, drop=added)}
        else:
            same = (
                not os.path.isdir(prepared_with)
                or load_tokenizer(prepared_with, source_key).get_vocab() == tokenizer.get_vocab()
            )
        if not same:
            raise ConfigError(
                f"{source_key}={source} was prepared with the {side} tokenizer {prepared_with}, whose "
                f"vocabulary differs from this run's {side} tokenizer; {fix}, or prepare the data "
                f"again with this {side}'s tokenizer"
            )


# ---------------------------------------------------------------------------------------------
# Sides


def _side_spec(side: SideConfig) -> dict:
    return {"path": side.tokenizer, "chat_template": side.chat_template, "max_length": side.max_length}


def _load_sides(cfg: PrepareConfig) -> tuple[Side, Side]:
    student, teacher = Side.load(**_side_spec(cfg.student)), Side.load(**_side_spec(cfg.teacher))
    if student.eos_id is None:
        raise ConfigError(f"student tokenizer {cfg.student.tokenizer} has no EOS token; the student pads with it")
    if cfg.pipeline == "shared":  # pipeline B: the same ids must spell the same bytes
        s_table, t_table = student.token_bytes.table, teacher.token_bytes.table
        n = min(len(s_table), len(t_table))
        if s_table[:n] != t_table[:n]:
            first = next(i for i in range(n) if s_table[i] != t_table[i])
            raise ConfigError(
                f"pipeline 'shared' needs one vocabulary, but id {first} is {s_table[first]!r} for the student and "
                f"{t_table[first]!r} for the teacher; use pipeline=cross for different tokenizers"
            )
    return student, teacher


# ---------------------------------------------------------------------------------------------
# Reading


def _read(path: str, cfg: PrepareConfig, tmp: str):
    """The rows of one source, with only the columns prepare reads. JSON sources become one binary
    column of raw rows, decoded and parsed per row later so that a bad row is counted, not fatal."""
    import datasets

    if path.endswith(JSON_SUFFIXES) and not os.path.isdir(path):
        _pick_columns(path, _json_keys(path), cfg.column)
        features = datasets.Features({JSON_COLUMN: datasets.Value("binary")})
        return datasets.Dataset.from_generator(_json_rows, gen_kwargs={"path": path}, features=features, cache_dir=tmp)
    if os.path.isdir(path):
        data = _load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if cfg.split not in data:
                raise ConfigError(f"{path} has splits {', '.join(data)}, not '{cfg.split}'; set split=NAME")
            data = data[cfg.split]
    elif path.endswith(".parquet"):
        data = datasets.Dataset.from_parquet(path, cache_dir=tmp)
    return data.select_columns(_pick_columns(path, data.column_names, cfg.column))


def _pick_columns(path: str, columns, wanted: str) -> list[str]:
    """The columns to read: `wanted`, or for "auto" whichever of messages / text exist."""
    columns = list(columns)
    if wanted == "auto":
        present = [name for name in AUTO_COLUMNS if name in columns]
        if not present:
            raise ConfigError(
                f"{path} has neither a 'messages' nor a 'text' column "
                f"(columns: {', '.join(columns) or 'none'}); set column=NAME"
            )
        return present
    if wanted not in columns:
        raise ConfigError(
            f"column '{wanted}' not found in {path} (columns: {', '.join(columns) or 'none'}); set column=NAME"
        )
    return [wanted]


def _json_rows(path: str):
    """Yields each row's raw JSON as bytes (a JSONL line, or an element of a JSON list)."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield {JSON_COLUMN: line}
        return
    for row in _json_list(path):
        # ASCII JSON: invalid UTF-8 (read as lone surrogates) stays escaped, and fails the row later.
        yield {JSON_COLUMN: json.dumps(row).encode("ascii")}


def _json_list(path: str) -> list:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")  # bad bytes fail their row later
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}); use a list of rows, or JSONL with one row per line"
        ) from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path} must hold a JSON list of rows, not a {type(rows).__name__}")
    return rows


def _json_keys(path: str) -> set[str]:
    """Keys of the first rows that parse (to find the column before reading everything)."""
    keys: set[str] = set()
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for _, line in zip(range(PEEK_ROWS), f):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                keys.update(row if isinstance(row, dict) else ())
    else:
        for row in _json_list(path)[:PEEK_ROWS]:
            keys.update(row if isinstance(row, dict) else ())
    return keys


def _output_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features(
        {
            "input_ids": ids,
            "labels": ids,
            "chunk_ids": ids,
            "teacher_input_ids": ids,
            "teacher_chunk_ids": ids,
            "num_chunks": Value("int32"),
            "skip_reason": Value("string"),
            "response_bytes": Value("int64"),
            "chunk_bytes": Value("int64"),
            "chunk_tokens": Value("int64"),
            "teacher_chunk_tokens": Value("int64"),
            "truncated": Value("bool"),
        }
    )


# ---------------------------------------------------------------------------------------------
# Report


def _report(prepared, cfg: PrepareConfig, student: Side, teacher: Side) -> dict:
    import pyarrow.compute as pc

    table = prepared.data

    def total(name: str) -> int:
        return int(pc.sum(table.column(name)).as_py() or 0)

    def tokens(name: str) -> int:
        return int(pc.sum(pc.list_value_length(table.column(name))).as_py() or 0)

    reasons = collections.Counter(table.column("skip_reason").to_pylist())
    kept = reasons.pop("", 0)
    chunks = total("num_chunks")
    response_bytes, chunk_bytes = total("response_bytes"), total("chunk_bytes")
    return {
        "rows": len(prepared),
        "kept": kept,
        "dropped": dict(sorted(reasons.items())),
        "truncated": total("truncated"),
        "tokens": {"student": tokens("input_ids"), "teacher": tokens("teacher_input_ids")},
        "chunks": chunks,
        "mean_chunk_bytes": round(chunk_bytes / chunks, 3) if chunks else 0.0,
        "mean_chunk_tokens": {
            "student": round(total("chunk_tokens") / chunks, 3) if chunks else 0.0,
            "teacher": round(total("teacher_chunk_tokens") / chunks, 3) if chunks else 0.0,
        },
        "response_bytes": response_bytes,
        "chunk_bytes": chunk_bytes,
        "response_bytes_covered": round(chunk_bytes / response_bytes, 4) if response_bytes else 0.0,
        "student_eos_id": student.eos_id,
        "teacher_pad_id": teacher.tokenizer.pad_token_id
        if teacher.tokenizer.pad_token_id is not None
        else teacher.eos_id,
        "config": dataclasses.asdict(cfg),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file with the PrepareConfig keys (see docs/prepare.md)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_proc=4 student.max_length=512")


def run(args: argparse.Namespace) -> int:
    cfg = load_dataclass(PrepareConfig, args.config, args.overrides)
    report = prepare(cfg)
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    print(f"kept {report['kept']} of {report['rows']} rows (dropped: {dropped}; truncated {report['truncated']})")
    print(
        f"{report['chunks']} chunks, {report['mean_chunk_bytes']} bytes each on average, "
        f"{report['response_bytes_covered']:.1%} of response bytes covered"
    )
    print(f"wrote {cfg.output_dir} and {os.path.join(cfg.output_dir, REPORT_NAME)}")
    return 0
