"""A rank's part of a model read straight from its safetensors files.

A sharding placement builds the teacher on the meta device (shapes only), cuts it into this rank's
shape, and then calls `load_local` (every parameter this rank holds, whole or a slice along one
dimension) or `load_zero3_partitions` (this rank's flat ZeRO-3 partition of every parameter). Each
tensor is read on its own, only the bytes of this rank's part, straight into the tensor that keeps
them (positioned reads from the safetensors layout: no mapping of the file, whose touched pages
would count in the process's resident memory), so a rank's peak stays near what it keeps.

The names are the model's own parameter names as `save_pretrained` writes them, except the
LLaDA2 routed experts, stacked in memory ([E, out, in]) and stored per expert on disk
(`mlp.experts.<e>.<proj>.weight`): their rows are read expert by expert.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from tide_ds.config import ConfigError

# name, the meta parameter -> (dim, start) of the slice this rank keeps (its length: the parameter's
# size along dim), or None for the whole tensor
Part = Callable[[str, torch.Tensor], "tuple[int, int] | None"]

# the safetensors dtype names
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where one tensor lies in its safetensors file."""

    file: str
    dtype: torch.dtype
    shape: list[int]
    offset: int  # of its first byte in the file


def read_header(path: str) -> dict[str, Stored]:
    """The tensors of one safetensors file (8-byte header length, JSON header, then the data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {
        name: Stored(path, _DTYPES[h["dtype"]], list(h["shape"]), 8 + size + h["data_offsets"][0])
        for name, h in header.items()
    }


class Checkpoint:
    """Named tensors of a transformers checkpoint directory (one safetensors file or an index);
    `read` returns a slice of one tensor as a new CPU tensor in its stored dtype."""

    def __init__(self, path: str, key: str = "teacher.path"):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            names = ["model.safetensors"]
        else:
            raise ConfigError(
                f"{key}={path} has no model.safetensors(.index.json): a sharded placement reads its part of "
                f"the weights from safetensors files (save the model with save_pretrained)"
            )
        self.path, self.key = path, key
        self.tensors: dict[str, Stored] = {}
        for name in names:
            self.tensors.update(read_header(os.path.join(path, name)))
        self.fds = {name: os.open(os.path.join(path, name), os.O_RDONLY) for name in names}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _experts(self, name: str) -> list[str] | None:
        """The per-expert names stacked into parameter `name` (`...experts.<proj>`), or None."""
        prefix, _, proj = name.rpartition(".")
        if name in self.tensors or not prefix.endswith("experts") or f"{prefix}.0.{proj}.weight" not in self.tensors:
            return None
        count = 0
        while f"{prefix}.{count}.{proj}.weight" in self.tensors:
            count += 1
        return [f"{prefix}.{e}.{proj}.weight" for e in range(count)]

    def _stored(self, name: str) -> Stored:
        if name not in self.tensors:
            raise ConfigError(f"{self.key}={self.path}: the checkpoint has no tensor {name}")
        return self.tensors[name]

    def shape(self, name: str) -> list[int]:
        experts = self._experts(name)
        if experts is not None:
            return [len(experts), *self._stored(experts[0]).shape]
        return list(self._stored(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        experts = self._experts(name)
        return self._stored(experts[0] if experts is not None else name).dtype

    def has(self, name: str) -> bool:
        return name in self.tensors or self._experts(name) is not None

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name`, indices [start, stop) along dim (0 or 1) only."""
        shape = self.shape(name)
        if dim not in (0, 1) or (dim == 1 and len(shape) < 2):
            raise ValueError(f"{name} {shape}: slices are along dim 0 or 1")
        stop = shape[dim] if stop is None else stop
        if shape:
            shape[dim] = stop - start
        out = torch.empty(shape, dtype=self.dtype(name))  # host: read from disk, then moved by the caller
        experts = self._experts(name)
        if experts is None:
            self._fill(name, out, dim, start)
        elif dim == 0:  # stacked experts: dim 0 picks experts, dim 1 slices each
            for i, e in enumerate(experts[start:stop]):
                self._fill(e, out[i], 0, 0)
        else:
            for i, e in enumerate(experts):
                self._fill(e, out[i], 0, start)
        return out

    def read_flat(self, name: str, first: int, last: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [first, last) of tensor `name` flattened (row-major), into `out` (1-D, the stored
        dtype) or a new tensor."""
        if out is None:
            out = torch.empty(last - first, dtype=self.dtype(name))  # host: read from disk
        experts = self._experts(name) or [name]
        size = math.prod(self._stored(experts[0]).shape)  # elements of each (stacked) tensor
        for e, part in enumerate(experts):
            a, b = max(first, e * size), min(last, (e + 1) * size)
            if a < b:
                self._pread(part, out[a - first : b - first], a - e * size)
        return out

    def _fill(self, name: str, out: torch.Tensor, dim: int, start: int) -> None:
        """`out` (contiguous) <- tensor `name` from index `start` along dim."""
        shape = self._stored(name).shape
        if dim == 0:
            self._pread(name, out, start * math.prod(shape[1:]))
            return
        inner = math.prod(shape[2:])
        for r in range(shape[0]):  # a column slice: one contiguous run per row
            self._pread(name, out[r], (r * shape[1] + start) * inner)

    def _pread(self, name: str, out: torch.Tensor, element: int) -> None:
        """out's bytes <- the stored bytes of tensor `name` from its flat element `element`."""
        stored = self._stored(name)
        if out.dtype != stored.dtype or not out.is_contiguous():
            raise ValueError(f"{name}: reads go into a contiguous {stored.dtype} tensor")
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        position, done = stored.offset + element * out.element_size(), 0
        fd = self.fds[os.path.basename(stored.file)]
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], position + done)
            if n == 0:
                raise ConfigError(f"{self.key}={self.path}: {stored.file} is truncated; copy the model directory again")
            done += n


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


