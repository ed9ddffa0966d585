"""The run plan, settled before any model is built: plain PyTorch or DeepSpeed, and one value of
every batch, precision and optimizer setting shared by the YAML config and a DeepSpeed JSON.

For each setting in PAIRS, the JSON may hold "auto" (or leave it out): the YAML value is written in.
A concrete JSON value is taken into the run when the YAML did not set that key; when both set it and
they differ, the run stops with a message naming both places. `settle` is pure: it reads the config
and the JSON and returns new objects, so every disagreement is reported in the run's first seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from tide_ds.config import SKIP_NEEDS_ONE_PROCESS, Config, ConfigError

# (path in the DeepSpeed JSON, key in the YAML config's train section)
PAIRS = [
    ("train_micro_batch_size_per_gpu", "micro_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("train_batch_size", "global_batch_size"),
    ("gradient_clipping", "grad_clip"),
    ("optimizer.params.lr", "lr"),
    ("optimizer.params.betas", "betas"),
    ("optimizer.params.weight_decay", "weight_decay"),
]
_PRECISION = {"fp32": (False, False), "bf16": (True, False), "fp16": (False, True)}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How the run executes: `config` is the user's with every train.* value the JSON settles filled in."""

    config: Config
    world: int
    deepspeed: bool  # a DeepSpeed engine (several ranks, or engine.ds_config set); else plain PyTorch


def load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"engine.ds_config {path} must hold a JSON object")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"engine.ds_config {path}: zero_optimization.stage is {stage!r}; ZeRO stages are 0 to 3")
    return ds


def settle(cfg: Config, ds_json: dict[str, Any] | None, world: int) -> tuple[RunPlan, dict[str, Any] | None]:
    """The run plan and the final DeepSpeed config (None: plain PyTorch, one process without a
    ds_config: `ds_json` None and `world` 1). Raises ConfigError on any disagreement."""
    deepspeed = ds_json is not None or world > 1
    if not deepspeed:
        _refuse_fp16(cfg.train.precision, "train.precision=fp16")
        train = _settle_batch(cfg, {}, 1, "config")
        return RunPlan(_student_dtype(dataclasses.replace(cfg, train=train), False), world, deepspeed=False), None
    if cfg.train.nonfinite == "skip":  # several ranks without a ds_config
        raise ConfigError(SKIP_NEEDS_ONE_PROCESS)
    source = cfg.engine.ds_config or "the default DeepSpeed config"
    ds = copy.deepcopy(ds_json if ds_json is not None else {"zero_optimization": {"stage": 0}})
    if "scheduler" in ds:
        raise ConfigError(
            f"{source} has a 'scheduler' section; remove it: the lr schedule comes from "
            f"train.lr, train.warmup_steps and train.min_lr_ratio"
        )
    adopted = {}
    for ds_key, key in PAIRS:
        value = _get(ds, ds_key)
        if value is None or value == "auto" or key == "global_batch_size":  # the batch: checked below
            continue
        if f"train.{key}" in cfg.given and not _same(value, getattr(cfg.train, key)):
            raise ConfigError(
                f"{source} sets {ds_key}={value} but the YAML config sets train.{key}="
                f'{getattr(cfg.train, key)}; set it in one place (or write "auto" in the JSON)'
            )
        adopted[key] = tuple(value) if isinstance(value, list) else value
    precision = _precision(cfg, ds, source)
    _refuse_fp16(precision, f"train.precision=fp16 (or fp16.enabled in {source})")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **adopted, precision=precision))
    cfg = dataclasses.replace(cfg, train=_settle_batch(cfg, ds, world, source))
    return RunPlan(_student_dtype(cfg, True), world, deepspeed=True), _written(cfg, ds)


def _student_dtype(cfg: Config, deepspeed: bool) -> Config:
    """student.dtype=auto is the checkpoint's own only where DeepSpeed trains in bf16 (it casts the
    student to bf16 and keeps fp32 master weights); float32 elsewhere, where the optimizer updates
    the weights in their own dtype."""
    if cfg.student.dtype != "auto" or (deepspeed and cfg.train.precision == "bf16"):
        return cfg
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, dtype="float32"))


def _written(cfg: Config, ds: dict) -> dict:
    """The JSON with the settled values written in."""
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.global_batch_size
    ds["gradient_clipping"] = t.grad_clip
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr=t.lr, betas=list(t.betas), weight_decay=t.weight_decay)
    else:
        ds["zero_allow_untested_optimizer"] = True  # the client torch AdamW
    bf16, fp16 = _PRECISION[t.precision]
    ds.setdefault("bf16", {})["enabled"] = bf16
    ds.setdefault("fp16", {})["enabled"] = fp16
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def _precision(cfg: Config, ds: dict, source: str) -> str:
    flags = {k: _get(ds, f"{k}.enabled") for k in ("bf16", "fp16")}
    concrete = {k: v for k, v in flags.items() if v not in (None, "auto")}
    if not concrete:
        return cfg.train.precision
    bf16, fp16 = bool(concrete.get("bf16", False)), bool(concrete.get("fp16", False))
    if bf16 and fp16:
        raise ConfigError(f"{source} enables both bf16 and fp16; keep one")
    json_precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if json_precision == "fp32" and len(concrete) < 2:  # one flag off says nothing about the other
        return cfg.train.precision
    if "train.precision" in cfg.given and cfg.train.precision != json_precision:
        raise ConfigError(
            f"{source} selects {json_precision} (bf16.enabled/fp16.enabled) but the YAML "
            f"config sets train.precision={cfg.train.precision}; set it in one place"
        )
    return json_precision


def _refuse_fp16(precision: str, where: str) -> None:
    """The fused loss writes its gradients in the forward, in the hidden states' dtype, before the
    backward brings DeepSpeed's fp16 loss scale: in fp16 their small terms would flush to zero."""
    if precision == "fp16":
        raise ConfigError(
            f"{where}: fp16 is not supported (the fused loss computes its gradients before the loss "
            f"scale is applied, so small ones underflow); use train.precision=bf16"
        )


def _settle_batch(cfg: Config, ds: dict, world: int, source: str):
    """The train section with micro batch x accumulation x ranks = global batch settled."""
    t = cfg.train
    global_batch, accumulation = t.global_batch_size, t.gradient_accumulation_steps
    value = _get(ds, "train_batch_size")
    if value not in (None, "auto"):
        if "train.global_batch_size" in cfg.given and global_batch != value:
            raise ConfigError(
                f"{source} sets train_batch_size={value} but the YAML config sets "
                f"train.global_batch_size={global_batch}; set it in one place"
            )
        global_batch = value
    if global_batch == 0:
        global_batch = t.micro_batch_size * accumulation * world
    else:
        per_step = t.micro_batch_size * world
        accumulation, rest = divmod(global_batch, per_step)
        if rest or accumulation == 0:
            raise ConfigError(
                f"the global batch ({global_batch}) must be a multiple of micro batch "
                f"({t.micro_batch_size}) x ranks ({world}); change train.global_batch_size or "
                f"train.micro_batch_size"
            )
        given = "train.gradient_accumulation_steps" in cfg.given or _get(ds, "gradient_accumulation_steps") not in (
            None,
            "auto",
        )
        if given and accumulation != t.gradient_accumulation_steps:
            raise ConfigError(
                f"global batch {global_batch} != micro batch {t.micro_batch_size} x gradient "
                f"accumulation {t.gradient_accumulation_steps} x ranks {world}; set two of the three"
            )
    return dataclasses.replace(t, global_batch_size=global_batch, gradient_accumulation_steps=accumulation)


def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * abs(b))
