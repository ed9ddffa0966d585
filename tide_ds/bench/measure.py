"""What the benchmarks share: peak memory growth and time of one call, the device's name, and the
random Qwen3 decoders they run."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from tide_ds.config import ConfigError


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), in bytes."""
    return _rss_bytes(field)


def reset_peak() -> int:
    """Resets VmHWM to the current resident set, which it returns (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes("VmRSS")


def peak_resident(step) -> int:
    """This process's peak resident set during one call of step() (bytes; not its growth)."""
    gc.collect()
    reset_peak()
    step()
    return _rss_bytes("VmHWM")


def peak_growth(step, device: str) -> int:
    """Peak memory growth during one call of step(), in bytes: on GPU torch.cuda.max_memory_allocated,
    on CPU the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the
    resident set before the call, so it counts every allocation torch makes."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = reset_peak()
    step()
    return _rss_bytes("VmHWM") - base


def timed(step, device: str) -> float:
    """Seconds of one call of step(), the device synchronised on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def resolve_device(name: str) -> str:
    """--device auto | cpu | cuda as a device type; cuda only where one is usable."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device is {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but this machine has no usable CUDA device; use --device cpu or auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def random_decoder(hidden: int, layers: int, vocab: int, seed: int, *, ffn: int, tied: bool):
    """A random Qwen3 decoder: heads of 64, an MLP of `ffn` x `hidden`, fp32, on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = AutoConfig.for_model(
        "qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
    )
    return AutoModelForCausalLM.from_config(cfg)
