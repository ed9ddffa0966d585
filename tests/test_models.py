"""Student (BD3LM over Qwen3 / Llama), teachers (LLaDA2-style MoE, WeDLM-style, generic HF), builders."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny import decoder, llada2, llada2_config, word_tokenizer
from transformers import AutoModelForCausalLM

from tide_ds.config import ConfigError, ModelConfig
from tide_ds.diffusion import Pattern, additive, attention_mask, bd3lm_attention_mask
from tide_ds.models import (
    BD3LMStudent,
    HFBidirectionalTeacher,
    LLaDA2MoeModelLM,
    LLaDA2Teacher,
    WeDLMTeacher,
    build_student,
    build_teacher,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# The mask rule, written out from the spec (TIDE.md section 2) with plain loops


def spec_mask(length: int, block: int, order: str = "xt_x0") -> torch.Tensor:
    n = 2 * length
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi_clean = (i >= length) == (order == "xt_x0")
            kj_clean = (j >= length) == (order == "xt_x0")
            bi, bj = (i % length) // block, (j % length) // block
            if not qi_clean and not kj_clean:
                out[i, j] = bi == bj
            elif not qi_clean and kj_clean:
                out[i, j] = bj < bi
            elif qi_clean and kj_clean:
                out[i, j] = bj <= bi
    return out


@pytest.mark.parametrize("length,block,order", [(12, 4, "xt_x0"), (10, 3, "xt_x0"), (12, 4, "x0_xt")])
def test_mask_rule_matches_spec(length, block, order):
    assert torch.equal(bd3lm_attention_mask(length, block, order=order), spec_mask(length, block, order))


def test_flex_block_mask_equals_dense_mask_on_cpu():
    """The BlockMask comes from the same rule: flex attention (eager, forward) equals SDPA."""
    from torch.nn.attention.flex_attention import flex_attention

    length, block, cpu = 40, 8, torch.device("cpu")
    for pattern in (Pattern(length, block), Pattern(length, block, "x0_xt")):
        bm = attention_mask("flex", pattern, 2 * length, 2 * length, dtype=torch.float32, device=cpu)
        dense = attention_mask("sdpa", pattern, 2 * length, 2 * length, dtype=torch.float32, device=cpu)
        q, k, v = torch.randn(3, 2, 2, 2 * length, 8).unbind(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_attention(q, k, v, block_mask=bm)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Student


def noised(batch=2, length=24, vocab=60, mask_id=63, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab, (batch, length), generator=g)
    x_t = torch.where(torch.rand(x0.shape, generator=g) < 0.5, mask_id, x0)
    return x_t, x0


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("length", [24, 8])  # three blocks; one block (x_0 dropped)
def test_student_sdpa_equals_eager_reference(family, length):
    model = decoder(family)
    student = BD3LMStudent(model, block_size=8, mask_token_id=63, attn_backend="sdpa")
    x_t, x0 = noised(length=length)
    got = student.hidden_states(x_t, x0)

    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    pos = torch.arange(length).expand(2, length)
    mask = additive(spec_mask(length, 8))[None, None]
    want = ref.get_decoder()(
        input_ids=torch.cat([x_t, x0], 1), position_ids=torch.cat([pos, pos], 1), attention_mask=mask
    ).last_hidden_state[:, :length]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student(x_t, x0), ref.lm_head(want), atol=1e-5, rtol=1e-5)


def test_student_blocks_see_only_what_the_mask_allows():
    student = BD3LMStudent(decoder(), block_size=8, mask_token_id=63)
    x_t, x0 = noised()
    base = student.hidden_states(x_t, x0)
    x_t2 = x_t.clone()
    x_t2[:, 9] = 5  # x_t block 1: only block 1 of x_t changes
    changed = (student.hidden_states(x_t2, x0) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 8 + [True] * 8 + [False] * 8
    x02 = x0.clone()
    x02[:, 9] = (x0[:, 9] + 1) % 60  # x_0 block 1: read by x_t block 2 only
    changed = (student.hidden_states(x_t, x02) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 16 + [True] * 8


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_student_forward_backward_and_round_trip(family, tmp_path):
    student = BD3LMStudent(decoder(family), block_size=8, mask_token_id=63).train()
    x_t, x0 = noised()
    loss = F.cross_entropy(student(x_t, x0).flatten(0, 1), x0.flatten())
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    student.eval()
    student.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.bd3lm == {"block_size": 8, "mask_token_id": 63}
    again = BD3LMStudent(reloaded, **reloaded.config.bd3lm)
    with torch.no_grad():
        assert torch.equal(student(x_t, x0), again(x_t, x0))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_each_layer(family):
    """engine.activation_checkpointing: the same loss and gradients on the [x_t ; x_0] layout and its
    mask, and each decoder layer's MLP really runs again in the backward (twice per step, not once)."""
    results = {}
    for on in (False, True):
        student = BD3LMStudent(decoder(family, num_hidden_layers=3), block_size=8, mask_token_id=63)
        if on:
            student.checkpoint_activations()
        calls = []
        for layer in student.model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        x_t, x0 = noised()
        loss = F.cross_entropy(student(x_t, x0).flatten(0, 1), x0.flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        results[on] = loss.detach(), grads, len(calls)
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert (calls_off, calls_on) == (3, 6)
    torch.testing.assert_close(loss_on, loss_off, atol=0, rtol=0)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_student_flex_equals_sdpa_forward_on_cpu():
    """FlexAttention through transformers (compiled; forward only on CPU, about 20 s)."""
    model = decoder()
    x_t, x0 = noised()
    with torch.no_grad():
        want = BD3LMStudent(copy.deepcopy(model), 8, 63, attn_backend="sdpa").hidden_states(x_t, x0)
        got = BD3LMStudent(model, 8, 63, attn_backend="flex").hidden_states(x_t, x0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_student_flex_equals_sdpa_on_cuda(dtype, tol):
    model = decoder(hidden_size=64, head_dim=16).to("cuda", dtype)
    x_t, x0 = (t.cuda() for t in noised(length=80))
    outs = []
    for backend in ("sdpa", "flex"):
        m = copy.deepcopy(model).train()
        h = BD3LMStudent(m, 16, 63, attn_backend=backend).hidden_states(x_t, x0)
        h.float().square().mean().backward()
        outs.append((h.float(), m.model.layers[0].self_attn.q_proj.weight.grad.float()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=tol, rtol=tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=tol, rtol=tol)


def test_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="attn_backend"):
        BD3LMStudent(decoder(), 8, 63, attn_backend="xformers")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="flash-attn"):
            BD3LMStudent(decoder(), 8, 63, attn_backend="flash")


# ---------------------------------------------------------------------------------------------
# LLaDA2-style MoE teacher


def reference_moe(mlp, x):
    """Per token, with plain loops: the routing and expert mixture of TIDE.md section 9."""
    cfg_groups, topk_group, top_k = mlp.gate.n_group, mlp.gate.topk_group, mlp.gate.top_k
    num_experts = mlp.gate.weight.shape[0]
    per_group = num_experts // cfg_groups
    chosen, outs = [], []
    for token in x:
        scores = torch.sigmoid(mlp.gate.weight.double() @ token.double())
        biased = scores + mlp.gate.expert_bias.double()
        group_scores = []
        for g in range(cfg_groups):
            members = sorted(biased[g * per_group : (g + 1) * per_group].tolist(), reverse=True)
            group_scores.append(sum(members[:2]))
        groups = sorted(range(cfg_groups), key=lambda g: -group_scores[g])[:topk_group]
        candidates = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        experts = sorted(candidates, key=lambda e: -biased[e].item())[:top_k]
        weights = scores[experts] / scores[experts].sum() * mlp.gate.scale
        out = torch.zeros_like(token, dtype=torch.float64)
        for w, e in zip(weights, experts):
            gate, up, down = (
                p[e].double() for p in (mlp.experts.gate_proj, mlp.experts.up_proj, mlp.experts.down_proj)
            )
            out += w * (down @ (F.silu(gate @ token.double()) * (up @ token.double())))
        se = mlp.shared_experts
        out += se.down_proj.weight.double() @ (
            F.silu(se.gate_proj.weight.double() @ token.double()) * (se.up_proj.weight.double() @ token.double())
        )
        chosen.append(sorted(experts))
        outs.append(out)
    return chosen, torch.stack(outs)


def test_llada2_routing_matches_per_token_reference():
    model = llada2(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate.weight.normal_(0.0, 0.5)  # spread the scores so routing is not decided by the bias alone
    x = torch.randn(40, model.config.hidden_size)
    ids, _ = mlp.gate(x)
    want_ids, want = reference_moe(mlp, x)
    assert [sorted(r) for r in ids.tolist()] == want_ids
    with torch.no_grad():
        torch.testing.assert_close(mlp(x[None])[0].double(), want, atol=1e-5, rtol=0)


def reference_llada2(model: LLaDA2MoeModelLM, ids: torch.Tensor) -> torch.Tensor:
    """The whole forward of TIDE.md section 9 from the parameters, bidirectional, fp64."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    rope_dim = int(c.head_dim * c.rope_parameters["partial_rotary_factor"])
    inv_freq = c.rope_parameters["rope_theta"] ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    ang = torch.arange(ids.shape[1], dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    def rope(x):
        r, rest = x[..., :rope_dim], x[..., rope_dim:]
        h = rope_dim // 2
        return torch.cat([r * cos + torch.cat([-r[..., h:], r[..., :h]], -1) * sin, rest], -1)

    h = sd["model.word_embeddings.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        qkv = (x @ sd[p + "attention.query_key_value.weight"].T).unflatten(-1, (-1, c.head_dim))
        q, k, v = qkv.split([c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads], dim=-2)
        q, k = norm(q, sd[p + "attention.query_layernorm.weight"]), norm(k, sd[p + "attention.key_layernorm.weight"])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        rep = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = ((q @ k.transpose(-1, -2)) * c.head_dim**-0.5).softmax(-1) @ v
        h = h + att.transpose(1, 2).flatten(-2) @ sd[p + "attention.dense.weight"].T
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        if i < c.first_k_dense_replace:
            h = (
                h
                + (F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T))
                @ sd[p + "mlp.down_proj.weight"].T
            )
        else:
            _, out = reference_moe(model.model.layers[i].mlp, x.flatten(0, 1).float())
            h = h + out.view_as(h)
    return norm(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_llada2_forward_matches_reference_and_is_bidirectional():
    model = llada2()
    ids = torch.randint(0, 63, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits.double(), reference_llada2(model, ids), atol=1e-4, rtol=1e-4)
        ids2 = ids.clone()
        ids2[:, -1] = (ids[:, -1] + 1) % 63
        assert (model(ids2).logits[:, 0] - logits[:, 0]).abs().max() > 1e-6  # the first token sees the last


def test_llada2_forward_backward():
    model = llada2().train()
    ids = torch.randint(0, 63, (2, 12))
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    loss.backward()
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_proj.grad is not None and torch.isfinite(experts.gate_proj.grad).all()
    assert model.model.layers[1].mlp.gate.weight.grad is not None


def test_llada2_forward_has_no_host_sync():
    """On the meta device any .item() / .tolist() / nonzero raises: the forward runs without them."""
    config = llada2_config()
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config).to(torch.bfloat16)
        ids = torch.randint(0, 63, (2, 12))
        out = model(ids).logits
    assert out.shape == (2, 12, 64) and out.device.type == "meta"


def published_checkpoint(model: LLaDA2MoeModelLM, path) -> None:
    """A checkpoint directory in the published format: config keys of LLaDA2.0-mini's config.json
    (rope_theta / rope_scaling, remote-code auto_map, keys inference ignores) and per-expert names."""
    c = model.config
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_shared_experts": c.num_shared_experts,
        "moe_intermediate_size": c.moe_intermediate_size,
        "first_k_dense_replace": c.first_k_dense_replace,
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "routed_scaling_factor": c.routed_scaling_factor,
        "partial_rotary_factor": 0.5,
        "rope_theta": 600000,
        "rope_scaling": None,
        "rms_norm_eps": c.rms_norm_eps,
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "norm_head": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "output_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    tensors = {}
    for name, t in model.state_dict().items():
        if ".mlp.experts." in name:  # stacked in memory -> one tensor per expert on disk
            stem, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                tensors[f"{stem}.{e}.{proj}.weight"] = t[e].clone()
        elif not name.endswith("inv_freq"):
            tensors[name] = t.clone()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_llada2_loads_published_checkpoint_and_round_trips(tmp_path):
    from safetensors import safe_open

    model = llada2()
    published_checkpoint(model, tmp_path / "published")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "published").eval()
    assert type(loaded) is LLaDA2MoeModelLM
    ids = torch.randint(0, 63, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
    loaded.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.expert_bias" in names and "model.layers.1.mlp.experts.down_proj" not in names
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_llada2_config_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="rope_scaling"):
        llada2_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="norm_head"):
        llada2_config(norm_head=True)
    with pytest.raises(ValueError, match="n_group"):
        llada2_config(num_experts=10, n_group=4)


# ---------------------------------------------------------------------------------------------
# Teachers and their outputs


def test_teachers_forward_and_output_interface():
    ids, x0 = noised(length=16)
    teachers = [
        LLaDA2Teacher(llada2(), 63),
        HFBidirectionalTeacher(decoder(), 63),
        WeDLMTeacher(decoder(), 63, block_size=4),
        WeDLMTeacher(decoder(), 63, block_size=4, order="xt_x0"),
    ]
    for teacher in teachers:
        h = teacher.hidden_states(ids, x0=x0)
        assert h.shape == (2, 16, teacher.output_weight.shape[1]) and teacher.vocab_size == 64
        assert not any(p.requires_grad for p in teacher.parameters())


def test_wedlm_teacher_reads_the_block_diffusion_layout():
    model = decoder()
    ids, x0 = noised(length=16)
    teacher = WeDLMTeacher(copy.deepcopy(model), 63, block_size=4, order="x0_xt", attn_backend="sdpa")
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    pos = torch.arange(16).expand(2, 16)
    want = ref.get_decoder()(
        input_ids=torch.cat([x0, ids], 1),
        position_ids=torch.cat([pos, pos], 1),
        attention_mask=additive(spec_mask(16, 4, "x0_xt"))[None, None],
    ).last_hidden_state[:, 16:]
    with torch.no_grad():
        torch.testing.assert_close(teacher.hidden_states(ids, x0=x0), want, atol=1e-5, rtol=1e-5)
        same_as_student = BD3LMStudent(copy.deepcopy(model), 4, 63).hidden_states(ids, x0)
        got = WeDLMTeacher(model, 63, block_size=4, order="xt_x0").hidden_states(ids, x0=x0)
        torch.testing.assert_close(got, same_as_student)
    with pytest.raises(ValueError, match="x0"):
        teacher.hidden_states(ids)


def test_hf_teacher_is_bidirectional_and_ignores_padding():
    teacher = HFBidirectionalTeacher(decoder(), 63)
    ids = torch.randint(0, 60, (1, 10))
    h = teacher.hidden_states(ids)
    ids2 = ids.clone()
    ids2[:, -1] = (ids[:, -1] + 1) % 60
    assert (teacher.hidden_states(ids2)[:, 0] - h[:, 0]).abs().max() > 1e-6
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    keep = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).bool()
    torch.testing.assert_close(teacher.hidden_states(padded, keep)[:, :10], h, atol=1e-5, rtol=1e-5)


def test_masked_lm_teacher_returns_the_head_input():
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = ModernBertForMaskedLM(config).eval()
    teacher = HFBidirectionalTeacher(model, 63)
    ids = torch.randint(1, 63, (2, 10))
    with torch.no_grad():
        h = teacher.hidden_states(ids)
        logits = h @ teacher.output_weight.T + teacher.output_bias
        torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Builders and their errors


def save_decoder(path, family="qwen3", tokenizer=None):
    tokenizer = tokenizer or word_tokenizer()
    decoder(family, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_llada2(path, tokenizer=None, **kw):
    model = llada2(vocab_size=32, **kw)
    model.save_pretrained(path)
    (tokenizer or word_tokenizer()).save_pretrained(path)
    return str(path)


def test_build_teacher_picks_the_class_from_the_checkpoint(tmp_path):
    cases = [
        (save_llada2(tmp_path / "l2", mask_token_id=31), "auto", LLaDA2Teacher),
        (save_decoder(tmp_path / "q3"), "auto", HFBidirectionalTeacher),
        (str(tmp_path / "q3"), "wedlm", WeDLMTeacher),
        (save_decoder(tmp_path / "ll", "llama"), "llama", HFBidirectionalTeacher),
    ]
    for path, kind, cls in cases:
        teacher = build_teacher(ModelConfig(path=path, kind=kind), "<|mask|>", block_size=4)
        assert type(teacher) is cls
        assert teacher.mask_token_id == 28  # the tokenizer's <|mask|>


def test_build_teacher_kind_mismatch_names_key_and_model_type(tmp_path):
    q3, l2 = save_decoder(tmp_path / "q3"), save_llada2(tmp_path / "l2")
    with pytest.raises(ConfigError, match=r"teacher\.kind is 'llada2_moe'.*'qwen3'"):
        build_teacher(ModelConfig(path=q3, kind="llada2_moe"), "<|mask|>")
    with pytest.raises(ConfigError, match=r"teacher\.kind is 'qwen3'.*'llada2_moe'"):
        build_teacher(ModelConfig(path=l2, kind="qwen3"), "<|mask|>")
    with pytest.raises(ConfigError, match=r"teacher\.kind is 'wedlm'.*'llada2_moe'"):
        build_teacher(ModelConfig(path=l2, kind="wedlm"), "<|mask|>", block_size=4)
    with pytest.raises(ConfigError, match=r"student\.kind"):
        build_student(ModelConfig(path=l2, kind="llada2_moe"), word_tokenizer(), 8, "<|mask|>")
    with pytest.raises(ConfigError, match=r"student\.path.*'llada2_moe'.*decoder"):
        build_student(ModelConfig(path=l2), word_tokenizer(), 8, "<|mask|>")
    with pytest.raises(ConfigError, match=r"student\.kind is 'llama'.*'qwen3'"):
        build_student(ModelConfig(path=q3, kind="llama"), word_tokenizer(), 8, "<|mask|>")


def test_teacher_without_mask_token_is_a_clear_error(tmp_path):
    path = save_llada2(tmp_path / "l2", tokenizer=word_tokenizer(mask_token=None), mask_token_id=None)
    with pytest.raises(ConfigError, match="teacher.mask_token_id"):
        build_teacher(ModelConfig(path=path), "<|mask|>")
    assert build_teacher(ModelConfig(path=path, mask_token_id=30), "<|mask|>").mask_token_id == 30
    with pytest.raises(ConfigError, match="outside its vocabulary"):
        build_teacher(ModelConfig(path=path, mask_token_id=500), "<|mask|>")


def test_student_gets_a_mask_token_when_the_tokenizer_has_none(tmp_path):
    tokenizer = word_tokenizer(mask_token=None)
    path = save_decoder(tmp_path / "ar", tokenizer=tokenizer)
    n = len(tokenizer)
    student = build_student(ModelConfig(path=path), tokenizer, 8, "<|mask|>")
    assert len(tokenizer) == n + 1 and student.mask_token_id == n
    assert student.output_weight.shape[0] >= n + 1
    assert tokenizer.convert_ids_to_tokens(student.mask_token_id) == "<|mask|>"


def test_checkpoint_that_does_not_fit_its_class_is_a_clear_error(tmp_path):
    path = save_llada2(tmp_path / "l2")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["rope_parameters"] = None
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError, match="teacher.path.*rope_scaling"):
        build_teacher(ModelConfig(path=path), "<|mask|>")


@pytest.mark.gpu
@needs_cuda
def test_llada2_on_cuda_matches_cpu():
    model = llada2()
    ids = torch.randint(0, 63, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        got = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_distill_step_runs_with_a_wedlm_teacher():
    """Pipeline B end to end through the one teacher call site: the step hands x0 to the teacher."""
    from tide_ds.pipeline import DistillStep, resolve_terms

    teacher = WeDLMTeacher(decoder(), 63, block_size=4)
    student = BD3LMStudent(decoder(seed=1), 4, 63).train()
    step = DistillStep(student, teacher, resolve_terms("tide_shared"))
    x0 = torch.randint(0, 60, (2, 16))
    n = step.noise(
        {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}, generator=torch.Generator().manual_seed(0)
    )
    loss, terms = step.loss(n, step.teacher_targets(n), progress=0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"ce", "tidal"}


@pytest.mark.parametrize("family,a2d_type", [("qwen3", "a2d-qwen3"), ("llama", "a2d-llama")])
def test_dllm_a2d_checkpoint_loads_as_a_student(family, a2d_type, tmp_path):
    """A checkpoint written the way dllm writes its converted BD3LM students (its own model_type and
    architecture over the family's weights) loads as a student and gives the family's logits."""
    from tide_ds.models import build_student

    tok = word_tokenizer()
    model = decoder(family, vocab_size=len(tok), seed=3)
    model.save_pretrained(tmp_path / "a2d")
    file = tmp_path / "a2d" / "config.json"
    raw = json.loads(file.read_text())
    raw.update(model_type=a2d_type, architectures=[f"A2D{family.capitalize()}LMHeadModel"])
    file.write_text(json.dumps(raw))
    student = build_student(ModelConfig(path=str(tmp_path / "a2d")), tok, 4, "<|mask|>").eval()
    reference = BD3LMStudent(model, 4, tok.mask_token_id).eval()
    x0 = torch.randint(0, len(tok) - 1, (2, 8))
    x_t = torch.where(torch.rand(x0.shape) < 0.5, tok.mask_token_id, x0)
    with torch.no_grad():
        torch.testing.assert_close(student(x_t, x0), reference(x_t, x0))
    tok.save_pretrained(tmp_path / "a2d")
    from tide_ds.generate import load_student

    sampler_student, _ = load_student(str(tmp_path / "a2d"), block_size=4, mask_token="<|mask|>")
    with torch.no_grad():
        torch.testing.assert_close(sampler_student(x_t, x0), reference(x_t, x0))
    other = "llama" if family == "qwen3" else "qwen3"
    with pytest.raises(ConfigError, match=f"student.kind is '{other}'"):
        build_student(ModelConfig(path=str(tmp_path / "a2d"), kind=other), tok, 4, "<|mask|>")


def test_llada2_boolean_causal_mask_matches_the_prefix_alone():
    """The main job's teacher warm-up runs LLaDA2 causally with a [1, 1, l, l] bool mask (True =
    may attend): position i must see tokens 0..i only. With one layer, position i's output is that of
    the last position of the prefix 0..i run alone with no mask."""
    model = llada2()
    ids = torch.randint(0, model.config.vocab_size - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        full = model(ids, attention_mask=causal).logits
        one = llada2(num_hidden_layers=1, first_k_dense_replace=1)
        one_full = one(ids, attention_mask=causal).logits
        for cut in (1, 5, 12):
            torch.testing.assert_close(one_full[:, cut - 1], one(ids[:, :cut]).logits[:, -1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                full[:, :cut], model(ids[:, :cut], attention_mask=causal[..., :cut, :cut]).logits, rtol=1e-4, atol=1e-5
            )
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % (model.config.vocab_size - 1)
        torch.testing.assert_close(model(changed, attention_mask=causal).logits[:, :8], full[:, :8])
        assert not torch.allclose(model(changed).logits[:, :8], model(ids).logits[:, :8])  # unmasked: it sees them