def _stored_name(ckpt: Checkpoint, names: list[str]) -> str:
    """The name a tensor is stored under: the first of its names (several when tied) the checkpoint has."""
    return next((n for n in names if ckpt.has(n)), names[0])


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
    """The slice of tensor `name` that parameter t holds, checked against t's shape before it is read."""
    stored = ckpt.shape(name)
    dim, start = where if where is not None else (0, 0)
    fits = len(stored) == t.dim() and (where is None or start + t.shape[dim] <= stored[dim])
    if not fits or any(a != b for d, (a, b) in enumerate(zip(stored, t.shape)) if where is None or d != dim):
        raise ConfigError(
            f"{ckpt.key}={ckpt.path}: tensor {name} is stored as {stored}, the model expects "
            f"{list(t.shape)} on this rank (a checkpoint of another configuration?)"
        )
    return ckpt.read(name) if where is None else ckpt.read(name, dim, start, start + t.shape[dim])


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
    n = the partition size, the last rank's padded) read from `ckpt`, only those elements. Returns
    the bytes read."""
    names, total, seen = _aliases(model), 0, set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = _stored_name(ckpt, names[id(p)])
            shape = ckpt.shape(name)
            if list(shape) != list(p.ds_shape):
                raise ConfigError(
                    f"{ckpt.key}={ckpt.path}: tensor {name} is stored as {shape}, the model expects {list(p.ds_shape)}"
                )
            size = p.ds_tensor.ds_numel  # this rank's partition (the last rank's padded)
            first, last = min(rank * size, p.ds_numel), min((rank + 1) * size, p.ds_numel)
            if first == last:
                continue
            into = p.ds_tensor.data.view(-1)[: last - first]
            if into.dtype == ckpt.dtype(name) and into.device.type == "cpu":  # a GPU partition: via the host
                ckpt.read_flat(name, first, last, out=into)
            else:
                into.copy_(ckpt.read_flat(name, first, last))
            total += into.numel() * into.element_size()
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                name = _stored_name(ckpt, names[id(b)])
                if ckpt.has(name):
                    b.data.copy_(ckpt.read(name))
    return total
