"""A DeepSpeed JSON merged with the YAML config: one value of each setting, or an error naming both.

For each setting below, the JSON may hold "auto" (or leave it out): the YAML value is written in.
A concrete JSON value is taken into the run config when the YAML did not set that key; when both
set it and they differ, the run stops before training with a message naming both places.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from tide_ds.config import Config, ConfigError, is_set

# (path in the DeepSpeed JSON, key in the YAML config)
PAIRS = [
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.gradient_accumulation_steps"),
    ("train_batch_size", "train.global_batch_size"),
    ("gradient_clipping", "train.grad_clip"),
    ("optimizer.params.lr", "train.lr"),
    ("optimizer.params.betas", "train.betas"),
    ("optimizer.params.weight_decay", "train.weight_decay"),
]
_PRECISION = {"fp32": (False, False), "bf16": (True, False), "fp16": (False, True)}


def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _put(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for p in head:
        d = d.setdefault(p, {})
    d[last] = value


def _yaml(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * abs(b))


def load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"engine.ds_config {path} must hold a JSON object")
    return ds


def merge_ds_config(cfg: Config, ds: dict[str, Any], world: int, source: str = "ds_config") -> dict[str, Any]:
    """The final DeepSpeed config; updates cfg.train with the values adopted from the JSON."""
    ds = copy.deepcopy(ds)
    if "scheduler" in ds:
        raise ConfigError(f"{source} has a 'scheduler' section; remove it: the lr schedule comes from "
                          f"train.lr, train.warmup_steps and train.min_lr_ratio")
    optimizer_pairs = "optimizer" in ds
    for ds_key, key in PAIRS:
        if ds_key.startswith("optimizer.") and not optimizer_pairs:
            continue
        value = _get(ds, ds_key)
        if value is None or value == "auto":
            continue
        if key == "train.global_batch_size":
            continue  # checked below, with the batch arithmetic
        if is_set(cfg, key) and not _same(value, _yaml(cfg, key)):
            raise ConfigError(f"{source} sets {ds_key}={value} but the YAML config sets {key}="
                              f"{_yaml(cfg, key)}; set it in one place (or write \"auto\" in the JSON)")
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, tuple(value) if isinstance(value, list) else value)

    _merge_precision(cfg, ds, source)
    _merge_batch(cfg, ds, world, source)
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.global_batch_size
    ds["gradient_clipping"] = t.grad_clip
    if optimizer_pairs:
        params = ds["optimizer"].setdefault("params", {})
        params.update(lr=t.lr, betas=list(t.betas), weight_decay=t.weight_decay)
    else:
        ds["zero_allow_untested_optimizer"] = True  # the client torch AdamW
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def _merge_precision(cfg: Config, ds: dict, source: str) -> None:
    flags = {k: _get(ds, f"{k}.enabled") for k in ("bf16", "fp16")}
    concrete = {k: v for k, v in flags.items() if v not in (None, "auto")}
    if concrete:
        bf16, fp16 = bool(concrete.get("bf16", False)), bool(concrete.get("fp16", False))
        if bf16 and fp16:
            raise ConfigError(f"{source} enables both bf16 and fp16; keep one")
        json_precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
        if json_precision != "fp32" or len(concrete) == 2:
            if is_set(cfg, "train.precision") and cfg.train.precision != json_precision:
                raise ConfigError(f"{source} selects {json_precision} (bf16.enabled/fp16.enabled) but the YAML "
                                  f"config sets train.precision={cfg.train.precision}; set it in one place")
            cfg.train.precision = json_precision
    bf16, fp16 = _PRECISION[cfg.train.precision]
    ds.setdefault("bf16", {})["enabled"] = bf16
    ds.setdefault("fp16", {})["enabled"] = fp16


def _merge_batch(cfg: Config, ds: dict, world: int, source: str) -> None:
    t = cfg.train
    value = _get(ds, "train_batch_size")
    if value not in (None, "auto"):
        if is_set(cfg, "train.global_batch_size") and t.global_batch_size != value:
            raise ConfigError(f"{source} sets train_batch_size={value} but the YAML config sets "
                              f"train.global_batch_size={t.global_batch_size}; set it in one place")
        t.global_batch_size = value
    if t.global_batch_size == 0:
        t.global_batch_size = t.micro_batch_size * t.gradient_accumulation_steps * world
        return
    per_step = t.micro_batch_size * world
    accum, rest = divmod(t.global_batch_size, per_step)
    if rest or accum == 0:
        raise ConfigError(f"the global batch ({t.global_batch_size}) must be a multiple of micro batch "
                          f"({t.micro_batch_size}) x ranks ({world}); change train.global_batch_size or "
                          f"train.micro_batch_size")
    ga_given = is_set(cfg, "train.gradient_accumulation_steps") or _get(ds, "gradient_accumulation_steps") not in (None, "auto")
    if ga_given and accum != t.gradient_accumulation_steps:
        raise ConfigError(f"global batch {t.global_batch_size} != micro batch {t.micro_batch_size} x gradient "
                          f"accumulation {t.gradient_accumulation_steps} x ranks {world}; set two of the three")
    t.gradient_accumulation_steps = accum


def plain_batch(cfg: Config) -> None:
    """The single-process loop's batch arithmetic (the same rules as with a ds_config)."""
    _merge_batch(cfg, {}, 1, "config")


def settled_global_batch(cfg: Config, world: int, use_deepspeed: bool) -> int:
    """The global batch the engine will settle on, worked out on a copy (cfg is left as it is)."""
    cfg = copy.deepcopy(cfg)
    if not use_deepspeed:
        plain_batch(cfg)
    else:
        ds = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else {}
        merge_ds_config(cfg, ds, world, source=cfg.engine.ds_config or "the default DeepSpeed config")
    return cfg.train.global_batch_size
