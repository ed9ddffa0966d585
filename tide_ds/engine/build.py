"""The student's optimizer engine, plain PyTorch or DeepSpeed, behind one small interface.

The loop calls `teacher_targets`, `loss`, `backward`, `step`; checkpoint.py calls `save`, `load`
and reads `deepspeed`, `dist` and `student`. Under DeepSpeed the student's loss runs inside a
module's forward, so ZeRO-3 gathers the partitioned parameters (the output head included, which
the loss reads outside its own Linear) while they are used. The teacher is placed first, by the
function of its placement (tide_ds/engine/placement.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from tide_ds.config import Config, ConfigError, warmup_steps
from tide_ds.engine.dist import Dist
from tide_ds.engine.placement import PLACEMENTS, PlacedTeacher, check_placement, register_head
from tide_ds.engine.plan import RunPlan
from tide_ds.models.build import build_student, model_dtype, partitioned
from tide_ds.models.load import Checkpoint, load_zero3_partitions

PLAIN_STATE = "plain_state.pt"  # a plain run's checkpoint file in each step<N>/ directory


class Engine:
    """What both engines share: the calls the loop makes and the per-step finiteness flag."""

    deepspeed = False

    def __init__(self, dist: Dist, student: nn.Module, teacher: PlacedTeacher, loss: Callable):
        self.dist, self.student, self.teacher, self.loss = dist, student, teacher, loss
        self.teacher_targets = teacher.call
        self._finite: torch.Tensor | None = None  # all losses (and the grad norm) of this step finite

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self._backward(loss)

    def step_finite(self) -> torch.Tensor:
        """Whether every loss and the gradient norm of the last optimizer step were finite (a device
        bool, no sync); resets for the next step."""
        finite, self._finite = self._finite, None
        return finite

    def overlap_ready(self) -> bool:
        """Whether the teacher may run at once with the student (always, but see DeepSpeedEngine)."""
        return True

    def gathered(self):
        """Context in which every student parameter is whole on every rank."""
        return contextlib.nullcontext()


class PlainEngine(Engine):
    """One process: torch AdamW and LambdaLR; a step with a non-finite loss or gradient norm leaves
    the weights as they were."""

    def __init__(
        self, dist, student, teacher, loss, *, optimizer, scheduler, accumulation: int = 1, grad_clip: float = 0.0
    ):
        super().__init__(dist, student, teacher, loss)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.grad_clip = accumulation, grad_clip
        self._micro, self._grad_norm = 0, None

    def _backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        """Called after every micro-batch's backward: steps the optimizer at accumulation boundaries."""
        self._micro += 1
        if self._micro % self.accumulation:
            return
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        self._finite = self._finite & torch.isfinite(self._grad_norm)
        if bool(self._finite):  # sync point: once per optimizer step (StepGuard reports a skip)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        """The gradient norm of the last optimizer step, before clipping (None before any step)."""
        return None if self._grad_norm is None else float(self._grad_norm)  # a sync point: logging only

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: str, tag: str, state: dict) -> None:
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save(
            {
                "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "client_state": state,
            },
            os.path.join(directory, tag, PLAIN_STATE),
        )

    def load(self, directory: str, tag: str) -> dict:
        saved = torch.load(os.path.join(directory, tag, PLAIN_STATE), weights_only=False)
        self.student.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        return saved["client_state"]


class DeepSpeedEngine(Engine):
    """The student's DeepSpeed engine (ZeRO stage of the ds_config)."""

    deepspeed = True

    def __init__(self, dist, student, teacher, ds):
        super().__init__(dist, student, teacher, ds)
        self.ds = ds
        # a ZeRO-3 teacher's parameter coordinator and the student's (see overlap_ready)
        self.traces = (
            [] if teacher.coordinator is None else [c for c in (teacher.coordinator, _coordinator(ds)) if c is not None]
        )

    def _backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        norm = self.ds.get_global_grad_norm() if boundary else None
        if norm is not None:
            self._finite = self._finite & torch.isfinite(torch.as_tensor(norm, device=self._finite.device))

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)  # a sync point: logging only

    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    def overlap_ready(self) -> bool:
        """Until its module trace is complete, a ZeRO-3 engine checks at each forward, on the default
        process group, that every rank recorded the same module order; a partitioned teacher's checks
        and the student's, made at once from two threads, could pair up differently on different
        ranks. The trace states change the same way on every rank, so every rank answers alike."""
        return all(c.is_complete_trace() for c in self.traces)

    def save(self, directory: str, tag: str, state: dict) -> None:
        self.ds.save_checkpoint(directory, tag=tag, client_state=state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        path, state = self.ds.load_checkpoint(directory, tag=tag)
        if path is None:
            raise ConfigError(f"train.resume: DeepSpeed could not load checkpoint {directory}/{tag}")
        return state

    def gathered(self):
        if self.ds.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None)


