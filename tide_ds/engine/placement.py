"""Teacher placements, one function each, looked up by `engine.teacher_placement` in PLACEMENTS:

  replicate        the whole teacher on every rank
  zero3            its parameters partitioned over the ranks (ZeRO-3, no optimizer), gathered per call
  expert_parallel  our LLaDA2 MoE with E / ep_size experts of each layer per rank
  tensor_parallel  a dense transformers teacher split by DeepSpeed AutoTP
  megatron         the LLaDA2 MoE rebuilt from megatron-core, tensor and expert parallel together

Each `place_<name>(step, cfg, dist, ds_config)` returns a `PlacedTeacher`: the teacher call the loop
makes and the module this rank holds. None replaces anything on the step; a placement that wraps the
teacher returns the call of a copy of the step holding the wrapper. `check_placement` refuses every
impossible combination before anything is placed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tide_ds.config import Config, ConfigError
from tide_ds.engine.dist import Dist
from tide_ds.models.llada2 import Experts, shard_experts
from tide_ds.models.load import Checkpoint, load_local, load_zero3_partitions

# The placements that take the teacher built on the meta device (shapes only) and read just this
# rank's part of its weights from teacher.path; replicate loads it whole before it is placed.
BUILDS_OWN_SHARD = ("zero3", "expert_parallel", "tensor_parallel", "megatron")


@dataclasses.dataclass
class PlacedTeacher:
    call: Callable  # noised -> TeacherTargets (no grad)
    module: nn.Module | None  # the teacher as this rank holds it (None: the recipe needs none)
    # ZeRO-3: the teacher's parameter coordinator; the overlapped schedule waits for its module trace
    coordinator: Any = None


def check_placement(cfg: Config, teacher, dist: Dist) -> None:
    """Refuses, before anything is placed, a placement the teacher or the ranks cannot take."""
    e = cfg.engine
    placement = e.teacher_placement
    for key, size, wants in (("ep_size", e.ep_size, "expert_parallel"), ("tp_size", e.tp_size, "tensor_parallel")):
        if size > 1 and placement not in (wants, "megatron"):
            raise ConfigError(
                f"engine.{key}={size} is read only by engine.teacher_placement={wants} or megatron "
                f"(here {placement}); leave it at 1"
            )
    if e.megatron_checkpoint is not None and placement != "megatron":
        raise ConfigError(
            f"engine.megatron_checkpoint is read only by engine.teacher_placement=megatron "
            f"(here {placement}); remove it"
        )
    if teacher is None:
        return
    experts = {m.num_experts for m in teacher.modules() if isinstance(m, Experts)}
    if placement == "megatron":
        from tide_ds.engine.megatron import require_megatron

        require_megatron()
        if e.megatron_checkpoint is not None and not os.path.isdir(e.megatron_checkpoint):
            raise ConfigError(
                f"engine.megatron_checkpoint={e.megatron_checkpoint} not found (give a directory "
                f"written by tide_ds.engine.megatron.save_dist_checkpoint)"
            )
    check_layout(cfg, dist.world, experts, teacher.model.config, type(teacher.model).__name__)
    if placement == "tensor_parallel":
        local = int(os.environ.get("LOCAL_SIZE", 0))
        if dist.device.type == "cpu" and e.tp_size > 1 and not e.tp_size == dist.world == local:
            raise ConfigError(
                f"engine.teacher_placement=tensor_parallel on CPU: DeepSpeed's CPU all-reduce for AutoTP spans "
                f"every rank and works only with all ranks on one machine, so engine.tp_size ({e.tp_size}) must "
                f"equal the number of ranks ({dist.world}) and the ranks on this machine (LOCAL_SIZE="
                f"{os.environ.get('LOCAL_SIZE', 'unset')}); launch with deepspeed, torchrun or srun on one machine"
            )


def check_layout(cfg: Config, world: int, experts: set[int], config, name: str) -> None:
    """Refuses a teacher (its transformers `config`, the expert counts of its MoE layers, its class
    `name`) that engine.teacher_placement cannot split over `world` ranks; `tide-ds plan` asks the same."""
    e = cfg.engine
    placement = e.teacher_placement
    if placement == "megatron":
        from tide_ds.engine.megatron import check_config

        if not experts:
            raise ConfigError(
                f"engine.teacher_placement=megatron builds the LLaDA2-style MoE teacher (teacher.kind "
                f"llada2_moe); {name} is not one"
            )
        check_config(config, e.tp_size, e.ep_size, world)
    if placement == "expert_parallel":
        if not experts:
            raise ConfigError(
                f"engine.teacher_placement=expert_parallel needs an MoE teacher (teacher.kind "
                f"llada2_moe); {name} has no routed experts: use replicate, zero3 or tensor_parallel"
            )
        if any(n % e.ep_size for n in experts):
            raise ConfigError(
                f"engine.ep_size={e.ep_size} does not divide the teacher's {max(experts)} experts per layer"
            )
        if world % e.ep_size:
            raise ConfigError(
                f"engine.ep_size={e.ep_size} does not divide the number of ranks ({world}); "
                f"expert-parallel groups are ranks [0, ep_size), [ep_size, 2 ep_size), ..."
            )
    if placement == "tensor_parallel":
        if experts:
            raise ConfigError(
                f"engine.teacher_placement=tensor_parallel (AutoTP) is for dense teachers; "
                f"{name} is an MoE: use expert_parallel or megatron"
            )
        if world % e.tp_size:
            raise ConfigError(f"engine.tp_size={e.tp_size} does not divide the number of ranks ({world})")


def consecutive_group(size: int, dist: Dist):
    """This rank's group among ranks [0, size), [size, 2 size), ... (every rank creates every group)."""
    mine = None
    for first in range(0, dist.world, size):
        group = torch.distributed.new_group(list(range(first, first + size)))
        if first <= dist.rank < first + size:
            mine = group
    return mine


