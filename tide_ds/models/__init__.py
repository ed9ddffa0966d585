"""Models: the BD3LM student and the teachers, built from config."""
from tide_ds.models.build import build_student, build_teacher, load_tokenizer
from tide_ds.models.student import BD3LMStudent
from tide_ds.models.teacher import HFBidirectionalTeacher

__all__ = ["BD3LMStudent", "HFBidirectionalTeacher", "build_student", "build_teacher", "load_tokenizer"]
