import os
import time

import pytest
import torch

# Tests are small: keep CPU threads modest so parallel test processes do not oversubscribe cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def no_shm_left_behind(request):
    """A multi-rank run leaves no DeepSpeed shared-memory segment in /dev/shm."""
    if request.node.get_closest_marker("multirank") is None or not os.path.isdir("/dev/shm"):
        yield
        return
    before = {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")}
    yield
    left = {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")} - before
    if left:  # another job on this machine may be starting up: its ranks unlink their own segments
        time.sleep(10)
        left &= {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")}
    for f in left:  # clean up, then fail
        os.unlink(os.path.join("/dev/shm", f))
    assert not left, f"segments left in /dev/shm: {sorted(left)}"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tokenizer trained on a few standard-library files and a tiny random teacher saved with it."""
    from tiny import SAVED_TEACHER_INIT
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tide_ds.data.corpus import corpus_files, train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    files = corpus_files("stdlib", 30)
    tok = train_tokenizer(files, 400, str(root / "tokenizer"))
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), **SAVED_TEACHER_INIT)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return {"root": root, "tokenizer": str(root / "tokenizer"), "teacher": str(root / "teacher"), "files": files}


TINY_STUDENT = (
    "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, head_dim: 16, tie_word_embeddings: true}"
)


@pytest.fixture
def tiny_overrides(tiny_assets, tmp_path):
    """Overrides for a seconds-long distillation run on the tiny assets."""
    return [
        f"student.init={TINY_STUDENT}",
        f"student.tokenizer={tiny_assets['tokenizer']}",
        f"teacher.path={tiny_assets['teacher']}",
        f"output_dir={tmp_path / 'run'}",
        "data.max_files=30",
        "data.seq_len=32",
        "diffusion.block_size=8",
        "train.steps=4",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.lr=1e-3",
    ]


@pytest.fixture(scope="session")
def cross_data(tiny_assets, tmp_path_factory):
    """Chat rows prepared for the tiny student tokenizer and a different teacher tokenizer, plus a
    tiny teacher on that tokenizer."""
    import json

    from tiny import SAVED_TEACHER_INIT
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tide_ds.data.corpus import read_text, train_tokenizer
    from tide_ds.data.prepare import PrepareConfig, SideConfig, prepare

    root = tmp_path_factory.mktemp("cross")
    teacher_tok = train_tokenizer(tiny_assets["files"][5:20], 500, str(root / "teacher"))
    cfg = Qwen3Config(vocab_size=len(teacher_tok), **SAVED_TEACHER_INIT)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "teacher")
    lines = [ln for p in tiny_assets["files"][:10] for ln in read_text(p).splitlines() if ln.strip()]
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Continue: " + lines[i]},
                {"role": "assistant", "content": "\n".join(lines[i + 1 : i + 4])},
            ]
        }
        for i in range(0, 240, 4)
    ]
    with open(root / "chat.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report = prepare(
        PrepareConfig(
            data_files=[str(root / "chat.jsonl")],
            output_dir=str(root / "prepared"),
            student=SideConfig(tokenizer=tiny_assets["tokenizer"], max_length=64),
            teacher=SideConfig(tokenizer=str(root / "teacher"), max_length=96),
        )
    )
    assert report["kept"] >= 50 and report["chunks"] > 0
    return {"prepared": str(root / "prepared"), "teacher": str(root / "teacher")}
