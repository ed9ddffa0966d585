"""`tide-ds plan`: each rank's memory, by part, before anything is launched.

The models are built on the meta device from their config.json (or student.init), so parameter
counts are exact and nothing is allocated or downloaded. The run's batch, precision and ZeRO stage
come from `settle`, as the run itself takes them. Per rank, in bytes:

  student parameters, gradients, optimizer states   by ZeRO stage (params split at 3, gradients
                        at 2 and 3, optimizer states at 1-3 and under bf16 at 0, where DeepSpeed's
                        bf16 optimizer partitions its fp32 states) and offload (moved to the host)
  ZeRO buffers          gradient reduction buckets (stage 1/2, two with overlap_comm) and, at stage
                        3, the prefetch bucket of gathered parameters
  teacher               by placement: replicate whole; zero3 1/N plus one gathered layer;
                        expert_parallel experts / ep + the rest; tensor_parallel the layers'
                        linear weights / tp + the rest; megatron experts / ep, attention, dense and
                        shared MLPs and embedding / tp, the rest whole
  student activations   what the [x_t ; x_0] forward (2 x data.seq_len tokens) keeps for backward,
                        without and with activation checkpointing (then: each layer's input plus
                        two layers' working sets); the verdict uses engine.activation_checkpointing
  teacher activations   no grad: one layer's live set and its output hidden states
  fused loss workspace  the tiled head's fp32 [R, V] blocks (R from tide_ds.kernels.ops.block_rows),
                        the fp32 head-weight gradient and the gathered hidden rows
  data prefetch         train.data_prefetch micro-batches of token ids
  optimizer step        the fp32 gradients of the partition and torch AdamW's temporaries

The peak is what is held throughout plus the larger of two phases that never overlap: forward
and backward (activations, the teacher's, the loss workspace) and the optimizer step.

Activation figures are estimates from the layer shapes (elements each op keeps, counted for the
transformers Qwen3/Llama decoder layer); model states are exact. On GPU the caching allocator
adds fragmentation and the CUDA context (about 0.5-1 GiB) comes on top; on CPU (`--device cpu`,
what the validation test measures as resident memory) a reduction bucket counts only the pages the
gradients fill, while CUDA allocates it whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import torch
from torch import nn

from tide_ds.config import Config, ConfigError, load_config, needs_teacher, run_terms, uses_comp_demo
from tide_ds.engine.placement import check_layout, largest_layer
from tide_ds.engine.plan import RunPlan, load_ds_config, settle
from tide_ds.kernels.ops import DEFAULT_BLOCK_BYTES, block_rows
from tide_ds.models import llada2
from tide_ds.models.build import _DTYPES, a2d_config, dtype_name, fresh_config, load_tokenizer, student_family

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
GIB = 2**30
# fp32 [R, V] buffers the fused head holds at once: the CPU twin a few (logits, probabilities,
# a KL's full row), the CUDA kernels work in place in the logits block
_LOSS_BLOCKS = {"cpu": 3, "cuda": 1}
# int64 tensors per token a prepared micro-batch carries: student x_0, x_t, labels, chunk ids,
# masked set, positions; teacher ids, chunk ids, its x_t and attention mask
_BATCH_TENSORS = {"student": 6, "teacher": 4}
PARTS = (
    ("student_params", "student parameters"),
    ("student_grads", "student gradients"),
    ("optimizer", "optimizer states"),
    ("zero_buffers", "ZeRO buffers"),
    ("teacher", "teacher"),
    ("activations", "student activations"),
    ("teacher_activations", "teacher activations"),
    ("loss_workspace", "fused loss workspace"),
    ("data_prefetch", "data prefetch"),
    ("step_workspace", "optimizer step workspace"),
)
FORWARD_BACKWARD = ("activations", "teacher_activations", "loss_workspace")
OPTIMIZER_STEP = ("step_workspace",)


def parse_bytes(text: str, key: str = "--device-memory") -> int:
    """'80GiB', '80GB', '81920MiB', '1e9' -> bytes; one clear line for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f"{key}={text!r}: give a number with a unit among B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 80GiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


