"""Builds models and tokenizers from a `ModelConfig`, with errors that name the key to fix.

Student kinds: auto, qwen3, llama (a transformers decoder wrapped as a BD3LM).
Teacher kinds: llada2_moe (LLaDA2-style MoE), wedlm (a dense decoder fed the block-diffusion
layout), hf_bidirectional (any transformers decoder or masked LM run bidirectionally), qwen3 /
llama (hf_bidirectional, with the family checked), auto (llada2_moe when the checkpoint says so,
else hf_bidirectional). The checkpoint's config.json `model_type` must agree with the kind.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tide_ds.config import ConfigError, ModelConfig
from tide_ds.models import llada2  # registers model_type "llada2_moe" with the Auto classes
from tide_ds.models.student import BD3LMStudent
from tide_ds.models.teacher import HFBidirectionalTeacher, LLaDA2Teacher, Teacher, WeDLMTeacher

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STUDENT_KINDS = ("auto", "qwen3", "llama")
# kind -> the checkpoint model_types it accepts (None: any)
_KIND_MODEL_TYPES = {"qwen3": {"qwen3"}, "llama": {"llama"}, "llada2_moe": {llada2.MODEL_TYPE}}
# dllm's converted BD3LM checkpoints ("a2d", e.g. dllm-collection/Qwen3-0.6B-diffusion-bd3lm-v0.1): the
# weights of the transformers family they subclass, under their own model_type; read as that family.
A2D_MODEL_TYPES = {"a2d-qwen3": "qwen3", "a2d-qwen2": "qwen2", "a2d-llama": "llama"}


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerBase:
    if not os.path.isdir(path):
        raise ConfigError(f"{key} not found: {path} (give a directory holding a saved tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{key}={path} holds no loadable tokenizer ({e.__class__.__name__}); save one there with save_pretrained"
        ) from None


def checkpoint_model_type(path: str, key: str) -> str:
    """`model_type` from a checkpoint directory's config.json, read without building anything."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{key}={path} has no config.json; give a transformers model directory")
    with open(file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if not model_type:
        raise ConfigError(f"{key}={path}: config.json has no model_type")
    return model_type


def dtype_name(cfg: ModelConfig) -> str:
    """cfg.dtype, with `auto` resolved: the dtype config.json at cfg.path names (transformers writes
    `dtype`, older versions `torch_dtype`), float32 for a new model or a checkpoint naming none."""
    if cfg.dtype != "auto":
        return cfg.dtype
    file = os.path.join(cfg.path, "config.json") if cfg.path is not None else None
    if file is None or not os.path.isfile(file):
        return "float32"
    with open(file, encoding="utf-8") as f:
        config = json.load(f)
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in _DTYPES else "float32"


def model_dtype(cfg: ModelConfig) -> torch.dtype:
    """The torch dtype `dtype_name` names."""
    return _DTYPES[dtype_name(cfg)]


def check_student_checkpoint(model_type: str, key: str) -> None:
    """A student is a transformers decoder (Qwen3 / Llama family, or another native causal LM)."""
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{key} holds a '{model_type}' checkpoint; a BD3LM student is a transformers decoder such as qwen3 or llama"
        )


def check_kind(kind: str, model_type: str, key: str) -> None:
    accepted = _KIND_MODEL_TYPES.get(kind)
    if accepted is not None and model_type not in accepted:
        raise ConfigError(
            f"{key}.kind is '{kind}' but {key}.path holds a '{model_type}' checkpoint "
            f"(model_type in its config.json); set {key}.kind to auto or to the checkpoint's family"
        )


def mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str, key: str) -> int:
    """The id of the mask token; the tokenizer must already know it."""
    tid = _token_id(tokenizer, mask_token)
    if tid is None:
        raise ConfigError(
            f"the tokenizer for {key} has no mask token {mask_token!r}; add it as a special "
            f"token or set diffusion.mask_token to the token it uses"
        )
    return tid


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def ensure_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token: str) -> int:
    """The mask token's id, adding it as a special token when the tokenizer has none."""
    tid = _token_id(tokenizer, mask_token)
    if tid is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
        tid = _token_id(tokenizer, mask_token)
    return tid


def _load(cls, cfg: ModelConfig, key: str, **kwargs):
    try:
        return cls.from_pretrained(cfg.path, dtype=_DTYPES[dtype_name(cfg)], **kwargs)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{key}.path={cfg.path} does not load as a {key} model: {e}") from None
    except Exception as e:  # safetensors reports a truncated or damaged file with its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise ConfigError(
            f"{key}.path={cfg.path}: a weights file is truncated or damaged ({e}); copy the model directory again"
        ) from None


