"""The LLaDA2-style MoE teacher built from megatron-core: tensor and expert parallel together.

`engine.teacher_placement: megatron` (with `engine.tp_size`, `engine.ep_size`) builds the teacher
from megatron-core modules on parallel_state groups over the student's ranks: attention, dense
MLPs, shared experts and the embedding split over tensor-parallel groups of tp_size ranks; the
routed experts split over expert-parallel groups of ep_size ranks (megatron-core's MoE layer,
sigmoid group-limited router with expert bias, alltoall token dispatcher; expert tensor
parallelism 1, so an expert is never split). The output head stays whole on every rank: the loss
reads it directly. Weights come from the published HF LLaDA2 layout (safetensors, each rank reading
only its own slices) or from a megatron `dist_checkpointing` checkpoint written at any tp / ep.

Megatron-core computes in [sequence, batch, hidden]; the teacher takes and returns [batch, ...].
Ranks of a tensor-parallel group compute one batch together, so the teacher call gathers their
micro-batches (`placement.TensorParallelTeacher`). Needs `pip install tide_ds[megatron]`.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
from torch import nn

from tide_ds.config import ConfigError
from tide_ds.models.llada2 import LLaDA2MoeConfig
from tide_ds.models.load import Checkpoint

INSTALL = "pip install 'tide_ds[megatron]'"


def require_megatron() -> None:
    """megatron-core imports, or one line naming the extra to install."""
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" on import
            warnings.simplefilter("ignore")
            import megatron.core  # noqa: F401
            import psutil  # noqa: F401  (dist_checkpointing imports it without declaring it)
    except ImportError as e:
        raise ConfigError(
            f"engine.teacher_placement=megatron needs megatron-core ({e.name} is missing): {INSTALL}"
        ) from None


def check_config(c: LLaDA2MoeConfig, tp: int, ep: int, world: int) -> None:
    """Refuses, before anything is built, what megatron-core cannot split or does not compute alike."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"engine.teacher_placement=megatron: {msg}")

    need(
        world % tp == 0 and world % ep == 0,
        f"engine.tp_size={tp} and engine.ep_size={ep} must each divide the number of ranks ({world})",
    )
    for name in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"):
        need(
            getattr(c, name) % tp == 0, f"engine.tp_size={tp} does not divide the teacher's {name} ({getattr(c, name)})"
        )
    need(
        c.moe_intermediate_size * c.num_shared_experts % tp == 0,
        f"engine.tp_size={tp} does not divide the shared experts' width",
    )
    need(c.num_experts % ep == 0, f"engine.ep_size={ep} does not divide the teacher's {c.num_experts} experts")
    need(
        not c.use_bias,
        "use_bias: true (a bias on the attention output) is not supported; use "
        "engine.teacher_placement=expert_parallel",
    )
    need(
        c.num_experts_per_tok == 1 or c.norm_topk_prob,
        "norm_topk_prob: false is not supported (megatron-core normalises sigmoid weights)",
    )
    # megatron-core scores a group by its top (top_k / topk_group) experts; LLaDA2 by its top 2
    per_group = min(2, c.num_experts // c.n_group)
    need(
        c.n_group == 1 or c.num_experts_per_tok // c.topk_group == per_group,
        f"num_experts_per_tok / topk_group = {c.num_experts_per_tok} / {c.topk_group} must be {per_group} "
        f"(megatron-core scores a group by its top num_experts_per_tok // topk_group experts)",
    )


def transformer_config(c: LLaDA2MoeConfig, tp: int, ep: int, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig

    k = c.first_k_dense_replace
    return TransformerConfig(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads,
        kv_channels=c.head_dim,
        ffn_hidden_size=c.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        qk_layernorm=c.use_qk_norm,
        add_bias_linear=False,
        add_qkv_bias=c.use_qkv_bias,
        gated_linear_unit=True,
        activation_func=nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=c.num_experts,
        moe_ffn_hidden_size=c.moe_intermediate_size,
        moe_layer_freq=[0] * k + [1] * (c.num_hidden_layers - k),
        moe_router_topk=c.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_dtype="fp32",
        moe_router_num_groups=c.n_group if c.n_group > 1 else None,
        moe_router_group_topk=c.topk_group if c.n_group > 1 else None,
        moe_router_topk_scaling_factor=c.routed_scaling_factor,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=(c.moe_intermediate_size * c.num_shared_experts or None),
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


class LLaDA2Megatron(nn.Module):
    """Embedding, rotary, megatron-core TransformerBlock (with the final norm) and a whole head."""

    def __init__(self, c: LLaDA2MoeConfig, tp: int, ep: int, dtype: torch.dtype):
        super().__init__()
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.transformer_block import TransformerBlock

        self.hf_config = c
        config = transformer_config(c, tp, ep, dtype)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        for layer in spec.layer_specs:  # LLaDA2 attends both ways; a padding mask hides padded keys
            layer.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
        self.embedding = LanguageModelEmbedding(
            config, c.vocab_size, c.max_position_embeddings, position_embedding_type="rope"
        )
        self.rotary = RotaryEmbedding(
            c.head_dim,
            rotary_percent=c.rope_dim / c.head_dim,
            rotary_base=c.rope_parameters["rope_theta"],
            use_cpu_initialization=config.use_cpu_initialization,
        )
        self.decoder = TransformerBlock(config, spec, post_process=True)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.head = nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, l], attention_mask [b, l] (1 = real token) -> final hidden states [b, l, H]."""
        h = self.embedding(input_ids=input_ids, position_ids=None)  # [l, b, H]
        mask = None if attention_mask is None else ~attention_mask.bool()[:, None, None, :]  # True: hidden
        h = self.decoder(hidden_states=h, attention_mask=mask, rotary_pos_emb=self.rotary(input_ids.shape[1]))
        return h.transpose(0, 1)

    def sharded_state_dict(self, prefix: str = ""):
        """megatron-core's sharded tensors (split by tp / ep); the head is replicated."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = make_sharded_tensors_for_checkpoint({"head": self.head}, prefix)
        for name in ("embedding", "decoder"):
            out.update(getattr(self, name).sharded_state_dict(prefix=f"{prefix}{name}."))
        return out


class MegatronTeacher(nn.Module):
    """The teacher interface (hidden_states, output_weight, output_bias, vocab_size, mask_token_id)
    over an LLaDA2Megatron; its inputs are whole micro-batches of one tensor-parallel group."""

    def __init__(self, model: LLaDA2Megatron, mask_token_id: int):
        super().__init__()
        self.model = model.eval()
        self.mask_token_id = mask_token_id

    def train(self, mode: bool = True):
        return super().train(False)  # frozen

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.head

    @property
    def output_bias(self):
        return None

    @property
    def vocab_size(self) -> int:
        return self.model.head.shape[0]

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        return self.model(input_ids, attention_mask)


# -- parallel groups --------------------------------------------------------------------------------


def init_groups(tp: int, ep: int) -> None:
    """parallel_state over every rank of the job (the student's ranks), tp x ep as asked; the
    groups of an earlier megatron teacher in this process are replaced."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from torch.distributed import distributed_c10d

    from tide_ds.engine import megatron_cpu

    megatron_cpu.apply()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron gives its groups 30 minutes unless told: engine.timeout_s, which group_timeout made
    # torch's default, in the whole minutes megatron counts
    minutes = max(1, math.ceil(distributed_c10d.default_pg_timeout.total_seconds() / 60))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=minutes,
    )
    # frozen inference: no dropout, so no CUDA RNG states to fork
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


# -- weights from the published HF layout -----------------------------------------------------------


class Slices:
    """`read(name, rows, cols)`: a slice of one tensor (rows or columns) of the teacher checkpoint."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __call__(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        if cols != slice(None):
            return self.ckpt.read(name, 1, cols.start, cols.stop)
        return self.ckpt.read(name, 0, rows.start or 0, rows.stop)


def _part(n: int, rank: int, size: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def hf_tensor(
    name: str, read: Slices, c: LLaDA2MoeConfig, tp_rank: int, tp: int, ep_rank: int, ep: int
) -> torch.Tensor:
    """This rank's part of megatron parameter `name`, read from the published LLaDA2 names."""
    if name == "head":
        return read("model.word_embeddings.weight" if c.tie_word_embeddings else "lm_head.weight")
    if name == "embedding.word_embeddings.weight":
        return read("model.word_embeddings.weight", _part(c.vocab_size, tp_rank, tp))
    if name == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    hf, rest = f"model.layers.{m.group(1)}.", m.group(2)
    simple = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.q_layernorm.weight": "attention.query_layernorm.weight",
        "self_attention.k_layernorm.weight": "attention.key_layernorm.weight",
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.router.expert_bias": "mlp.gate.expert_bias",
    }
    if rest in simple:
        return read(hf + simple[rest])
    if rest.startswith("self_attention.linear_qkv."):
        return _qkv(read, hf + "attention.query_key_value." + rest.rsplit(".", 1)[1], c, tp_rank, tp)
    if rest == "self_attention.linear_proj.weight":
        return read(hf + "attention.dense.weight", cols=_part(c.num_attention_heads * c.head_dim, tp_rank, tp))
    m = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", rest)
    if m is not None:  # whole experts: expert tensor parallelism is 1
        expert = ep_rank * (c.num_experts // ep) + int(m.group(1))
        return _mlp(read, f"{hf}mlp.experts.{expert}.", m.group(2), c.moe_intermediate_size, 0, 1)
    m = re.fullmatch(r"mlp\.(shared_experts\.)?(linear_fc[12])\.weight", rest)
    if m is not None:
        width = c.moe_intermediate_size * c.num_shared_experts if m.group(1) else c.intermediate_size
        return _mlp(read, hf + ("mlp.shared_experts." if m.group(1) else "mlp."), m.group(2), width, tp_rank, tp)
    raise KeyError(name)


def _mlp(read, prefix: str, which: str, width: int, tp_rank: int, tp: int) -> torch.Tensor:
    """fc1 = [gate ; up] rows of this rank (megatron's GLU layout per shard); fc2 = down's columns."""
    part = _part(width, tp_rank, tp)
    if which == "linear_fc1":
        return torch.cat([read(prefix + "gate_proj.weight", part), read(prefix + "up_proj.weight", part)])
    return read(prefix + "down_proj.weight", cols=part)


def _qkv(read, name: str, c: LLaDA2MoeConfig, tp_rank: int, tp: int) -> torch.Tensor:
    """HF: [all q heads ; all k heads ; all v heads]. Megatron: per query group (kv head) of this
    rank, [its q heads ; its k ; its v]."""
    d, groups, per = c.head_dim, c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
    mine = _part(groups, tp_rank, tp)
    n = mine.stop - mine.start
    q = read(name, slice(mine.start * per * d, mine.stop * per * d))
    k = read(name, slice((c.num_attention_heads + mine.start) * d, (c.num_attention_heads + mine.stop) * d))
    v = read(
        name, slice((c.num_attention_heads + groups + mine.start) * d, (c.num_attention_heads + groups + mine.stop) * d)
    )
    rest = q.shape[1:]
    return torch.cat([q.view(n, per * d, *rest), k.view(n, d, *rest), v.view(n, d, *rest)], dim=1).flatten(0, 1)


def load_hf(model: LLaDA2Megatron, path: str) -> None:
    from megatron.core import parallel_state as ps

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    state = model.state_dict()
    with torch.no_grad(), Checkpoint(path) as ckpt:
        read = Slices(ckpt)
        for name, target in state.items():
            if name.endswith("_extra_state"):  # Transformer Engine / fp8 metadata: none here
                continue
            value = hf_tensor(name, read, model.hf_config, tp_rank, tp, ep_rank, ep)
            if value.shape != target.shape:
                raise ConfigError(
                    f"teacher checkpoint: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value)


# -- megatron dist_checkpointing --------------------------------------------------------------------


def save_dist_checkpoint(teacher: MegatronTeacher, directory: str) -> None:
    """Writes the teacher as a megatron dist_checkpointing checkpoint (every rank calls this)."""
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(teacher.model.sharded_state_dict(), directory)


def load_dist_checkpoint(model: LLaDA2Megatron, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise ConfigError(
            f"engine.megatron_checkpoint={directory} is not a megatron dist_checkpointing directory (no metadata.json)"
        )
    state = dist_checkpointing.load(model.sharded_state_dict(), directory)
    model.load_state_dict(state, strict=True)


# -- the placement ----------------------------------------------------------------------------------


def build_megatron_teacher(
    c: LLaDA2MoeConfig,
    mask_token_id: int,
    *,
    tp: int,
    ep: int,
    dtype: torch.dtype,
    hf_path: str | None = None,
    checkpoint: str | None = None,
) -> MegatronTeacher:
    """Groups, model and weights (from `checkpoint` when given, else the HF directory `hf_path`)."""
    require_megatron()
    init_groups(tp, ep)
    model = LLaDA2Megatron(c, tp, ep, dtype)
    if checkpoint is not None:
        load_dist_checkpoint(model, checkpoint)
    else:
        load_hf(model, hf_path)
    return MegatronTeacher(model, mask_token_id)
