"""Builds models and tokenizers from a `ModelConfig`, with errors that name the key to fix."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tide_ds.config import ConfigError, ModelConfig
from tide_ds.models.student import BD3LMStudent
from tide_ds.models.teacher import HFBidirectionalTeacher

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FAMILIES = {"auto": None, "qwen3": "qwen3", "llama": "llama", "hf_bidirectional": None}


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerBase:
    if not os.path.isdir(path):
        raise ConfigError(f"{key} not found: {path} (give a directory holding a saved tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path} holds no loadable tokenizer ({e.__class__.__name__}); save one there with save_pretrained") from None


def mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str, key: str) -> int:
    """The id of the mask token; the tokenizer must already know it."""
    tid = tokenizer.convert_tokens_to_ids(mask_token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer for {key} has no mask token {mask_token!r}; add it as a special "
                          f"token or set diffusion.mask_token to the token it uses")
    return tid


def _causal_lm(cfg: ModelConfig, key: str, vocab_size: int | None) -> torch.nn.Module:
    dtype = _DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    else:
        family = _FAMILIES[cfg.kind] or "qwen3"
        init = dict(cfg.init)
        if vocab_size is not None:
            init.setdefault("vocab_size", vocab_size)
        try:
            config = AutoConfig.for_model(family, **init)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}.init is not a valid {family} config: {e}") from None
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = _FAMILIES[cfg.kind]
    if expected is not None and model.config.model_type != expected:
        raise ConfigError(f"{key}.kind is '{cfg.kind}' but {key}.path holds a '{model.config.model_type}' model; "
                          f"set {key}.kind to auto or to the model's family")
    return model


def build_student(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, block_size: int, mask_token: str) -> BD3LMStudent:
    mask_id = mask_token_id(tokenizer, mask_token, "student")
    model = _causal_lm(cfg, "student", vocab_size=len(tokenizer))
    if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return BD3LMStudent(model, block_size=block_size, mask_token_id=mask_id)


def build_teacher(cfg: ModelConfig, mask_token: str) -> HFBidirectionalTeacher:
    if cfg.path is None:
        raise ConfigError("teacher.path is not set; the recipe needs a trained teacher model directory")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.path, "teacher.tokenizer" if cfg.tokenizer else "teacher.path")
    mask_id = mask_token_id(tokenizer, mask_token, "teacher")
    return HFBidirectionalTeacher(_causal_lm(cfg, "teacher", vocab_size=None), mask_token_id=mask_id)