def _coordinator(ds):
    return ds.optimizer.parameter_offload.get_param_coordinator() if ds.zero_optimization_stage() == 3 else None


class _StudentLoss(nn.Module):
    """The student's loss as a module forward (what the DeepSpeed engine wraps)."""

    def __init__(self, step):
        super().__init__()
        self.student = step.student
        self._step = step
        register_head(self, step.student)

    def forward(self, noised, targets, progress: float):
        return self._step.loss(noised, targets, progress=progress)


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
    losses reduce in fp32 as always). fp16 is refused by the run plan (`settle`)."""
    if precision == "fp32":
        return fn

    def call(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)

    return call


def _adamw(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=t.betas,
    )


def place_teacher(plan: RunPlan, ds_config: dict | None, step, dist: Dist) -> PlacedTeacher:
    """The teacher placed by its placement's function; reports what this rank holds."""
    cfg = plan.config
    placement = cfg.engine.teacher_placement
    check_placement(cfg, step.teacher, dist)
    if placement != "replicate" and not plan.deepspeed:
        raise ConfigError(
            f"engine.teacher_placement={placement} needs DeepSpeed: set engine.ds_config "
            f"(e.g. ds_configs/zero3.json) or launch several ranks"
        )
    if step.teacher is None:
        return PlacedTeacher(step.teacher_targets, None)
    whole = param_bytes(step.teacher)
    placed = PLACEMENTS[placement](step, cfg, dist, ds_config)
    print(
        f"[rank {dist.rank}] teacher ({placement}): {teacher_bytes(placed.module) / 2**20:.2f} MiB of parameters "
        f"on this rank (of {whole / 2**20:.2f} MiB)",
        flush=True,
    )
    return placed


def build_engine(plan: RunPlan, ds_config: dict | None, step, dist: Dist) -> Engine:
    """Places the teacher, then builds the student's optimizer engine (DeepSpeed or plain)."""
    cfg = plan.config
    teacher = place_teacher(plan, ds_config, step, dist)
    if not plan.deepspeed:
        opt = _adamw(cfg, step.student)
        return PlainEngine(
            dist,
            step.student,
            teacher,
            _in_precision(step.loss, cfg.train.precision, dist.device),
            optimizer=opt,
            scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
            accumulation=cfg.train.gradient_accumulation_steps,
            grad_clip=cfg.train.grad_clip,
        )
    import deepspeed

    module = _StudentLoss(step)
    client_opt = None if "optimizer" in ds_config else _adamw(cfg, module)
    ds, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=client_opt,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        model_parameters=None if client_opt is not None else module.parameters(),
    )
    return DeepSpeedEngine(dist, step.student, teacher, ds)


def zero_stage(ds_config: dict | None) -> int:
    """The ZeRO stage of a settled ds_config (0 without DeepSpeed)."""
    return (ds_config or {}).get("zero_optimization", {}).get("stage", 0)


def build_zero3_student(cfg: Config, ds_config: dict, tokenizer, dist: Dist, log=print):
    """The student under ZeRO stage 3, built partitioned: zero.Init splits each module's parameters
    over the ranks as soon as the module is built, so no rank ever holds the whole student. A new
    model (student.init) is initialised as a whole one would be, in the same order with the same
    random draws, each module's parameters gathered only while they are initialised (the values
    equal one process's). A checkpoint's model is built without initial values and each rank reads
    only its partition of every tensor from student.path."""
    import deepspeed
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    bf16 = (ds_config.get("bf16") or {}).get("enabled") is True
    dtype = torch.bfloat16 if bf16 else model_dtype(cfg.student)
    init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    # zero.Init resolves `dtype` to bf16 or fp16 whatever was asked where the accelerator has no fp16
    # (CPU): the student's parameters are built in the dtype the engine trains
    init.dtype = dtype
    initialise = _gathered_initialisation() if cfg.student.path is None else contextlib.nullcontext()

    @contextlib.contextmanager
    def within():
        with prevent_arange_dtype_change(), init, initialise:  # the rotary tables keep their own dtype
            yield

    student = build_student(
        cfg.student, tokenizer, cfg.diffusion.block_size, cfg.diffusion.mask_token, log=log, within=within()
    )
    if cfg.student.path is not None and partitioned(student):
        with Checkpoint(cfg.student.path, "student.path") as ckpt:
            load_zero3_partitions(student.model, ckpt, dist.rank)
    return student


@contextlib.contextmanager
def _gathered_initialisation():
    """transformers initialises a new model's weights module by module (each PreTrainedModel's
    post_init, in construction order); under zero.Init those parameters are partitioned by then. So
    each module's own parameters, and its children's (which its _init_weights may set), are gathered
    while it is initialised: every rank draws the same values, and rank 0's are kept."""
    import deepspeed
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def initialise(self, module, is_custom_code=False):
        params = [
            *module.parameters(recurse=False),
            *(p for c in module.children() for p in c.parameters(recurse=False)),
        ]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            original(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = initialise
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


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