# -- the models' shapes, on the meta device --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the memory model reads of a transformer: its parameters and one layer's widths."""

    params: int  # parameters (tied ones once)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the dense MLP width (a MoE layer's: top-k x expert width + shared experts)
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer
    experts: int = 0  # parameters of routed experts (all layers)
    layer_linear: int = 0  # parameters of the decoder layers' nn.Linear modules (what AutoTP splits)
    embedding: int = 0  # input embedding parameters
    num_experts: int = 0
    moe_width: int = 0  # routed experts' summed width per token (top-k x moe_intermediate_size)
    qk_norm: bool = True


def _meta(config) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = config.model_type == llada2.MODEL_TYPE or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    with torch.device("meta"), no_init_weights():
        model = auto.from_config(config)
    model.tie_weights()
    return model


_SHAPES: dict[str, Shapes] = {}


def shapes(config) -> Shapes:
    """The Shapes of the model `config` builds, counted on the meta device (once per config)."""
    key = config.to_json_string()
    if key not in _SHAPES:
        _SHAPES[key] = _count(config)
    return _SHAPES[key]


def _count(config) -> Shapes:
    model = _meta(config)
    unique = {id(p): p for p in model.parameters()}
    count = lambda params: sum(p.numel() for p in {id(p): p for p in params}.values())  # noqa: E731
    layers = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)  # the decoder layers
    experts = [m for m in model.modules() if isinstance(m, llada2.Experts)]
    linear = [p for layer in layers for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    c = config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    topk = getattr(c, "num_experts_per_tok", 0) or 0
    moe_width = topk * getattr(c, "moe_intermediate_size", 0) if experts else 0
    shared = (getattr(c, "num_shared_experts", 0) or 0) * getattr(c, "moe_intermediate_size", 0)
    return Shapes(
        params=sum(p.numel() for p in unique.values()),
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=max(c.intermediate_size, moe_width + shared),
        vocab=c.vocab_size,
        largest_layer=largest_layer(model),
        experts=count(p for m in experts for p in m.parameters()),
        layer_linear=count(linear),
        embedding=count(model.get_input_embeddings().parameters()),
        num_experts=experts[0].num_experts if experts else 0,
        moe_width=moe_width,
        qk_norm=c.model_type != "llama",
    )


def student_config(cfg: Config):
    """The student's transformers config, its vocabulary grown to the tokenizer's (plus the mask
    token) when a tokenizer is there to read, as `build_student` resizes it."""
    from transformers import AutoConfig

    s = cfg.student
    tokens = _student_tokens(cfg)
    if s.path is None:
        return fresh_config(s, "student", tokens)
    family = student_family(s.path, "student.path")
    config = a2d_config(s.path, family).get("config") or AutoConfig.from_pretrained(s.path)
    if tokens is not None and tokens > config.vocab_size:
        config.vocab_size = tokens
    return config


def _student_tokens(cfg: Config) -> int | None:
    """Tokens of the student's tokenizer with the mask token added, or None where none is given."""
    path = cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path
    if path is None or not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return None
    tokenizer = load_tokenizer(path, "student.tokenizer")
    known = tokenizer.convert_tokens_to_ids(cfg.diffusion.mask_token)
    return len(tokenizer) + int(known is None or known == tokenizer.unk_token_id)


def teacher_config(cfg: Config):
    from transformers import AutoConfig

    path = cfg.teacher.path
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"teacher.path={path} has no config.json; the plan reads the teacher's shapes from it")
    return AutoConfig.from_pretrained(path)