class TensorParallelTeacher(nn.Module):
    """A teacher split by AutoTP. The ranks of a tensor-parallel group compute every call together,
    but each holds its own micro-batch, padded by the collator to its own longest row: shapes differ
    between ranks. Every call gathers the group's shapes, then its micro-batches (sent padded to the
    group's largest shape), and runs the teacher once per rank on that rank's micro-batch exactly
    as it came (no padding the teacher would read): so each rank makes the same number of calls
    (tp_size), whatever the shapes, and the results equal the unsplit teacher's on each micro-batch."""

    def __init__(self, teacher, group):
        super().__init__()
        self.teacher, self.group = teacher, group
        self.mask_token_id = teacher.mask_token_id

    @property
    def output_weight(self):
        return self.teacher.output_weight

    @property
    def output_bias(self):
        return self.teacher.output_bias

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        inputs = [input_ids, attention_mask, x0]  # None or not alike on every rank (the config decides)
        parts = gather_group_tensors([t for t in inputs if t is not None], self.group)
        mine = torch.distributed.get_rank(self.group)
        out = None
        for rank, tensors in enumerate(parts):
            it = iter(tensors)
            ids, mask, x = (None if t is None else next(it) for t in inputs)
            hidden = self.teacher.hidden_states(ids, mask, x0=x)
            if rank == mine:
                out = hidden
        return out


def gather_group_tensors(tensors: list[torch.Tensor], group) -> list[list[torch.Tensor]]:
    """Every rank's `tensors` (one list per rank of `group`, in rank order), of any shapes: the
    shapes are gathered first, then each tensor padded to the group's largest shape is gathered
    and cut back. Every tensor must have the same number of dimensions and dtype on every rank."""
    size = torch.distributed.get_world_size(group)
    device = tensors[0].device
    shape = torch.tensor([n for t in tensors for n in t.shape], dtype=torch.long, device=device)
    shapes = [torch.empty_like(shape) for _ in range(size)]
    torch.distributed.all_gather(shapes, shape, group=group)
    shapes = torch.stack(shapes).tolist()  # sync point: the group's shapes, once per call
    out: list[list[torch.Tensor]] = [[] for _ in range(size)]
    offset = 0
    for t in tensors:
        dims = [row[offset : offset + t.dim()] for row in shapes]
        offset += t.dim()
        largest = [max(d) for d in zip(*dims)]
        padded = t.new_zeros(largest)
        padded[tuple(slice(0, n) for n in t.shape)] = t
        received = [torch.empty_like(padded) for _ in range(size)]
        torch.distributed.all_gather(received, padded, group=group)
        for rank, (r, d) in enumerate(zip(received, dims)):
            out[rank].append(r[tuple(slice(0, n) for n in d)])
    return out


def place_replicate(step, cfg: Config, dist: Dist, ds_config: dict | None) -> PlacedTeacher:
    return PlacedTeacher(step.teacher_targets, step.teacher)


def is_meta(module: nn.Module) -> bool:
    """Built on the meta device (shapes only): the placement reads its weights itself."""
    return any(p.is_meta for p in module.parameters())


def place_zero3(step, cfg: Config, dist: Dist, ds_config: dict | None) -> PlacedTeacher:
    """A meta teacher is built again under zero.Init (each module's parameters partitioned as it is
    built), then each rank reads only its partition of every parameter from teacher.path."""
    teacher_ds = zero3_config(ds_config, next(step.teacher.parameters()).dtype)
    group = torch.distributed.new_group(list(range(torch.distributed.get_world_size())))
    if is_meta(step.teacher):
        step = step.with_teacher(zero3_built_teacher(cfg, step.teacher, teacher_ds, group))
    engine = zero3_teacher(_TeacherCall(step), teacher_ds, group)
    return PlacedTeacher(engine, step.teacher, engine.optimizer.get_param_coordinator())


