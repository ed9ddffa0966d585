"""An LLaDA2-style MoE diffusion LM (LLaDA2.0-mini architecture), loadable from published checkpoints.

Config keys and parameter names follow the published `llada2_moe` format (TIDE.md section 9), so a
real checkpoint directory loads with `AutoModelForCausalLM.from_pretrained(path)` once this module
is imported. Attention is bidirectional. Routed experts are stored stacked ([E, out, in] per
projection) and run as three grouped GEMMs over tokens sorted by expert: no Python loop over
experts and no host synchronisation in the forward. With experts split over ranks (`shard_experts`,
expert parallelism) tokens travel to their experts' rank by all_to_all, at one host sync per MoE
layer (the exchange sizes). On disk they keep the published per-expert
names (`mlp.experts.<e>.{gate,up,down}_proj.weight`): a checkpoint conversion registered with
transformers stacks them on load and splits them again on save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

MODEL_TYPE = "llada2_moe"


class LLaDA2MoeConfig(PreTrainedConfig):
    """Defaults are LLaDA2.0-mini's (16B total / 1.4B active)."""

    model_type = MODEL_TYPE

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120  # the dense FFN of layers < first_k_dense_replace
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    rope_parameters: dict | None = None  # from the published `rope_theta` / `rope_scaling` keys
    rms_norm_eps: float = 1e-6
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_qk_norm: bool = True
    norm_head: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 156892
    mask_token_id: int | None = 156895
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        kwargs.setdefault("partial_rotary_factor", 0.5)
        kwargs.setdefault("rope_theta", 600000.0)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Refuses settings this implementation does not compute, naming the key."""
        problems = []
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_scaling type {rope.get('rope_type')!r} (only default RoPE, rope_scaling: null)")
        if self.score_function != "sigmoid":
            problems.append(f"score_function {self.score_function!r} (only 'sigmoid')")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} (only 'silu')")
        if self.norm_head:
            problems.append("norm_head: true")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            problems.append(
                f"num_experts {self.num_experts} / n_group {self.n_group} / topk_group {self.topk_group} "
                f"(experts must split evenly into groups, 1 <= topk_group <= n_group)"
            )
        elif self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts of topk_group groups")
        if problems:
            raise ValueError(f"unsupported {MODEL_TYPE} config: " + "; ".join(problems))

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class PartialRotary(nn.Module):
    """RoPE on the first rope_dim dims of each head (rotate-half within them); the rest pass."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.register_buffer("inv_freq", self.inv_freq_for(config), persistent=False)

    @staticmethod
    def inv_freq_for(config: LLaDA2MoeConfig) -> torch.Tensor:
        dim, theta = config.rope_dim, config.rope_parameters["rope_theta"]
        steps = torch.arange(0, dim, 2, dtype=torch.float32)  # host: a buffer's value, moved with the module
        return 1.0 / theta ** (steps / dim)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, l, rope_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.use_qkv_bias
        )
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        self.qk_norm = config.use_qk_norm

    def forward(self, x, cos, sin, mask):
        b, length, _ = x.shape
        qkv = self.query_key_value(x).view(b, length, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        if self.qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.dense(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; selection on scores + expert_bias, limited to the best topk_group groups
    (a group's score: the sum of its two best biased scores); weights are the picked experts'
    unbiased scores, normalised to sum to 1 (when more than one is picked), times routed_scaling_factor."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scale, self.normalize = config.routed_scaling_factor, config.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, H] -> (expert ids [n, k], fp32 weights [n, k])."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores + self.expert_bias.float()
        grouped = biased.view(x.shape[0], self.n_group, -1)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1 and self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale


class Experts(nn.Module):
    """Routed experts as stacked weights, run with grouped GEMMs over expert-sorted tokens.

    Unsharded, every expert is here. After `shard_experts` this rank holds only experts
    [first, first + E / ep) of its expert-parallel group: tokens routed to other experts travel to
    their rank and back with two all_to_alls (frozen inference only: no gradient through them)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.num_experts = num_experts  # in the whole model, sharded or not
        self.group = None  # the expert-parallel process group once sharded
        self.first = 0  # the first expert this rank holds

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [n, H], ids / weights [n, k] -> sum_k weights * expert_{ids}(x), [n, H]."""
        n, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        sorted_x = x.index_select(0, order // k)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        run = self.run_sorted if self.group is None else self.run_dispatched
        out_sorted = run(sorted_x, counts)
        out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)  # back to (token, slot) order
        return (out.view(n, k, -1).float() * weights[..., None]).sum(1).to(x.dtype)

    def run_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The one expert computation: rows of x sorted by local expert, counts[e] rows for expert e."""
        offs = counts.cumsum(0).to(torch.int32)  # group ends, on device: no sync
        h = F.silu(grouped_mm(x, self.gate_proj, offs)) * grouped_mm(x, self.up_proj, offs)
        return grouped_mm(h, self.down_proj, offs)

    def run_dispatched(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert (so by owning rank) go to their rank, run there, come back."""
        dist, group = torch.distributed, self.group
        ep, local = dist.get_world_size(group), self.gate_proj.shape[0]
        send_counts = counts.view(ep, local)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_split, recv_split = send_counts.sum(1), recv_counts.sum(1)
        splits = torch.stack([send_split, recv_split]).tolist()  # sync point: one per MoE layer
        received = x.new_empty(sum(splits[1]), x.shape[1])
        dist.all_to_all_single(received, x.contiguous(), splits[1], splits[0], group=group)
        # received rows are grouped by (source rank, expert): regroup them by expert
        expert = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        order = expert.argsort(stable=True)
        out = self.run_sorted(received.index_select(0, order), recv_counts.sum(0))
        out = torch.empty_like(out).index_copy_(0, order, out)
        back = x.new_empty(x.shape[0], out.shape[1])
        dist.all_to_all_single(back, out, splits[0], splits[1], group=group)
        return back


def shard_experts(model: nn.Module, group) -> int:
    """Keeps on this rank only its contiguous slice of every MoE layer's routed experts (E / ep of
    them, ep = the size of `group`), frees the rest, and routes tokens over `group` from then on.
    Router, shared experts and dense parts stay whole. Returns the number of layers sharded."""
    ep, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    layers = [m for m in model.modules() if isinstance(m, Experts)]
    for m in layers:
        if m.num_experts % ep:
            raise ValueError(f"{m.num_experts} experts do not split over {ep} ranks")
        size = m.num_experts // ep
        for name in ("gate_proj", "up_proj", "down_proj"):
            whole = getattr(m, name)
            part = whole.detach()[rank * size : (rank + 1) * size].clone()  # a copy: the whole stack is freed
            setattr(m, name, nn.Parameter(part, requires_grad=whole.requires_grad))
        m.group, m.first = group, rank * size
    return len(layers)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by group, group g ending at offs[g]) times weight[g].T: [S, in] -> [S, out]."""
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=offs)


class SparseMoe(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.gate(flat)
        out = self.experts(flat, ids, weights).view_as(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = index < config.first_k_dense_replace
        self.mlp = MLP(config.hidden_size, config.intermediate_size) if dense else SparseMoe(config)

    def forward(self, h, cos, sin, mask):
        h = h + self.attention(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # linears, embeddings, norms (skips weights already loaded)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                init.normal_(p, 0.0, std)
        elif isinstance(module, Router):
            init.normal_(module.weight, 0.0, std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, PartialRotary):  # a non-persistent buffer: recomputed, never loaded
            init.copy_(module.inv_freq, PartialRotary.inv_freq_for(self.config))


def bidirectional_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """None (all visible), a [b, l] padding mask (1/True = real token), or a ready 4D mask
    (bool, True = may attend, or additive float) -> what SDPA reads."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = PartialRotary(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        h = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        mask = bidirectional_mask(attention_mask, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """The published architecture name; logits are fp32."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return MaskedLMOutput(logits=self.lm_head(hidden).float())


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, LLaDA2MoeConfig, exist_ok=True)
    AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
    AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
    # on disk: mlp.experts.<e>.<proj>.weight; in memory: mlp.experts.<proj> stacked over experts
    register_checkpoint_conversion_mapping(
        MODEL_TYPE,
        [
            WeightConverter(
                source_patterns=[f"mlp.experts.*.{proj}.weight"],
                target_patterns=f"mlp.experts.{proj}",
                operations=[MergeModulelist(dim=0)],
            )
            for proj in ("gate_proj", "up_proj", "down_proj")
        ],
        overwrite=True,
    )


_register()
