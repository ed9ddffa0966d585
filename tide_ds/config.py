"""Typed run configuration: YAML file + `key=value` overrides -> nested dataclasses.

Every key is checked against the dataclasses below; an unknown key, a wrong type or a bad value
stops before any work with one line that names the key and the fix. Each section checks its own
values in `__post_init__` (messages name the key within the section; the loader adds the section's
path); `Config.__post_init__` checks what spans sections, and `validate` what needs the file system.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A problem with the user's configuration; the message says what to change."""


def _require(checks) -> None:
    """Raises ConfigError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


SKIP_NEEDS_ONE_PROCESS = (
    "train.nonfinite=skip is for single-process runs; a DeepSpeed run uses train.nonfinite=stop "
    "(then resume from the last checkpoint with a lower train.lr)"
)


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None  # a transformers model directory (None: build from `init`)
    init: dict[str, Any] = field(default_factory=dict)  # config kwargs for a fresh random model
    # student: auto | qwen3 | llama. teacher: auto (from the checkpoint's model_type) | llada2_moe |
    # wedlm | hf_bidirectional | qwen3 | llama (see tide_ds/models/build.py)
    kind: Literal["auto", "qwen3", "llama", "hf_bidirectional", "llada2_moe", "wedlm"] = "auto"
    tokenizer: str | None = None  # defaults to `path`
    # auto: the checkpoint's own (config.json `dtype` / `torch_dtype`), float32 for a new model; the
    # student's is float32 unless DeepSpeed trains it in bf16 (it keeps fp32 master weights)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"  # auto: flex on CUDA, sdpa elsewhere
    mask_token_id: int | None = None  # teacher: overrides the id found through its tokenizer / config
    block_size: int | None = None  # wedlm teacher: its block (None: diffusion.block_size)
    block_order: Literal["x0_xt", "xt_x0"] = "x0_xt"  # wedlm teacher: which half comes first
    targets: str | None = None  # teacher only: a `tide-ds teach` directory read instead of calling it
    max_params: int = 1_000_000_000  # student: a new model (`init`) larger than this is refused

    def __post_init__(self):
        _require(
            [
                (self.block_size is None or self.block_size >= 1, "block_size must be >= 1"),
                (self.max_params >= 1, f"max_params must be >= 1, got {self.max_params}"),
            ]
        )


@dataclass(kw_only=True)
class DiffusionConfig:
    block_size: int = 32
    eps: float = 1e-3  # t ~ U[eps, 1)
    mask_token: str = "<|mask|>"

    def __post_init__(self):
        _require([(self.block_size >= 1, "block_size must be >= 1"), (0.0 < self.eps < 1.0, "eps must be in (0, 1)")])


@dataclass(kw_only=True)
class TidalConfig:
    """TIDAL's knobs, in one place: lambda grows from lambda_init to lambda_max over training
    (`schedule`), scaled by 1 - t along `axis`; rows weighted by `timestep_weight` of their t."""

    lambda_init: float = 0.1
    lambda_max: float = 0.9
    schedule: Literal["cosine", "linear"] = "cosine"
    axis: Literal["both", "training_only", "timestep_only"] = "both"
    timestep_weight: Literal["midrange", "uniform"] = "midrange"

    def __post_init__(self):
        _require(
            (0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
            for name in ("lambda_init", "lambda_max")
        )


@dataclass(kw_only=True)
class TermConfig:
    """One loss term of the run: its weight and, when set, its own hyper-parameters (None: the
    `objective` section's)."""

    weight: float = 1.0
    temperature: float | None = None
    tidal: TidalConfig | None = None

    def __post_init__(self):
        _require(
            [
                (self.weight >= 0, f"weight must be >= 0, got {self.weight}"),
                (self.temperature is None or self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            ]
        )


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Run-wide defaults of the terms' hyper-parameters; `terms.<name>.*` overrides them per term."""

    temperature: float = 2.0
    ce_normalization: Literal["token", "sequence", "batch"] = "token"
    tidal: TidalConfig = field(default_factory=TidalConfig)
    demo_ratio: float = 0.5
    # CompDemo's two teacher passes (true / false); unset: the recipe's preset (on for tide_shared)
    # where a term reads the teacher
    comp_demo: bool | None = None
    shared_vocab_size: int = 0  # ids that KL / TIDAL compare (0: min of both vocabularies)
    kernels: Literal["auto", "twin", "reference"] = "auto"  # fused ops: CUDA/CPU twin, or plain PyTorch

    def __post_init__(self):
        _require(
            [
                (self.temperature > 0, "temperature must be > 0"),
                (self.shared_vocab_size >= 0, "shared_vocab_size must be >= 0 (0: min of both vocabularies)"),
                (0.0 < self.demo_ratio < 1.0, "demo_ratio must be in (0, 1)"),
            ]
        )


@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (embedded demo corpus), a text file/dir, or a prepared dataset dir
    seq_len: int = 128
    max_files: int = 400
    holdout_fraction: float = 0.05
    tokenizer_vocab_size: int = 2048  # for the embedded demo tokenizer
    # prepared data: which answers it trains on (set at `tide-ds prepare`, checked here) and how far
    # rows are EOS-padded (batch: the longest row; block: the row's own next block boundary, the paper's)
    supervise: Literal["as_prepared", "last_turn", "all_turns"] = "as_prepared"
    eos_padding: Literal["batch", "block"] = "batch"

    def __post_init__(self):
        _require(
            [
                (self.seq_len >= 1, f"seq_len must be >= 1 (got {self.seq_len})"),
                (
                    0.0 <= self.holdout_fraction < 1.0,
                    f"holdout_fraction must be in [0, 1) (got {self.holdout_fraction}); held-out rows are never "
                    f"trained on",
                ),
            ]
        )


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8  # per rank and micro-step
    gradient_accumulation_steps: int = 1
    global_batch_size: int = 0  # 0: micro_batch_size x gradient_accumulation_steps x ranks
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision; fp16 is refused (engine/plan.py)
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_batches: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    # sequential: teacher, then student, per micro-batch (the default: least memory, nothing runs at
    # once); overlap: the next micro-batches' teacher calls run under the student's forward and
    # backward (see tide_ds/pipeline/schedule.py and docs/schedule.md)
    scheduler: Literal["sequential", "overlap"] = "sequential"
    teacher_prefetch: int = 1  # overlap: teacher calls in flight ahead of the student
    data_prefetch: int = 4  # micro-batches built ahead on a background thread
    resume: str | None = None  # a checkpoint directory, "latest" (must exist) or "auto" (newest complete, else fresh)
    overwrite: bool = False  # a fresh run may delete another run's checkpoints in output_dir
    # fault tolerance (docs/faults.md)
    keep_last: int = 2  # complete checkpoints kept (0: all); the newest is never deleted
    nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss / gradient norm: stop, or skip the step
    max_nonfinite: int = 10  # with skip: stop after more than this many non-finite steps in a row
    # length in epochs instead of steps (0: train.steps; else steps = ceil(epochs x global batches per epoch));
    # warm-up as a share of the steps (0: train.warmup_steps)
    epochs: float = 0.0
    warmup_ratio: float = 0.0

    def __post_init__(self):
        _require(
            [
                (self.steps >= 1, "steps must be >= 1"),
                (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
                (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
                (self.global_batch_size >= 0, "global_batch_size must be >= 0 (0: derived)"),
                (self.save_every >= 0, "save_every must be >= 0 (0: only at the end)"),
                (self.keep_last >= 0, "keep_last must be >= 0 (0: keep every checkpoint)"),
                (self.max_nonfinite >= 0, "max_nonfinite must be >= 0"),
                (
                    self.teacher_prefetch >= 1,
                    "teacher_prefetch must be >= 1 (teacher calls in flight with scheduler=overlap)",
                ),
                (self.data_prefetch >= 1, "data_prefetch must be >= 1"),
                (self.lr > 0, "lr must be > 0"),
                (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
                (
                    all(0.0 <= b < 1.0 for b in self.betas),
                    f"betas must be two numbers in [0, 1), got {list(self.betas)} (e.g. [0.9, 0.999])",
                ),
                (self.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}"),
                (self.log_every >= 1, f"log_every must be >= 1 (steps between log lines), got {self.log_every}"),
                (
                    self.eval_batches >= 1,
                    f"eval_batches must be >= 1 (held-out micro-batches measured), got {self.eval_batches}",
                ),
                (self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {self.threads}"),
                (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
                (self.epochs >= 0, "epochs must be >= 0 (0: train.steps sets the length)"),
                (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1) (0: train.warmup_steps)"),
            ]
        )


@dataclass(kw_only=True)
class EngineConfig:
    """Distributed execution. Without ds_config and with one process the loop runs plain PyTorch."""

    ds_config: str | None = None  # DeepSpeed JSON (ds_configs/*.json), merged with train.*
    teacher_placement: Literal["replicate", "zero3", "expert_parallel", "tensor_parallel", "megatron"] = "replicate"
    ep_size: int = 1  # expert-parallel group size (teacher_placement=expert_parallel or megatron)
    tp_size: int = 1  # tensor-parallel size (teacher_placement=tensor_parallel or megatron)
    megatron_checkpoint: str | None = None  # megatron: a dist_checkpointing dir (None: teacher.path's safetensors)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 600  # collective timeout: a stuck rank fails the job after this long
    activation_checkpointing: bool = False  # recompute each student layer's activations in backward (less memory)

    def __post_init__(self):
        _require(
            [
                (self.ep_size >= 1, "ep_size must be >= 1"),
                (self.tp_size >= 1, "tp_size must be >= 1"),
                (self.timeout_s >= 1, "timeout_s must be >= 1"),
            ]
        )


@dataclass(kw_only=True)
class Config:
    recipe: str = "tide_shared"
    # explicit terms, replacing the recipe's: {name: weight} or {name: {weight, temperature, tidal}}
    terms: dict[str, float | TermConfig] | None = None
    output_dir: str = "runs/distill"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Not a config key: the dotted keys that the YAML file and overrides set (load_dataclass fills it),
    # so that a DeepSpeed JSON value fills only what the user left unset (tide_ds/engine/plan.py).
    given: frozenset[str] = field(default=frozenset(), repr=False, metadata={"key": False})

    def __post_init__(self):
        """What spans sections: the recipe and its terms, the sequence length against the block size."""
        terms = run_terms(self.recipe, self.terms, self.objective)  # names an unknown recipe or term
        if self.objective.comp_demo and not needs_teacher(terms):
            raise ConfigError(
                f"objective.comp_demo=true but no term reads the teacher (terms: {', '.join(terms)}); add a "
                f"teacher term or set objective.comp_demo=false"
            )
        _require(
            [
                (
                    self.data.seq_len % self.diffusion.block_size == 0,
                    f"data.seq_len ({self.data.seq_len}) must be a multiple of diffusion.block_size "
                    f"({self.diffusion.block_size})",
                ),
                (self.train.nonfinite != "skip" or self.engine.ds_config is None, SKIP_NEEDS_ONE_PROCESS),
            ]
        )


# ---------------------------------------------------------------------------------------------
# Recipes: data, at the bottom of the package so that names are checked when the config loads


@dataclass(frozen=True)
class Recipe:
    terms: dict[str, float] = field(default_factory=dict)
    comp_demo: bool = False  # the teacher runs CompDemo's two passes


TERM_NAMES = ("ce", "kl", "reverse_kl", "calm", "reverse_calm", "tidal")
# The paper's recipes (TIDE section 6). Pipeline A's native recipe is tide_cross, B's tide_shared.
RECIPES: dict[str, Recipe] = {
    "ce": Recipe({"ce": 1.0}),
    "kl": Recipe({"ce": 1.0, "kl": 1.0}),
    "reverse_kl": Recipe({"ce": 1.0, "reverse_kl": 1.0}),
    "calm": Recipe({"ce": 1.0, "calm": 1.0}),
    "tide_cross": Recipe({"ce": 1.0, "reverse_calm": 1.0}),
    "tide_shared": Recipe({"ce": 1.0, "tidal": 1.0}, comp_demo=True),
}


def run_terms(
    recipe: str, terms: dict[str, float | TermConfig] | None = None, objective: ObjectiveConfig | None = None
) -> dict[str, TermConfig]:
    """The run's terms with a positive weight, each with every hyper-parameter filled in: the
    recipe's terms (or the explicit `terms`), the `objective` section's values where a term sets none."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)} (config key 'recipe')")
    objective = objective or ObjectiveConfig()
    given = RECIPES[recipe].terms if terms is None else terms
    out = {}
    for name, spec in given.items():
        if name not in TERM_NAMES:
            raise ConfigError(f"unknown loss term '{name}' in config key 'terms'; choose from {', '.join(TERM_NAMES)}")
        spec = spec if isinstance(spec, TermConfig) else TermConfig(weight=float(spec))
        if spec.weight < 0:
            raise ConfigError(f"terms.{name} has negative weight {spec.weight}; weights must be >= 0")
        if spec.weight > 0:
            tidal = (spec.tidal or objective.tidal) if name == "tidal" else None
            out[name] = TermConfig(
                weight=spec.weight,
                temperature=objective.temperature if spec.temperature is None else spec.temperature,
                tidal=tidal,
            )
    if not out:
        raise ConfigError(f"config key 'terms' gives no term a positive weight ({terms}); the loss would be empty")
    return out


def needs_teacher(terms: dict[str, TermConfig]) -> bool:
    return any(name != "ce" for name in terms)


def uses_comp_demo(recipe: str, terms: dict[str, TermConfig], objective: ObjectiveConfig) -> bool:
    """Whether the teacher runs CompDemo's two passes: objective.comp_demo, or where it is unset the
    recipe's preset; never without a term that reads the teacher."""
    preset = RECIPES[recipe].comp_demo if objective.comp_demo is None else objective.comp_demo
    return preset and needs_teacher(terms)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, check_files: bool = True
) -> Config:
    """Reads a YAML file (optional) and applies `a.b=value` overrides (values parsed as YAML).
    check_files=False leaves model, tokenizer and ds_config paths unchecked (a dry run)."""
    cfg = load_dataclass(Config, path, overrides)
    validate(cfg, check_files=check_files)
    return cfg


def load_dataclass(cls, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Builds dataclass `cls` from a YAML file (optional) and `a.b=value` overrides, checking every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path} (give an existing YAML file to --config)")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}); quote or fix it") from None
    obj = _build(cls, raw, prefix="")
    if "given" in {f.name for f in dataclasses.fields(cls)}:
        obj = dataclasses.replace(obj, given=frozenset(_dotted_keys(raw)))
    return obj


def _dotted_keys(raw: dict[str, Any], prefix: str = ""):
    for key, value in raw.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def _build(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _keys(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(
            f"missing config key '{prefix}{missing[0]}' (required: {', '.join(prefix + m for m in missing)})"
        )
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own check: its message names the key within the section
        raise ConfigError(f"{prefix}{e}") from None


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:  # a mapping's error is the section's, not "not a number"
                errors.insert(0 if isinstance(value, dict) and dataclasses.is_dataclass(a) else len(errors), str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has a bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "5e-5" as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def validate(cfg: Config, check_files: bool = True) -> None:
    """What a run needs beyond its sections' own checks: the models it builds and, with check_files,
    that the paths it reads exist."""
    terms = run_terms(cfg.recipe, cfg.terms, cfg.objective)
    sides = ("student", "teacher") if needs_teacher(terms) else ("student",)
    for side in sides if check_files else ():
        m: ModelConfig = getattr(cfg, side)
        if m.path is not None and not os.path.isdir(m.path):
            raise ConfigError(f"{side}.path not found: {m.path} (give a transformers model directory)")
        if m.tokenizer is not None and not os.path.isdir(m.tokenizer):
            raise ConfigError(f"{side}.tokenizer not found: {m.tokenizer} (give a directory with a saved tokenizer)")
    if check_files and cfg.engine.ds_config is not None and not os.path.isfile(cfg.engine.ds_config):
        raise ConfigError(
            f"engine.ds_config not found: {cfg.engine.ds_config} (give a DeepSpeed JSON, e.g. ds_configs/zero3.json)"
        )
    if cfg.student.path is None and not cfg.student.init:
        raise ConfigError("student: set student.path to a model directory or student.init to a config for a new model")
    if cfg.teacher.init:
        raise ConfigError("teacher.init is not used: a teacher is a trained model loaded from teacher.path; remove it")
    if check_files and cfg.train.device == "cuda" and not torch_has_cuda():
        raise ConfigError("train.device=cuda but this machine has no usable CUDA device; set train.device=cpu or auto")
    if cfg.student.targets is not None:
        raise ConfigError("student.targets is not a student key; teacher targets go in teacher.targets")
    if check_files and cfg.teacher.targets is not None and not os.path.isdir(cfg.teacher.targets):
        raise ConfigError(f"teacher.targets not found: {cfg.teacher.targets} (give a directory from `tide-ds teach`)")
    if needs_teacher(terms) and cfg.teacher.path is None and cfg.teacher.targets is None:
        raise ConfigError(
            f"recipe '{cfg.recipe}' needs a teacher: set teacher.path to a trained model directory "
            f"(or teacher.targets to a `tide-ds teach` directory)"
        )


def torch_has_cuda() -> bool:
    import torch  # here, so that reading a config does not load torch

    return torch.cuda.is_available()


def epoch_steps(epochs: float, rows: int, global_batch: int) -> int:
    """Optimizer steps of `epochs` passes over `rows` training rows (each step one global batch;
    a partial last batch of an epoch is dropped)."""
    return max(1, math.ceil(epochs * (rows // global_batch)))


def warmup_steps(t: TrainConfig) -> int:
    """Warm-up length in optimizer steps: train.warmup_ratio of train.steps when set (rounded up)."""
    return math.ceil(t.warmup_ratio * t.steps) if t.warmup_ratio else t.warmup_steps


def resolved(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """The config as the run will use it, as a plain dict: every section, and every term with its own
    hyper-parameters filled in; plus notes on what is only known once the run starts."""
    out = to_dict(cfg)
    terms = run_terms(cfg.recipe, cfg.terms, cfg.objective)
    out["terms"] = {
        name: {k: v for k, v in dataclasses.asdict(spec).items() if v is not None} for name, spec in terms.items()
    }
    out["objective"]["comp_demo"] = uses_comp_demo(cfg.recipe, terms, cfg.objective)
    notes = [
        f"recipe {cfg.recipe}: {' + '.join(terms)}"
        + (" with CompDemo's two teacher passes" if uses_comp_demo(cfg.recipe, terms, cfg.objective) else "")
    ]
    if "tidal" in terms:
        notes.append("tidal acts on chunks on data prepared for two tokenizers, on tokens with one vocabulary")
    t = cfg.train
    if t.epochs:
        notes.append(f"train.steps: ceil({t.epochs:g} x global batches per epoch), worked out once the data is read")
    if t.warmup_ratio:
        notes.append(f"warm-up: ceil({t.warmup_ratio:g} x train.steps) steps (train.warmup_steps unused)")
    for side in ("student", "teacher") if needs_teacher(terms) else ("student",):
        for key in ("path", "tokenizer"):
            value = getattr(getattr(cfg, side), key)
            if value is not None and not os.path.isdir(value):
                notes.append(
                    f"{side}.{key}={value} is not a local directory (a hub name?): point it at a local "
                    f"copy; the run checks it when it starts"
                )
    return out, notes


def to_dict(cfg) -> dict[str, Any]:
    """Plain YAML-safe dict of a config's keys (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {name: plain(getattr(v, name)) for name in _keys(type(v))}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