def zero3_built_teacher(cfg: Config, meta, teacher_ds: dict, group):
    import deepspeed

    from tide_ds.models.build import build_teacher

    dtype = meta.model.dtype
    init = deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=teacher_ds, dtype=dtype)
    # zero.Init resolves `dtype` to bf16 or fp16 whatever was asked where the accelerator has no fp16
    # (CPU): the teacher's parameters are built in its own dtype
    init.dtype = dtype
    teacher = build_teacher(
        cfg.teacher, cfg.diffusion.mask_token, block_size=cfg.diffusion.block_size, weights=False, within=init
    )
    with Checkpoint(cfg.teacher.path) as ckpt:
        load_zero3_partitions(teacher.model, ckpt, torch.distributed.get_rank(group))
    return teacher


def place_expert_parallel(step, cfg: Config, dist: Dist, ds_config: dict | None) -> PlacedTeacher:
    """Each rank keeps E / ep_size experts of every MoE layer; router, shared experts, attention,
    embeddings, dense layers and head stay whole (replicated). A meta teacher reads only those from
    teacher.path; a loaded one drops the other experts in place."""
    meta = is_meta(step.teacher)
    shard_experts(step.teacher, consecutive_group(cfg.engine.ep_size, dist))
    if meta:
        first = {id(p): m.first for m in step.teacher.modules() if isinstance(m, Experts) for p in m.parameters()}

        def part(name, p):
            return (0, first[id(p)]) if id(p) in first else None

        with Checkpoint(cfg.teacher.path) as ckpt:
            load_local(step.teacher.model, ckpt, dist.device, part=part)
    return PlacedTeacher(step.teacher_targets, step.teacher)


def place_tensor_parallel(step, cfg: Config, dist: Dist, ds_config: dict | None) -> PlacedTeacher:
    path = cfg.teacher.path if is_meta(step.teacher) else None
    placed = step.with_teacher(tensor_parallel(step.teacher, cfg.engine.tp_size, path))
    return PlacedTeacher(placed.teacher_targets, placed.teacher)


def autotp_slice(model: nn.Module, ckpt: Checkpoint):
    """The `part` of `load_local` for a model AutoTP has split: (dim, start) of this rank's slice of
    a split parameter, from the split its layer recorded (`_partition_sizes`, `tp_index`; the dim is
    the one where this rank's shape differs from the stored one); None for one kept whole."""
    owners = {
        f"{name}.{attr}": m
        for name, m in model.named_modules()
        if hasattr(m, "_partition_sizes")
        for attr in ("weight", "bias")
    }

    def part(name: str, p: torch.Tensor):
        stored = ckpt.shape(name)
        if name not in owners or list(p.shape) == stored:
            return None
        m = owners[name]
        dim = next(d for d, (a, b) in enumerate(zip(p.shape, stored, strict=True)) if a != b)
        sizes = m._partition_sizes
        if sizes[m.tp_index] != p.shape[dim]:
            raise RuntimeError(f"AutoTP split {sizes} of {name} does not give this rank's {list(p.shape)}")
        return dim, sum(sizes[: m.tp_index])

    return part


def tensor_parallel(teacher, tp_size: int, path: str | None = None) -> TensorParallelTeacher:
    """AutoTP over groups of tp_size ranks. The output head stays whole on every rank (the loss
    reads it directly), so it is hidden from AutoTP, which would otherwise split it. A teacher on the
    meta device is split as shapes only; each rank then reads its slices (and the whole head and
    unsplit weights) from `path`."""
    import deepspeed

    model = teacher.model
    head = model.get_output_embeddings()
    parent, attr = next((m, n) for m in model.modules() for n, c in m.named_children() if c is head)
    setattr(parent, attr, nn.Identity())
    try:
        engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=model.dtype, replace_with_kernel_inject=False
        )
    finally:
        setattr(parent, attr, head)
    if path is not None:
        device = next(p.device for p in model.parameters() if not p.is_meta)
        with Checkpoint(path) as ckpt:
            load_local(model, ckpt, device, part=autotp_slice(model, ckpt))
    return TensorParallelTeacher(teacher, engine.mp_group)


