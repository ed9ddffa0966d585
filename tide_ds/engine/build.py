"""The student's optimizer engine and the teacher's placement, behind one small `Engine`.

Plain PyTorch (one process, no ds_config) and DeepSpeed share the loop: the loop calls
`teacher_targets`, `loss`, `backward_step`, `save`, `load`. Under DeepSpeed the student's loss and
the teacher call each run inside a module's forward, so ZeRO-3 gathers the partitioned parameters
(including the output head, used outside its own Linear) while they are used.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from tide_ds.config import Config, ConfigError, warmup_steps
from tide_ds.engine.dist import Dist
from tide_ds.engine.merge import load_ds_config, merge_ds_config, plain_batch
from tide_ds.engine.placement import check_placement, expert_parallel, megatron, tensor_parallel

PLAIN_STATE = "plain_state.pt"


class _StudentLoss(nn.Module):
    """The student's loss as a module forward (what the DeepSpeed engine wraps)."""

    def __init__(self, step):
        super().__init__()
        self.student = step.student
        self._step = step
        _register_head(self, step.student)

    def forward(self, noised, targets, progress: float):
        return self._step.loss(noised, targets, progress=progress)


class _TeacherCall(nn.Module):
    """The teacher call as a module forward, for a ZeRO-3 partitioned teacher."""

    def __init__(self, step):
        super().__init__()
        self.teacher = step.teacher
        self._step = step
        _register_head(self, step.teacher)

    def forward(self, noised):
        # Targets may carry the teacher's head for the student's loss to use later, after this
        # forward has released the gathered parameters: hand out a whole copy instead.
        head = [p for p in (self.teacher.output_weight, self.teacher.output_bias) if p is not None]
        return _replace_params(self._step.teacher_targets(noised), head)


def _replace_params(obj, params):
    if any(obj is p for p in params):
        return obj.detach().clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _replace_params(getattr(obj, f.name), params)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _register_head(module: nn.Module, model) -> None:
    """The output head is read outside its Linear's forward: ZeRO-3 must gather it for `module`."""
    import deepspeed

    for p in (model.output_weight, model.output_bias):
        if p is not None:
            deepspeed.zero.register_external_parameter(module, p)


@dataclasses.dataclass
class Engine:
    dist: Dist
    student: nn.Module
    teacher_targets: Callable
    loss: Callable
    ds: Any = None  # the student's DeepSpeedEngine (None: plain PyTorch)
    optimizer: Any = None
    scheduler: Any = None
    accumulation: int = 1
    grad_clip: float = 0.0
    traces: list = dataclasses.field(default_factory=list)  # ZeRO-3 parameter coordinators (see overlap_ready)
    _micro: int = 0
    _finite: torch.Tensor | None = None  # all losses (and the grad norm) of this optimizer step finite
    _grad_norm: Any = None

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; the optimizer steps after `accumulation` of them."""
        self.backward(loss)
        self.step()

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            (loss / self.accumulation).backward()

    def step(self) -> None:
        """Called after every micro-batch's backward: steps the optimizer at accumulation boundaries.
        A plain step with a non-finite loss or gradient norm leaves the weights as they were."""
        if self.ds is not None:
            boundary = self.ds.is_gradient_accumulation_boundary()
            self.ds.step()
            norm = self.ds.get_global_grad_norm() if boundary else None
            if norm is not None:
                self._finite = self._finite & torch.isfinite(torch.as_tensor(norm, device=self._finite.device))
            return
        self._micro += 1
        if self._micro % self.accumulation == 0:
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
            self._finite = self._finite & torch.isfinite(self._grad_norm)
            if bool(self._finite):  # sync point: once per optimizer step (StepGuard reports a skip)
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def step_finite(self) -> torch.Tensor:
        """Whether every loss and the gradient norm of the last optimizer step were finite (a device
        bool, no sync); resets for the next step."""
        finite, self._finite = self._finite, None
        return finite

    def grad_norm(self) -> float | None:
        """The gradient norm of the last optimizer step, before clipping (None before any step)."""
        norm = self.ds.get_global_grad_norm() if self.ds is not None else self._grad_norm
        return None if norm is None else float(norm)  # a sync point: logging only

    def overlap_ready(self) -> bool:
        """Whether the teacher may run at once with the student. Until its module trace is complete,
        a ZeRO-3 engine checks at each forward, on the default process group, that every rank
        recorded the same module order; a partitioned teacher's checks and the student's, made at
        once from two threads, could pair up differently on different ranks. The trace states
        change the same way on every rank, so every rank answers alike."""
        return all(c.is_complete_trace() for c in self.traces)

    def lr(self) -> float:
        opt = self.ds.optimizer if self.ds is not None else self.optimizer
        return opt.param_groups[0]["lr"]

    def save(self, directory: str, tag: str, state: dict) -> None:
        if self.ds is not None:
            self.ds.save_checkpoint(directory, tag=tag, client_state=state, save_latest=False)
            return
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save({"model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client_state": state},
                   os.path.join(directory, tag, PLAIN_STATE))

    def load(self, directory: str, tag: str) -> dict:
        if self.ds is not None:
            path, state = self.ds.load_checkpoint(directory, tag=tag)
            if path is None:
                raise ConfigError(f"train.resume: DeepSpeed could not load checkpoint {directory}/{tag}")
            return state
        saved = torch.load(os.path.join(directory, tag, PLAIN_STATE), weights_only=False)
        self.student.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        return saved["client_state"]

    def gathered(self):
        """Context in which every student parameter is whole (ZeRO-3) on every rank."""
        import contextlib

        if self.ds is None or self.ds.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None)


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak (per optimizer step)."""
    t = cfg.train
    warmup = warmup_steps(t)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, t.steps - warmup)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


