"""Teacher targets on disk: what `tide-ds teach` writes once and `tide-ds distill
teacher.targets=DIR` reads instead of calling the teacher.

A row's noise is a pure function of (seed, step, position in the global batch)
(`tide_ds.data.sampler`), so the teacher's outputs of a whole run can be computed ahead. For the
chunk terms (CALM, Reverse CALM, chunk TIDAL, with or without CompDemo) a row needs one fp32
log-prob per active chunk, in chunk order: `TeacherTargets.chunk_logprobs[b, C]` at `chunk_mask`.

Layout of a targets directory:
  manifest.json   fingerprint (everything that decides the values), layout, and once complete the
                  list of shards; written first by rank 0, rewritten (tmp + rename) at the end
  shard-SSSSSSSS-pPPPPPP-QQQQQQ.pt   steps [S, S + shard_steps) x global-batch positions [P, Q):
                  {"values": fp32 [n], "offsets": int64 [rows + 1]}, rows in (step, position) order;
                  written to a temporary name and renamed, so a shard that exists is complete

Any number of ranks and any accumulation split read their own (step, position) rows. The values
equal the online teacher's bitwise when the reading run has teach's micro_batch_size (the same rows
share a teacher forward); another micro-batch size changes them only by the rounding of a batched
forward.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from tide_ds.config import Config, ConfigError
from tide_ds.models.build import dtype_name
from tide_ds.pipeline.step import Noised, TeacherTargets
from tide_ds.pipeline.terms import CHUNKS, RunTerms

MANIFEST = "manifest.json"
FORMAT = 1


def check_storable(cfg: Config, terms: RunTerms) -> None:
    """Targets hold chunk log-probs only: refuse a recipe that needs more (or no teacher at all)."""
    whole = [t.name for t in terms.terms if t.needs - {CHUNKS}]
    if whole:
        raise ConfigError(
            f"recipe '{cfg.recipe}' uses {', '.join(whole)}, which needs the teacher's whole distribution; "
            f"teacher targets hold chunk log-probs only (calm, reverse_calm, chunk tidal): run it with the "
            f"teacher online (unset teacher.targets)"
        )
    if CHUNKS not in terms.needs:
        raise ConfigError(f"recipe '{cfg.recipe}' needs no teacher: there are no teacher targets to write or read")


def file_hash(paths) -> str:
    """sha256 over the files' relative names and contents (read in 16 MiB pieces)."""
    h = hashlib.sha256()
    for root, path in paths:
        h.update(str(Path(path).relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while piece := f.read(1 << 24):
                h.update(piece)
    return h.hexdigest()[:24]


def dir_files(root: str) -> list[tuple[str, Path]]:
    return [(root, p) for p in sorted(Path(root).rglob("*")) if p.is_file()]


def data_hash(cfg: Config, text_files: list | None) -> str:
    """The training data's content: a prepared directory's files, or the text files read."""
    if text_files is None:
        return file_hash(dir_files(cfg.data.source))
    return file_hash((Path(p).parent, p) for p in text_files)


def fingerprint(cfg: Config, terms: RunTerms, *, rows: int, text_files: list | None, student_vocab: str) -> dict:
    """Every value that decides the targets, keyed by the config key that sets it. `cfg` has
    train.steps worked out from epochs; `rows`: training rows; `text_files`: the corpus files of a
    text source (None: a prepared dataset); `student_vocab`: the student tokenizer's fingerprint."""
    d, t, m = cfg.data, cfg.train, cfg.teacher
    out = {
        "data.source": data_hash(cfg, text_files),
        "data.holdout_fraction": d.holdout_fraction,
        "data.eos_padding": d.eos_padding,
        "train rows": rows,
        "student.tokenizer": student_vocab,
        "train.seed": t.seed,
        "train.global_batch_size": t.global_batch_size,
        "train.steps": t.steps,
        "diffusion.block_size": cfg.diffusion.block_size,
        "diffusion.eps": cfg.diffusion.eps,
        "diffusion.mask_token": cfg.diffusion.mask_token,
        "CompDemo": terms.comp_demo,
        "objective.demo_ratio": terms.demo_ratio if terms.comp_demo else None,
    }
    if text_files is not None:
        out.update({"data.seq_len": d.seq_len, "data.max_files": d.max_files})
    if m.path is not None:  # a run reading targets may have no teacher checkpoint at hand
        out.update(teacher_fingerprint(cfg))
    return out


def teacher_fingerprint(cfg: Config) -> dict:
    m = cfg.teacher
    return {
        "teacher.path": file_hash(dir_files(m.path)),
        "teacher.kind": m.kind,
        "teacher.dtype": dtype_name(m),
        "teacher.mask_token_id": m.mask_token_id,
        "teacher.block_size": m.block_size,
        "teacher.block_order": m.block_order,
    }


def first_difference(stored: dict, here: dict, keys=None) -> str | None:
    for key in keys if keys is not None else sorted(set(stored) | set(here)):
        if stored.get(key) != here.get(key):
            return f"{key}: {stored.get(key)!r} there, {here.get(key)!r} here"
    return None


def shard_name(first_step: int, positions: range) -> str:
    return f"shard-{first_step:08d}-p{positions.start:06d}-{positions.stop:06d}.pt"


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def read_manifest(directory: str) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class TargetsWriter:
    """One rank's shards: its global-batch positions of `shard_steps` steps per file."""

    def __init__(self, directory: str, shard_steps: int, steps: int, positions: range):
        self.dir, self.shard_steps, self.steps, self.positions = Path(directory), shard_steps, steps, positions
        self._values: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def starts(self) -> list[int]:
        return list(range(0, self.steps, self.shard_steps))

    def done(self, first_step: int) -> bool:
        return (self.dir / shard_name(first_step, self.positions)).is_file()

    def add(self, noised: Noised, targets: TeacherTargets) -> None:
        """One micro-batch's rows (in position order): the teacher's log-probs of the active chunks."""
        self._values.append(targets.chunk_logprobs[noised.chunk_mask].detach().float().cpu())
        self._counts.append(noised.chunk_mask.sum(1).cpu())

    def reset(self) -> None:
        self._values, self._counts = [], []

    def close_shard(self, first_step: int) -> int:
        """Writes the rows added since the last shard as `first_step`'s shard; returns its bytes."""
        counts = torch.cat(self._counts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        shard = {"values": torch.cat(self._values), "offsets": offsets}
        path = self.dir / shard_name(first_step, self.positions)
        write_atomic(path, lambda p: torch.save(shard, p))
        return path.stat().st_size


class TargetsReader:
    """Reads the rows of any (step, positions) of a complete targets directory; keeps a few
    shards in memory (a rank reads its steps in order)."""

    def __init__(self, directory: str, cache: int = 4):
        self.dir = Path(directory)
        manifest = read_manifest(directory)
        self.shard_steps = manifest["layout"]["shard_steps"]
        self.shards: dict[int, list[range]] = {}
        for s in manifest["shards"]:
            self.shards.setdefault(s["first_step"], []).append(range(*s["positions"]))
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._size = cache

    def _shard(self, name: str) -> dict:
        if name not in self._cache:
            self._cache[name] = torch.load(self.dir / name, weights_only=True)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def row(self, step: int, position: int) -> torch.Tensor:
        first = step - step % self.shard_steps
        span = next(r for r in self.shards[first] if position in r)
        shard = self._shard(shard_name(first, span))
        i = (step - first) * len(span) + position - span.start
        return shard["values"][shard["offsets"][i] : shard["offsets"][i + 1]]

    def attach(self, step: int, positions: range, noised: Noised) -> Noised:
        """`noised` with its teacher targets read from disk (on the data prefetch thread)."""
        values = [self.row(step, p) for p in positions]
        counts = noised.chunk_mask.sum(1).tolist()
        for p, v, n in zip(positions, values, counts):
            if len(v) != n:
                raise RuntimeError(
                    f"teacher targets {self.dir}: step {step}, row {p} holds {len(v)} chunk log-probs but this "
                    f"run's noise gives {n} active chunks; the targets were written for other data"
                )
        chunk = torch.zeros(noised.chunk_mask.shape, dtype=torch.float32, device=noised.chunk_mask.device)
        noised.stored = TeacherTargets(chunk_logprobs=chunk.masked_scatter(noised.chunk_mask, torch.cat(values)))
        return noised


def open_targets(directory: str, here: dict) -> TargetsReader:
    """A reader of `directory` if it is complete and its fingerprint matches this run's (`here`);
    else one line naming the first key that differs."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise ConfigError(f"teacher.targets={directory} holds no {MANIFEST}; write it with `tide-ds teach --out DIR`")
    stored = manifest["fingerprint"]
    keys = [k for k in stored if not k.startswith("teacher.") or "teacher.path" in here] + [
        k for k in here if k not in stored
    ]
    diff = first_difference(stored, here, keys)
    if diff is not None:
        raise ConfigError(
            f"teacher.targets={directory} was written for another run ({diff}); write targets for this "
            f"config with `tide-ds teach`, or set the key as there"
        )
    if not manifest.get("complete"):
        raise ConfigError(
            f"teacher.targets={directory} is incomplete (`tide-ds teach` stopped before the end); run the same "
            f"`tide-ds teach` command again to finish it"
        )
    return TargetsReader(directory)