def place_megatron(step, cfg: Config, dist: Dist, ds_config: dict | None) -> PlacedTeacher:
    """The LLaDA2 teacher rebuilt from megatron-core over tp_size x ep_size groups of the student's
    ranks, its weights read per rank from teacher.path or engine.megatron_checkpoint."""
    from megatron.core import parallel_state

    from tide_ds.engine.megatron import build_megatron_teacher

    e, teacher = cfg.engine, step.teacher
    built = build_megatron_teacher(
        teacher.model.config,
        teacher.mask_token_id,
        tp=e.tp_size,
        ep=e.ep_size,
        dtype=teacher.model.dtype,
        hf_path=cfg.teacher.path,
        checkpoint=e.megatron_checkpoint,
    )
    if e.tp_size > 1:
        built = TensorParallelTeacher(built, parallel_state.get_tensor_model_parallel_group())
    placed = step.with_teacher(built)
    return PlacedTeacher(placed.teacher_targets, placed.teacher)


# engine.teacher_placement -> its function (the config's Literal lists the same names; a test checks)
PLACEMENTS: dict[str, Callable[..., PlacedTeacher]] = {
    "replicate": place_replicate,
    "zero3": place_zero3,
    "expert_parallel": place_expert_parallel,
    "tensor_parallel": place_tensor_parallel,
    "megatron": place_megatron,
}


# -- ZeRO-3: the teacher call as the forward of a partitioned module ----------------------------


def register_head(module: nn.Module, model) -> None:
    """The output head is read outside its Linear's forward: ZeRO-3 must gather it for `module`."""
    import deepspeed

    for p in (model.output_weight, model.output_bias):
        if p is not None:
            deepspeed.zero.register_external_parameter(module, p)


class _TeacherCall(nn.Module):
    """The teacher call as a module forward, for a ZeRO-3 partitioned teacher."""

    def __init__(self, step):
        super().__init__()
        self.teacher = step.teacher
        self._step = step
        register_head(self, step.teacher)

    def forward(self, noised):
        # Targets may carry the teacher's head for the student's loss to use later, after this
        # forward has released the gathered parameters: hand out a whole copy instead.
        head = [p for p in (self.teacher.output_weight, self.teacher.output_bias) if p is not None]
        return _replace_params(self._step.teacher_targets(noised), head)


def _replace_params(obj, params):
    if any(obj is p for p in params):
        return obj.detach().clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _replace_params(getattr(obj, f.name), params) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def zero3_config(student_ds: dict, dtype: torch.dtype) -> dict:
    """The teacher's ZeRO-3 config: the student's batch, the teacher's `dtype`, stage 3, no optimizer."""
    zero = dict(student_ds.get("zero_optimization", {}))
    zero.update(stage=3)
    for k in ("offload_optimizer", "reduce_scatter", "overlap_comm", "contiguous_gradients", "reduce_bucket_size"):
        zero.pop(k, None)
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    teacher_ds = {k: student_ds[k] for k in (*batch_keys, "steps_per_print")}
    teacher_ds["zero_optimization"] = zero
    # The teacher keeps its own dtype (teacher.dtype), whatever the student's precision: DeepSpeed
    # casts a module to the precision its config enables, so that is set from the teacher's dtype.
    teacher_ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    teacher_ds["fp16"] = {"enabled": dtype == torch.float16}
    return teacher_ds


def largest_layer(module: nn.Module) -> int:
    """Elements of the largest decoder layer (a member of the longest nn.ModuleList), counted on
    whole parameters whether or not they are ZeRO-3 partitions already."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in max(lists, key=len))


def with_one_layer_ahead(teacher_ds: dict, layer: int) -> dict:
    """The teacher's gathers bounded to the layer it runs and the next: DeepSpeed's defaults (a
    prefetch bucket of 5e7 elements, up to 1e9 live) would hold tens of layers of a frozen
    forward at once, several times one layer's bytes, where one layer ahead already overlaps
    the next layer's gather with this one's compute."""
    zero = dict(teacher_ds["zero_optimization"])
    zero.update(stage3_prefetch_bucket_size=layer, stage3_max_live_parameters=2 * layer)
    return {**teacher_ds, "zero_optimization": zero}


def zero3_teacher(module: nn.Module, teacher_ds: dict, group):
    """`module`'s parameters partitioned over the ranks (ZeRO-3, no optimizer), gathered over
    `group`, a process group of its own, so its gathers never interleave with the student's
    collectives even when the two run at once (train.scheduler=overlap). Parameters partitioned
    already (built under zero.Init) stay as they are. Returns the DeepSpeed engine (callable)."""
    import deepspeed

    dtype = next(module.parameters()).dtype
    deepspeed.zero.Init(module=module, data_parallel_group=group, config_dict_or_path=teacher_ds, dtype=dtype)
    teacher_ds = with_one_layer_ahead(teacher_ds, largest_layer(module))
    engine, _, _, _ = deepspeed.initialize(model=module, config=teacher_ds)
    engine.eval()
    return engine
