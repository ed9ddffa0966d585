"""The main job's own settings (configs/demo.yaml); the students' distillation settings are a
normal run config (configs/demo_student.yaml) read by `tide_ds.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any


def config_path(name: str) -> str:
    """A config shipped in the package (tide_ds/configs/NAME)."""
    return str(resources.files("tide_ds") / "configs" / name)


@dataclass(kw_only=True)
class CorpusConfig:
    max_files: int = 400  # standard-library files read (sorted), then split by file
    holdout_fraction: float = 0.1  # files held out (by a stable hash of the name) from every stage
    # of the training files, those the students distil on (by another stable hash of the name); the
    # teacher is pretrained on all training files (1.0: the students read them all too)
    distill_fraction: float = 1.0
    piece_chars: int = 360  # each file is cut at line ends into text rows of about this many characters
    vocab_size: int = 3000  # of each trained tokenizer
    tokenizer_chars: int = 4_000_000  # training text read by the tokenizer trainers
    student_max_length: int = 128
    teacher_max_length: int = 160


@dataclass(kw_only=True)
class TeacherTrainConfig:
    steps: int = 300
    ar_steps: int = 100  # of `steps`: causal next-token warm-up before masked diffusion (see mainjob/teacher.py)
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2.0e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    log_every: int = 10


@dataclass(kw_only=True)
class TeacherSetup:
    model: dict[str, Any] = field(default_factory=dict)  # LLaDA2MoeConfig keys
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass(kw_only=True)
class EvalSetup:
    ratios: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.5, 0.7, 0.9])
    batches: int = 8  # held-out batches of 16 rows for NLL and agreement
    agreement_ratio: float = 0.5
    humaneval_problems: int = 164  # 0: skip HumanEval
    max_new_tokens: int = 64
    steps_per_block: int = 8
    samples: int = 3  # generated samples shown per model
    sample_new_tokens: int = 48


@dataclass(kw_only=True)
class LongRun:
    teacher_steps: int = 1500
    student_steps: int = 1000
    humaneval_problems: int = 164


@dataclass(kw_only=True)
class MainJobConfig:
    seed: int = 0  # of the data order and noise of the teacher's pretraining (the teacher is trained once)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one student per recipe and seed
    threads: int = 1  # per process, fixed (same seed, same numbers); one thread also degrades least on a busy machine
    parallel: int = 2  # student runs at once, each its own process
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: TeacherSetup = field(default_factory=TeacherSetup)
    student_steps: int = 200
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {recipe, terms}
    eval: EvalSetup = field(default_factory=EvalSetup)
    long: LongRun = field(default_factory=LongRun)
