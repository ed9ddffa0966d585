"""Tiny random models and a word-level tokenizer for tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tide_ds.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

WORDS = ["<|endoftext|>"] + [chr(ord("a") + i) for i in range(26)]


def word_tokenizer(mask_token: str | None = "<|mask|>") -> PreTrainedTokenizerFast:
    """Whitespace-separated letters a..z, EOS, [UNK] (and a mask token unless None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=WORDS[0], pad_token=WORDS[0], unk_token="[UNK]")
    if mask_token is not None:
        fast.add_special_tokens({"mask_token": mask_token})
    return fast


STUDENT_INIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)


# the teacher the CLI tests save with a trained tokenizer: one layer, tied head
SAVED_TEACHER_INIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=True,
)


def decoder_config(family: str = "qwen3", vocab_size: int = 64, **kw):
    return AutoConfig.for_model(family, **{**STUDENT_INIT, "vocab_size": vocab_size, **kw})


def decoder(family: str = "qwen3", vocab_size: int = 64, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(decoder_config(family, vocab_size, **kw)).eval()


def llada2_config(**kw) -> LLaDA2MoeConfig:
    args = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=3,
        num_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        partial_rotary_factor=0.5,
        rope_theta=600000.0,
        pad_token_id=0,
        mask_token_id=63,
    )
    args.update(kw)
    return LLaDA2MoeConfig(**args)


def llada2(seed: int = 0, **kw) -> LLaDA2MoeModelLM:
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(llada2_config(**kw)).eval()
    with torch.no_grad():  # a non-zero expert bias, so routing depends on it
        for layer in model.model.layers[model.config.first_k_dense_replace :]:
            layer.mlp.gate.expert_bias.normal_(0.0, 0.3)
    return model


def saved_student(path, block_size: int = 4):
    """A tiny random BD3LM student over a word tokenizer, saved to `path` with its tokenizer."""
    from tide_ds.config import ModelConfig
    from tide_ds.models import build_student

    tok = word_tokenizer()
    torch.manual_seed(0)
    student = build_student(ModelConfig(init=STUDENT_INIT), tok, block_size, "<|mask|>")
    student.model.save_pretrained(path)
    tok.save_pretrained(path)
    return student