def _in_precision(fn: Callable, precision: str, device: torch.device) -> Callable:
    """One process: bf16 mixed precision by autocast (fp32 master weights and optimizer state; the
    losses reduce in fp32 as always). fp16 needs loss scaling, which only the DeepSpeed engine has."""
    if precision == "fp32":
        return fn
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 needs DeepSpeed's loss scaling: set engine.ds_config, or use bf16")

    def call(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)

    return call


def _adamw(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas)


def build_engine(cfg: Config, step, dist: Dist, *, use_deepspeed: bool) -> Engine:
    """Places the teacher, then builds the student's optimizer engine (DeepSpeed or plain)."""
    placement = cfg.engine.teacher_placement
    check_placement(cfg, step.teacher, dist)
    full = param_bytes(step.teacher)
    if not use_deepspeed:
        if placement != "replicate":
            raise ConfigError(f"engine.teacher_placement={placement} needs DeepSpeed: set engine.ds_config "
                              f"(e.g. ds_configs/zero3.json) or launch several ranks")
        plain_batch(cfg)
        opt = _adamw(cfg, step.student)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        _report_teacher(step.teacher, dist, "replicate", full)
        loss = _in_precision(step.loss, cfg.train.precision, dist.device)
        return Engine(dist, step.student, step.teacher_targets, loss, optimizer=opt, scheduler=sched,
                      accumulation=cfg.train.gradient_accumulation_steps, grad_clip=cfg.train.grad_clip)
    import deepspeed

    ds_raw = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else {"zero_optimization": {"stage": 0}}
    ds_cfg = merge_ds_config(cfg, ds_raw, dist.world, source=cfg.engine.ds_config or "the default DeepSpeed config")
    teacher_targets = step.teacher_targets
    if step.teacher is not None and placement == "zero3":
        teacher_targets = _zero3_teacher(step, ds_cfg)
    if step.teacher is not None and placement == "expert_parallel":
        expert_parallel(step.teacher, cfg.engine.ep_size, dist)
    if step.teacher is not None and placement == "tensor_parallel":
        step.teacher = tensor_parallel(step.teacher, cfg.engine.tp_size)
    if step.teacher is not None and placement == "megatron":
        step.teacher = megatron(step.teacher, cfg)
    _report_teacher(step.teacher, dist, placement, full)
    module = _StudentLoss(step)
    client_opt = None if "optimizer" in ds_cfg else _adamw(cfg, module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=client_opt, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        model_parameters=None if client_opt is not None else module.parameters())
    traces = []
    if step.teacher is not None and placement == "zero3":
        traces.append(teacher_targets.optimizer.get_param_coordinator())
        if engine.zero_optimization_stage() == 3:
            traces.append(engine.optimizer.parameter_offload.get_param_coordinator())
    return Engine(dist, step.student, teacher_targets, engine, ds=engine,
                  accumulation=cfg.train.gradient_accumulation_steps, traces=traces)


def _zero3_teacher(step, student_ds: dict):
    """The teacher's parameters partitioned over the ranks (ZeRO-3, no optimizer), gathered over a
    process group of its own, so its gathers never interleave with the student's collectives even
    when the two run at once (train.scheduler=overlap)."""
    import deepspeed

    zero = dict(student_ds.get("zero_optimization", {}))
    zero.update(stage=3)
    for k in ("offload_optimizer", "reduce_scatter", "overlap_comm", "contiguous_gradients", "reduce_bucket_size"):
        zero.pop(k, None)
    teacher_ds = {k: student_ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                              "train_batch_size", "bf16", "fp16", "steps_per_print")}
    teacher_ds["zero_optimization"] = zero
    module = _TeacherCall(step)
    group = torch.distributed.new_group(list(range(torch.distributed.get_world_size())))
    deepspeed.zero.Init(module=module, data_parallel_group=group, config_dict_or_path=teacher_ds,
                        dtype=next(module.parameters()).dtype)
    engine, _, _, _ = deepspeed.initialize(model=module, config=teacher_ds)
    engine.eval()
    return engine


def teacher_bytes(teacher) -> int:
    """Bytes of teacher parameters held by this rank: the local partition under ZeRO-3, plus the
    whole of the small parameters ZeRO-3 keeps on every rank (stage3_param_persistence_threshold)."""
    total = 0
    for p in teacher.parameters():
        local = getattr(p, "ds_tensor", None)
        if local is None:
            total += p.numel() * p.element_size()
            continue
        whole = getattr(p, "ds_persist", False)
        total += p.ds_numel * p.element_size() if whole else local.numel() * local.element_size()
    return total


def param_bytes(teacher) -> int:
    """Bytes of the whole teacher (before any placement splits it)."""
    if teacher is None:
        return 0
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in teacher.parameters())


def _report_teacher(teacher, dist: Dist, placement: str, full: int) -> None:
    if teacher is None:
        return
    held = teacher_bytes(teacher)
    print(f"[rank {dist.rank}] teacher ({placement}): {held / 2**20:.2f} MiB of parameters on this rank "
          f"(of {full / 2**20:.2f} MiB)", flush=True)
