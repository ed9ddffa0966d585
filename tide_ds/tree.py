"""The tensors inside the step's dataclasses (Noised, TeacherTargets): map over them, or list them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of dataclass `obj` with fn applied to every tensor in its fields, in lists of them and
    in nested dataclasses; other values as they are."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def tensors_of(obj) -> Iterator[torch.Tensor]:
    """Every tensor held by obj: dataclass attributes (cached properties too), lists and tuples."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_of(x)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for x in vars(obj).values():
            yield from tensors_of(x)


def to_device(obj, device: torch.device):
    return map_tensors(obj, lambda t: t.to(device, non_blocking=True))