# -- the plan --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    world: int
    stage: int
    placement: str
    micro_batch: int
    checkpointing: bool
    device_memory: int
    parts: dict  # name -> bytes per rank (activations: the figure the verdict uses)
    activations_full: int
    activations_checkpointed: int
    host: int  # offloaded optimizer states / parameters, on the host per rank
    largest_micro_batch: int  # 0: not even one fits

    @property
    def total(self) -> int:
        return total(self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Everything the per-rank figures depend on except the micro-batch."""

    cfg: Config
    ds: dict
    world: int
    device: str
    student: Shapes
    teacher: Shapes | None
    teacher_len: int


def memory_plan(
    plan: RunPlan,
    ds_config: dict | None,
    device_memory: int = 80 * GIB,
    device: str = "cuda",
    teacher_len: int | None = None,
) -> MemoryPlan:
    """Each rank's bytes by part for the settled run `plan` (and its DeepSpeed config), the verdict
    against `device_memory`, and the largest micro-batch that fits. teacher_len: tokens of a
    teacher row (None: data.seq_len)."""
    cfg = plan.config
    teacher = None
    if needs_teacher(run_terms(cfg.recipe, cfg.terms, cfg.objective)) and not cfg.teacher.targets:
        config = teacher_config(cfg)
        teacher = shapes(config)
        name = (getattr(config, "architectures", None) or [config.model_type])[0]
        check_layout(cfg, plan.world, {teacher.num_experts} - {0}, config, name)
    inputs = _Inputs(
        cfg, ds_config or {}, plan.world, device, shapes(student_config(cfg)), teacher, teacher_len or cfg.data.seq_len
    )
    b = cfg.train.micro_batch_size
    parts, full, ckpt, host = _parts(inputs, b)
    lo, hi = 0, 1
    while hi <= 1 << 16 and total(_parts(inputs, hi)[0]) <= device_memory:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the total grows with the micro-batch: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(_parts(inputs, mid)[0]) <= device_memory else (lo, mid)
    return MemoryPlan(
        plan.world,
        _stage(inputs.ds),
        cfg.engine.teacher_placement if teacher is not None else "none",
        b,
        cfg.engine.activation_checkpointing,
        device_memory,
        parts,
        full,
        ckpt,
        host,
        lo,
    )


def _stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _offloaded(ds: dict, key: str) -> bool:
    return (ds.get("zero_optimization", {}).get(key) or {}).get("device", "none") in ("cpu", "nvme")


def _parts(x: _Inputs, b: int) -> tuple[dict, int, int, int]:
    cfg, n = x.cfg, x.world
    deepspeed = bool(x.ds) or n > 1
    p = x.student.params
    e = _DTYPES[dtype_name(cfg.student)].itemsize
    mixed = deepspeed and cfg.train.precision == "bf16"
    act = 2 if mixed else e  # the forward's dtype
    stage = _stage(x.ds) if deepspeed else 0
    # torch's AdamW makes its denominator sqrt(v) / c + eps from new tensors: on CPU (one tensor at a
    # time) two alive at once, on CUDA (foreach) one; DeepSpeed's own optimizers work in place
    adam_temps = 0 if "optimizer" in x.ds else (2 if x.device == "cpu" else 1)
    if not deepspeed:  # plain PyTorch: AdamW's two states in the weights' dtype
        params, grads, optimizer, buffers = p * e, p * e, 2 * p * e, 0
        step = adam_temps * p * e
    else:
        split = n if stage >= 1 or mixed else 1  # DeepSpeed's bf16 optimizer partitions its states
        params = p * act // (n if stage == 3 else 1)
        grads = p * act // (n if stage >= 2 else 1)
        optimizer = (12 if mixed else 2 * e) * p // split  # fp32 master copy + Adam's two moments
        # in the step: the partition's fp32 gradients (mixed precision) and AdamW's temporaries
        step = (4 if mixed else 0) * p // split + adam_temps * (4 if mixed else e) * p // split
        buffers = _zero_buffers(x, stage, p, act)
    host = 0
    if deepspeed and _offloaded(x.ds, "offload_optimizer"):  # the step runs on the host
        host, optimizer, step = host + optimizer + step, 0, 0
    if deepspeed and stage == 3 and _offloaded(x.ds, "offload_param"):
        host, params = host + params, 0
    full, ckpt = student_activations(x.student, b, 2 * cfg.data.seq_len, act, _sdpa(cfg.student, x.device))
    parts = {
        "student_params": params,
        "student_grads": grads,
        "optimizer": optimizer,
        "zero_buffers": buffers,
        "teacher": teacher_bytes(x),
        "activations": ckpt if cfg.engine.activation_checkpointing else full,
        "teacher_activations": teacher_activations(x, b),
        "loss_workspace": loss_workspace(x.student, b * cfg.data.seq_len, act, x.device),
        "data_prefetch": cfg.train.data_prefetch * b * 8 * _batch_tokens(x),
        "step_workspace": step,
    }
    return parts, full, ckpt, host


def total(parts: dict) -> int:
    """The peak: what is held throughout, plus the larger of the two phases, which never overlap
    (the activations are freed by the end of backward, before the optimizer step)."""
    held = sum(v for k, v in parts.items() if k not in FORWARD_BACKWARD + OPTIMIZER_STEP)
    return held + max(sum(parts[k] for k in FORWARD_BACKWARD), sum(parts[k] for k in OPTIMIZER_STEP))


def _batch_tokens(x: _Inputs) -> int:
    teacher = _BATCH_TENSORS["teacher"] * x.teacher_len if x.teacher is not None else 0
    return _BATCH_TENSORS["student"] * x.cfg.data.seq_len + teacher


def _zero_buffers(x: _Inputs, stage: int, p: int, act: int) -> int:
    """DeepSpeed's gradient buckets and, at stage 3, the gathered parameters in flight. On CPU only
    the pages written count: a bucket larger than the gradients is touched up to their size."""
    zero = x.ds.get("zero_optimization", {})
    if stage == 0:
        return 0
    bucket = int(zero.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):
        if not zero.get("contiguous_gradients", True):
            return 0
        width = 4 if stage == 1 else act  # ZeRO-1 stages the fp32 accumulator
        held = bucket * (2 if zero.get("overlap_comm", False) else 1)  # overlap_comm: two, filled in turn
        return _touched(held, p, x.device) * width
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    gathered = max(x.student.largest_layer, min(prefetch, p))
    return _touched(bucket, p, x.device) * act + gathered * act


def _touched(elements: int, p: int, device: str) -> int:
    """Elements of a gradient buffer in memory: on CPU only the pages the p gradients fill."""
    return min(elements, p) if device == "cpu" else elements


def teacher_bytes(x: _Inputs) -> int:
    """The teacher's parameter bytes this rank holds under its placement."""
    t = x.teacher
    if t is None:
        return 0
    e = _DTYPES[dtype_name(x.cfg.teacher)].itemsize
    eng = x.cfg.engine
    placement = eng.teacher_placement
    if placement == "replicate":
        held = t.params
    elif placement == "zero3":
        held = t.params // x.world + 2 * t.largest_layer  # the layer it runs and the next, gathered ahead
    elif placement == "expert_parallel":
        held = t.params - t.experts + t.experts // eng.ep_size
    elif placement == "tensor_parallel":
        held = t.params - t.layer_linear + t.layer_linear // eng.tp_size
    else:  # megatron: experts over ep; the layers' other linears and the embedding over tp
        split = t.layer_linear + t.embedding
        held = t.params - t.experts - split + t.experts // eng.ep_size + split // eng.tp_size
    return held * e


def _sdpa(model_cfg, device: str) -> bool:
    """Whether attention runs on SDPA with a dense [S, S] additive mask (flex on CUDA by default)."""
    return model_cfg.attn_backend == "sdpa" or (model_cfg.attn_backend == "auto" and device != "cuda")


def _layer_saved(s: Shapes, act: int) -> int:
    """Bytes one decoder layer keeps for backward per token: two RMSNorms (an fp32 copy of the
    input and the normalised output), q/k/v, q/k norms and rotary terms, k/v repeated to every
    head, the attention output and its contiguous copy, and the gated MLP's four intermediates."""
    h, d, q, kv = s.hidden, s.head_dim, s.heads, s.kv_heads
    norms = 2 * (4 + act) * h
    qkv = act * d * (q + 2 * kv)
    qk_norm = (4 + act) * d * (q + kv) if s.qk_norm else 0
    rotary = 2 * act * d * (q + kv)
    attention = act * d * (2 * q + 2 * q)  # k, v at every head; output and its contiguous copy
    mlp = 4 * act * s.intermediate
    return norms + qkv + qk_norm + rotary + attention + mlp


def student_activations(s: Shapes, b: int, seq: int, act: int, sdpa: bool) -> tuple[int, int]:
    """(bytes without, bytes with activation checkpointing) of the student's forward over `seq`
    tokens of b rows: what backward reads, plus one layer's working set during backward."""
    tokens = b * seq
    layer = tokens * _layer_saved(s, act)
    mask = b * seq * seq * act if sdpa else 0
    edges = tokens * s.hidden * act * 3  # embedding output, final norm, the x_t half's hidden states
    full = s.layers * layer + layer + mask + edges
    checkpointed = s.layers * tokens * s.hidden * act + 2 * layer + mask + edges
    return full, checkpointed


def teacher_activations(x: _Inputs, b: int) -> int:
    """No grad: one layer's live set (residual, norm, q/k/v, attention output, MLP or routed
    experts' intermediates, router scores), the output hidden states, and a dense mask under SDPA."""
    t = x.teacher
    if t is None:
        return 0
    e = _DTYPES[dtype_name(x.cfg.teacher)].itemsize
    kind = x.cfg.teacher.kind
    seq = x.teacher_len * (2 if kind == "wedlm" else 1)
    c = x.cfg
    comp_demo = 2 if uses_comp_demo(c.recipe, run_terms(c.recipe, c.terms, c.objective), c.objective) else 1
    tokens = b * seq * comp_demo
    per_token = e * (3 * t.hidden + t.head_dim * (t.heads + 2 * t.kv_heads) + t.head_dim * t.heads)
    per_token += e * 3 * t.intermediate + 4 * t.num_experts  # gate, up, product; fp32 router scores
    mask = b * comp_demo * seq * seq * e if _sdpa(x.cfg.teacher, x.device) else 0
    return tokens * per_token + tokens * t.hidden * e + mask


def loss_workspace(s: Shapes, rows: int, act: int, device: str) -> int:
    """The fused head's fp32 [R, V] blocks, the fp32 gradient of the head weight, the gathered
    hidden rows and their gradient (at most every x_t token of the micro-batch is a row)."""
    kind = "cuda" if device == "cuda" else "cpu"
    r = min(rows, block_rows(s.vocab, kind, DEFAULT_BLOCK_BYTES[kind]))
    return _LOSS_BLOCKS[kind] * r * s.vocab * 4 + 4 * s.vocab * s.hidden + 2 * rows * s.hidden * act


# -- printing --------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan_summary(plan: MemoryPlan) -> str:
    """One line: the total, the verdict and the largest micro-batch that fits."""
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    ckpt = "on" if plan.checkpointing else "off"
    return (
        f"memory plan: {_gib(plan.total)} GiB per rank of {_gib(plan.device_memory)} GiB ({verdict}; ZeRO "
        f"{plan.stage}, teacher {plan.placement}, micro-batch {plan.micro_batch}, activation checkpointing "
        f"{ckpt}); largest micro-batch that fits: {plan.largest_micro_batch}"
    )


def plan_table(plan: MemoryPlan) -> str:
    """Each part in GiB per rank, the total, the verdict."""
    rows = [f"{'part':<34} {'GiB per rank':>12}"]
    for key, label in PARTS:
        if key == "activations":
            for ckpt, value in ((False, plan.activations_full), (True, plan.activations_checkpointed)):
                used = "  (forward/backward)" if ckpt == plan.checkpointing else "  (not used)"
                name = f"{label} ({'checkpointed' if ckpt else 'full'})"
                rows.append(f"{name:<34} {_gib(value):>12}{used}")
            continue
        phase = "  (forward/backward)" if key in FORWARD_BACKWARD else "  (step)" if key in OPTIMIZER_STEP else ""
        rows.append(f"{label:<34} {_gib(plan.parts[key]):>12}{phase}")
    rows.append(f"{'peak (held + larger phase)':<34} {_gib(plan.total):>12}")
    if plan.host:
        rows.append(f"{'offloaded to the host (not in total)':<34} {_gib(plan.host):>12}")
    rows.append(plan_summary(plan))
    return "\n".join(rows)


def device_memory(device: torch.device) -> int:
    """The memory of one device: a GPU's total, or the host's (MemTotal) for a CPU run."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def startup_summary(plan: RunPlan, ds_config: dict | None, device: torch.device) -> str:
    """The summary line `tide-ds distill` prints at start-up, against this rank's device."""
    return plan_summary(memory_plan(plan, ds_config, device_memory(device), device.type))


# -- tide-ds plan ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--world", type=int, required=True, help="ranks of the run (GPUs)")
    p.add_argument("--device-memory", default="80GiB", help="memory of one device (default 80GiB)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the ranks run on (default cuda)")
    p.add_argument("--teacher-len", type=int, help="tokens of a teacher row (default: data.seq_len)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.micro_batch_size=4")


def run(args) -> int:
    if args.world < 1:
        raise ConfigError(f"--world must be >= 1, got {args.world}")
    if args.teacher_len is not None and args.teacher_len < 1:
        raise ConfigError(f"--teacher-len must be >= 1, got {args.teacher_len}")
    device_memory = parse_bytes(args.device_memory)
    cfg = load_config(args.config, args.overrides, check_files=False)
    ds_json = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else None
    plan, ds_config = settle(cfg, ds_json, args.world)
    print(plan_table(memory_plan(plan, ds_config, device_memory, args.device, args.teacher_len)))
    return 0