def _causal_lm(
    cfg: ModelConfig, key: str, vocab_size: int | None, log=lambda line: None, within=None
) -> torch.nn.Module:
    """The model of cfg.path (under `within`: built there without its weights, which the caller
    reads), or a new one from cfg.init (under `within`, initialised there)."""
    dtype = _DTYPES[dtype_name(cfg)]
    if cfg.path is not None:
        family = student_family(cfg.path, f"{key}.path")
        check_kind(cfg.kind, family, key)
        if within is None:
            return _load(AutoModelForCausalLM, cfg, key, **a2d_config(cfg.path, family))
        config = a2d_config(cfg.path, family).get("config") or AutoConfig.from_pretrained(cfg.path)
        with within, no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # skipped with the initialisation: tied weights stay one parameter
        return model
    config = fresh_config(cfg, key, vocab_size)
    count = meta_param_count(config)
    log(
        f"{key}: a new {config.model_type} model of {count / 1e6:.2f}M parameters (hidden_size "
        f"{config.hidden_size}, {config.num_hidden_layers} layers, vocabulary {config.vocab_size}), counted "
        f"before any weight is allocated"
    )
    check_param_bound(cfg, config, count, key)
    with within if within is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# What decides a fresh model's size; one left out of `init` takes the family's default (qwen3: 4096 wide,
# 32 layers, about 10B parameters).
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def fresh_config(cfg: ModelConfig, key: str, vocab_size: int | None = None):
    """The transformers config of a new model from `{key}.init`, its keys and head counts checked:
    an unknown key (which transformers would keep as a loose attribute and ignore) is refused."""
    family = cfg.kind if cfg.kind in ("qwen3", "llama") else "qwen3"
    init = dict(cfg.init)
    if vocab_size is not None:
        init.setdefault("vocab_size", vocab_size)
    _require_positive(init, key)
    try:
        config = AutoConfig.for_model(family, **init)
    except Exception as e:  # transformers' own checks of its values (recent ones: huggingface_hub's StrictDataclass*)
        if not isinstance(e, (TypeError, ValueError)) and not type(e).__name__.startswith("StrictDataclass"):
            raise
        raise ConfigError(f"{key}.init is not a valid {family} config: {str(e).splitlines()[-1].strip()}") from None
    known = AutoConfig.for_model(family).to_dict()
    built = config.to_dict()
    for name in init:
        if name not in known and name in built:  # not consumed (as an alias or a legacy name is)
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see transformers' {type(config).__name__}"
            raise ConfigError(f"{key}.init.{name}: unknown key for {family}{hint}")
    check_heads(config, explicit_head_dim="head_dim" in init, key=key)
    return config


def check_heads(config, explicit_head_dim: bool, key: str) -> None:
    """Attention heads split the width (unless head_dim is given) and key/value heads share the heads."""
    width, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not explicit_head_dim and width % heads:
        raise ConfigError(
            f"{key}.init: num_attention_heads={heads} does not divide hidden_size={width}; choose a divisor, "
            f"or set head_dim"
        )
    if heads % kv:
        raise ConfigError(
            f"{key}.init: num_key_value_heads={kv} does not divide num_attention_heads={heads}; choose a divisor"
        )


def _require_positive(init: dict, key: str) -> None:
    for name in (*SIZE_KEYS, "num_key_value_heads", "head_dim", "vocab_size"):
        value = init.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key}.init.{name} must be an integer >= 1, got {value!r}")


def meta_param_count(config) -> int:
    """Parameters of the model `config` builds, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_param_bound(cfg: ModelConfig, config, count: int, key: str) -> None:
    """A new model over `{key}.max_params` is refused, naming the sizes left at the family's defaults."""
    if count <= cfg.max_params:
        return
    defaulted = [f"{name}={getattr(config, name)}" for name in SIZE_KEYS if name not in cfg.init]
    left = f"; left at {config.model_type}'s defaults: {', '.join(defaulted)}" if defaulted else ""
    raise ConfigError(
        f"{key}.init builds a model of {count / 1e9:.2f}B parameters, over {key}.max_params={cfg.max_params}"
        f"{left}; set the sizes in {key}.init, or raise {key}.max_params"
    )


def student_family(path: str, key: str) -> str:
    """The transformers family of a student checkpoint (an a2d type read as the family it subclasses)."""
    model_type = checkpoint_model_type(path, key)
    family = A2D_MODEL_TYPES.get(model_type, model_type)
    check_student_checkpoint(family, key)
    return family


