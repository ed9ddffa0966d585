"""Models: the BD3LM student and the teachers, built from config."""

from tide_ds.models.build import build_student, build_teacher, load_tokenizer
from tide_ds.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModel, LLaDA2MoeModelLM
from tide_ds.models.student import BD3LMStudent
from tide_ds.models.teacher import (
    HFBidirectionalTeacher,
    LLaDA2Teacher,
    Teacher,
    WeDLMTeacher,
)

__all__ = [
    "BD3LMStudent",
    "HFBidirectionalTeacher",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDA2Teacher",
    "Teacher",
    "WeDLMTeacher",
    "build_student",
    "build_teacher",
    "load_tokenizer",
]
