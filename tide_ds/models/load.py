"""A rank's part of a model read straight from its safetensors files, memory-mapped.

A sharding placement builds the teacher on the meta device (shapes only), cuts it into this rank's
shape, and then calls `load_local` (every parameter this rank holds, whole or a slice along one
dimension) or `load_zero3_partitions` (this rank's flat ZeRO-3 partition of every parameter). Each
tensor is read on its own from the memory-mapped file, cast to the model's dtype and put on the
device, so a rank's peak stays near what it keeps, never the whole model.

The names are the model's own parameter names as `save_pretrained` writes them, except the
LLaDA2 routed experts, stacked in memory ([E, out, in]) and stored per expert on disk
(`mlp.experts.<e>.<proj>.weight`): their rows are read expert by expert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn

from tide_ds.config import ConfigError

# name, the meta parameter -> (dim, start) of the slice this rank keeps (its length: the parameter's
# size along dim), or None for the whole tensor
Part = Callable[[str, torch.Tensor], "tuple[int, int] | None"]


class Checkpoint:
    """Named tensors of a transformers checkpoint directory (one safetensors file or an index),
    opened memory-mapped; `read` returns a slice of one tensor as a new CPU tensor."""

    def __init__(self, path: str, key: str = "teacher.path"):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConfigError(
                f"{key}={path} has no model.safetensors(.index.json): a sharded placement reads its part of "
                f"the weights from safetensors files (save the model with save_pretrained)"
            )
        self.path, self.key, self.files = path, key, files
        self.handles = {name: safe_open(os.path.join(path, name), "pt") for name in set(files.values())}

    def _experts(self, name: str) -> list[str] | None:
        """The per-expert names stacked into parameter `name` (`...experts.<proj>`), or None."""
        prefix, _, proj = name.rpartition(".")
        if not prefix.endswith("experts") or f"{prefix}.0.{proj}.weight" not in self.files:
            return None
        count = 0
        while f"{prefix}.{count}.{proj}.weight" in self.files:
            count += 1
        return [f"{prefix}.{e}.{proj}.weight" for e in range(count)]

    def shape(self, name: str) -> list[int]:
        experts = self._experts(name) if name not in self.files else None
        if experts is not None:
            return [len(experts), *self._slice(experts[0]).get_shape()]
        return list(self._slice(name).get_shape())

    def has(self, name: str) -> bool:
        return name in self.files or self._experts(name) is not None

    def _slice(self, name: str):
        if name not in self.files:
            raise ConfigError(f"{self.key}={self.path}: the checkpoint has no tensor {name}")
        return self.handles[self.files[name]].get_slice(name)

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name`, indices [start, stop) along dim (0 or 1) only."""
        experts = self._experts(name) if name not in self.files else None
        if experts is not None:  # stacked experts: dim 0 picks experts, the rest slices each
            if dim == 0:
                return torch.stack([self._slice(e)[:] for e in experts[start:stop]])
            return torch.stack([self.read(e, dim - 1, start, stop) for e in experts])
        part = self._slice(name)
        stop = part.get_shape()[dim] if stop is None else stop
        if part.get_shape() == [] or (dim == 0 and (start, stop) == (0, part.get_shape()[0])):
            return part[:]
        return part[start:stop] if dim == 0 else part[:, start:stop]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter or persistent buffer) -> its names in the model (several when tied)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                names.setdefault(id(b), []).append(f"{module_name}.{name}" if module_name else name)
    return names


def _stored_name(ckpt: Checkpoint, names: list[str], tied: dict[str, str] | None = None) -> str:
    """The name a tensor is stored under: one of its own, else (a tied copy) its source's."""
    stored = [n for n in names if ckpt.has(n)] + [tied[n] for n in names if n in (tied or {})]
    return stored[0] if stored else names[0]


def load_local(model: nn.Module, ckpt: Checkpoint, device: torch.device, part: Part | None = None) -> int:
    """Every parameter and persistent buffer of `model` read from `ckpt` (the slice `part` gives,
    else the whole tensor), cast to the dtype the model was built in, on `device`: a meta one
    replaced, a real one (e.g. left uninitialised by AutoTP) filled in place. Tied parameters (the
    model's `all_tied_weights_keys`) end as one tensor, read once. The non-persistent buffers
    (rotary tables) are computed again. Returns the bytes read."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # tied name -> its source
    names, done, total = _aliases(model), {}, 0
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for attr, t in list(table.items()):
                full = f"{module_name}.{attr}" if module_name else attr
                if t is None or attr in module._non_persistent_buffers_set or full in tied:
                    continue
                if id(t) not in done:
                    name = _stored_name(ckpt, names[id(t)])
                    value = _read(ckpt, name, t, part(name, t) if part is not None else None)
                    value = value.to(device=device, dtype=t.dtype)
                    total += value.numel() * value.element_size()
                    if not t.is_meta:
                        t.data.copy_(value)
                        value = t
                    elif isinstance(t, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=False)
                    done[id(t)] = value
                table[attr] = done[id(t)]
    for target, source in tied.items():
        owner, _, attr = target.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    init_computed_buffers(model, device)
    return total


def _read(ckpt: Checkpoint, name: str, t: torch.Tensor, where) -> torch.Tensor:
    """The slice of tensor `name` that parameter t holds; its shape must be t's."""
    stored = ckpt.shape(name)
    if where is None:
        value = ckpt.read(name)
    else:
        dim, start = where
        value = ckpt.read(name, dim, start, start + t.shape[dim])
    if list(value.shape) != list(t.shape):
        raise ConfigError(
            f"{ckpt.key}={ckpt.path}: tensor {name} is stored as {stored}, the model expects "
            f"{list(t.shape)} on this rank (a checkpoint of another configuration?)"
        )
    return value


def init_computed_buffers(model: nn.Module, device: torch.device) -> None:
    """The buffers no checkpoint stores (rotary tables), computed again on `device` by the model's own
    initialisation, for the modules that hold them (they own no parameters)."""
    for module in model.modules():
        computed = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
        if not computed:
            continue
        for name in computed:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        model._init_weights(module)


def load_zero3_partitions(model: nn.Module, ckpt: Checkpoint, rank: int) -> int:
    """Each ZeRO-3 partitioned parameter's local partition (its flat elements [rank * n, rank * n + n),
    n = the partition size, the last rank's padded) read from `ckpt`, only the rows that cover it.
    Returns the bytes read."""
    names, total = _aliases(model), 0
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # a copy under zero.Init: read twice
    seen = set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = _stored_name(ckpt, names[id(p)], tied)
            shape = ckpt.shape(name)
            if list(shape) != list(p.ds_shape):
                raise ConfigError(
                    f"{ckpt.key}={ckpt.path}: tensor {name} is stored as {shape}, the model expects {list(p.ds_shape)}"
                )
            local = p.ds_tensor
            size = local.ds_numel
            first, last = min(rank * size, p.ds_numel), min(rank * size + size, p.ds_numel)
            if first == last:
                continue
            row = p.ds_numel // shape[0] if shape else 1
            r0, r1 = first // row, -(-last // row)
            rows = ckpt.read(name, 0, r0, r1) if shape else ckpt.read(name)
            flat = rows.reshape(-1)[first - r0 * row : last - r0 * row]
            local.data[: last - first].copy_(flat.to(local.dtype))
            total += flat.numel() * local.element_size()
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                name = _stored_name(ckpt, names[id(b)])
                if ckpt.has(name):
                    b.data.copy_(ckpt.read(name).to(b.dtype))
    return total