def a2d_config(path: str, family: str) -> dict:
    """from_pretrained arguments for a student checkpoint: an a2d checkpoint's config.json read as its
    family's config; nothing for any other checkpoint."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    if A2D_MODEL_TYPES.get(raw.get("model_type")) != family:
        return {}
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        raw.pop(key, None)
    return {"config": AutoConfig.for_model(family, **raw)}


def build_student(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    mask_token: str,
    log=lambda line: None,
    within=None,
) -> BD3LMStudent:
    """A BD3LM student; the mask token is added to the tokenizer (and the embeddings) if missing.
    A new model (student.init) is checked, and its size given to `log`, before it is allocated.

    within: a context manager (zero.Init) the model is built under: a new model is initialised there,
    a checkpoint's is built without its weights, which the caller reads (`partitioned`). A checkpoint
    whose embeddings must grow for the mask token is built whole as without it (resizing needs them)."""
    if cfg.kind not in STUDENT_KINDS:
        raise ConfigError(
            f"student.kind is '{cfg.kind}'; a student is a transformers decoder: choose one of "
            f"{', '.join(STUDENT_KINDS)}"
        )
    mask_id = ensure_mask_token(tokenizer, mask_token)
    if within is not None and cfg.path is not None and stored_vocab_size(cfg.path) < len(tokenizer):
        log(
            f"student: the embeddings of student.path grow to {len(tokenizer)} rows for the mask token, "
            f"so the student is built whole on every rank before it is partitioned"
        )
        within = None
    model = _causal_lm(cfg, "student", vocab_size=len(tokenizer), log=log, within=within)
    head = model.get_output_embeddings().weight
    if getattr(head, "ds_shape", head.shape)[0] < len(tokenizer):  # a ZeRO-3 partition: its whole shape
        model.resize_token_embeddings(len(tokenizer))
    return BD3LMStudent(model, block_size=block_size, mask_token_id=mask_id, attn_backend=cfg.attn_backend)


def stored_vocab_size(path: str) -> int:
    """vocab_size in a checkpoint's config.json (read without building anything)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f).get("vocab_size", 0)


def partitioned(module: torch.nn.Module) -> bool:
    """Built under zero.Init: every parameter is a ZeRO-3 partition."""
    return all(hasattr(p, "ds_id") for p in module.parameters())


def build_teacher(
    cfg: ModelConfig, mask_token: str, block_size: int | None = None, weights: bool = True, within=None
) -> Teacher:
    """A frozen teacher from `cfg.path`, its class chosen by `cfg.kind` or the checkpoint's model_type.

    block_size is the WeDLM-style teacher's block (teacher.block_size overrides it). weights=False
    builds it without its weights for a placement that reads its own part of them: on the meta
    device (shapes and config only), or under the context manager `within` (e.g. zero.Init)."""
    if cfg.path is None:
        raise ConfigError("teacher.path is not set; the recipe needs a trained teacher model directory")
    model_type = checkpoint_model_type(cfg.path, "teacher.path")
    kind = cfg.kind
    if kind == "auto":
        kind = "llada2_moe" if model_type == llada2.MODEL_TYPE else "hf_bidirectional"
    check_kind(kind, model_type, "teacher")
    if kind == "wedlm" and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"teacher.kind is 'wedlm' but teacher.path holds a '{model_type}' checkpoint; a WeDLM-style "
            f"teacher is a dense transformers decoder (e.g. qwen3, llama)"
        )

    auto = (
        AutoModelForCausalLM
        if kind == "llada2_moe" or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        else AutoModelForMaskedLM
    )
    if weights:
        model = _load(auto, cfg, "teacher")
    else:
        # no initialisation: every weight is read from the checkpoint afterwards
        with torch.device("meta") if within is None else within, no_init_weights():
            model = auto.from_config(AutoConfig.from_pretrained(cfg.path), dtype=_DTYPES[dtype_name(cfg)])
        model.tie_weights()  # skipped with the initialisation: tied weights stay one parameter
    mask_id = teacher_mask_token_id(cfg, model.config, mask_token)
    if kind == "llada2_moe":
        return LLaDA2Teacher(model, mask_id)
    if kind == "wedlm":
        block = cfg.block_size or block_size
        if block is None:
            raise ConfigError("teacher.kind 'wedlm' needs a block size: set teacher.block_size")
        return WeDLMTeacher(model, mask_id, block, order=cfg.block_order, attn_backend=cfg.attn_backend)
    return HFBidirectionalTeacher(model, mask_id, attn_backend=cfg.attn_backend)


def teacher_mask_token_id(cfg: ModelConfig, model_config, mask_token: str) -> int:
    """teacher.mask_token_id, else the teacher tokenizer's `mask_token`, else its own mask token,
    else the checkpoint config's mask_token_id; an id outside the vocabulary is refused."""
    vocab = model_config.vocab_size
    tid = cfg.mask_token_id
    if tid is None:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.path, "teacher.tokenizer" if cfg.tokenizer else "teacher.path")
        tid = _token_id(tokenizer, mask_token)
        if tid is None:
            tid = tokenizer.mask_token_id
    if tid is None:
        tid = getattr(model_config, "mask_token_id", None)
    if tid is None:
        raise ConfigError(
            f"no mask token id for the teacher: its tokenizer has no {mask_token!r} (diffusion.mask_token) "
            f"and no mask token, and its config no mask_token_id; set teacher.mask_token_id"
        )
    if not 0 <= tid < vocab:
        raise ConfigError(
            f"the teacher's mask token id {tid} is outside its vocabulary of {vocab}; "
            f"set teacher.mask_token_id to the id its training used"
        )
    return tid
