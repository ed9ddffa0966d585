"""Checkpoints: atomic saves, resume from the newest complete one, rotation, export.

Layout under `<output_dir>/checkpoints/`:
  step<N>/                 DeepSpeed checkpoint (model, optimizer and scheduler states per rank) or,
                           for a plain single-process run, PLAIN_STATE (`plain_state.pt`)
  step<N>/tide_state.json  the marker, written last: step, ranks, the student's architecture, the
                           settings a resume must keep, and every file's size (a truncated shard is
                           found before it is read) and checksum (computed by the rank that wrote
                           it, verified on resume by the same rank)
  step<N>.partial/         a save in progress, or one that was interrupted: never read, removed later
  hf/                      the student's transformers config and tokenizer (what `export` builds on)
  run                      the id of the run that owns the directory (written when it starts)
  latest                   the newest complete tag (for DeepSpeed's tools)

A run owns its checkpoints directory: a fresh run refuses one that holds another run's checkpoints
(unless `train.overwrite`, which deletes them first), every marker records the run id, resume takes
the newest complete checkpoint of the owning run, and rotation deletes only that run's checkpoints.
Rank 0 alone decides where a run starts and broadcasts it (`start`): ranks whose views of a shared
filesystem differ still resume one checkpoint.

A save writes everything into step<N>.partial, fsyncs it, writes the marker there and renames the
directory to step<N>; only then is `latest` replaced, by a rename. A kill at any point of a save
leaves every earlier checkpoint complete and `latest` naming one of them.

Data position and noise are pure functions of the step (see `tide_ds.data.sampler`), so the step is
what a resume needs besides the engine states; the torch RNG states are saved too.

`tide-ds export CKPT OUT` writes a model directory that `from_pretrained` loads (whole or not at all;
a non-empty OUT only with --overwrite).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import uuid
import zlib

import torch

from tide_ds.config import Config, ConfigError
from tide_ds.engine.build import PLAIN_STATE
from tide_ds.outputs import check_out_dir, fsync_dir, fsync_tree, is_write_error, write_dir, write_failed

MARKER = "tide_state.json"
RUN = "run"
PARTIAL = ".partial"
KILL_AT = "TIDE_DS_KILL_AT"  # fault injection for tests: "<point>@<step>" kills the process there (SIGKILL)
_TAG = re.compile(r"step(\d+)$")


def root_of(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def _split(path: str) -> tuple[str, str]:
    """(checkpoint root, tag) for a tag directory, or a root holding `latest`."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    return os.path.dirname(path), os.path.basename(path)


# -- which checkpoints are complete ------------------------------------------------------------


def why_incomplete(root: str, tag: str) -> str | None:
    """None for a complete checkpoint, else the reason it cannot be resumed."""
    path = os.path.join(root, tag)
    if not os.path.isdir(path):
        return "not found"
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except FileNotFoundError:
        return f"incomplete (no {MARKER}: the save was interrupted)"
    except (OSError, ValueError) as e:
        return f"damaged (unreadable {MARKER}: {e})"
    for name, size in marker.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"damaged (file {name} is missing)"
        if os.path.getsize(file) != size:
            return f"damaged (file {name} has {os.path.getsize(file)} bytes, {size} when saved)"
    return None


def _steps(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every step<N> directory, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _TAG.match(name))]
    return sorted(found, reverse=True)


def run_id(root: str) -> str | None:
    """The id of the run that owns root (None: none has started there, or an older layout)."""
    try:
        with open(os.path.join(root, RUN)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _marker(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, MARKER)) as f:
        return json.load(f)


def _owned(root: str, tag: str, owner: str | None) -> bool:
    """Whether the complete checkpoint tag belongs to run `owner` (every one does in an older layout)."""
    return owner is None or _marker(root, tag).get("run") == owner


def newest_complete(root: str, damaged: dict[str, str] | None = None) -> tuple[str | None, list[str]]:
    """The complete step<N> with the highest N of the run that owns root, and what was skipped on
    the way, and why; `damaged` ({path: reason}) are those whose files failed their checksums."""
    owner = run_id(root)
    skipped = (
        [
            f"{name} (an interrupted save)"
            for name in sorted(os.listdir(root))
            if _TAG.match(name[: -len(PARTIAL)]) and name.endswith(PARTIAL)
        ]
        if os.path.isdir(root)
        else []
    )
    for _, tag in _steps(root):
        reason = why_incomplete(root, tag) or (damaged or {}).get(os.path.join(root, tag))
        if reason is None and _owned(root, tag, owner):
            return tag, skipped
        skipped.append(f"{tag} ({reason or 'another run'})")
    return None, skipped


def resolve_resume(cfg: Config, log=print, damaged: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The (root, tag) to resume from, checked complete (and not among `damaged`, see `_damaged`);
    None when not resuming (or `auto` finds none)."""
    how = cfg.train.resume
    if how is None:
        return None
    if how in ("auto", "latest"):
        root = root_of(cfg)
        tag, skipped = newest_complete(root, damaged)
        for s in skipped:
            log(f"resume: skipping checkpoint {os.path.join(root, s)}")
        if tag is not None:
            log(f"resume: from {os.path.join(root, tag)} (the newest complete checkpoint)")
            return root, tag
        if how == "auto":
            log(f"resume: no complete checkpoint in {root}; starting fresh")
            return None
        raise ConfigError(
            f"train.resume=latest: no complete checkpoint in {root} "
            f"({'; '.join(skipped) or 'none saved'}); start without --resume, or use --resume auto"
        )
    if not os.path.isdir(how):
        raise ConfigError(
            f"train.resume: checkpoint {how} not found (give a directory under "
            f"{root_of(cfg)}, 'latest' or 'auto' with the run's output_dir)"
        )
    root, tag = _split(how)
    reason = why_incomplete(root, tag) or (damaged or {}).get(os.path.join(root, tag))
    if reason is not None:
        other, _ = newest_complete(root, damaged)
        hint = f"resume from {os.path.join(root, other)}" if other else f"no complete checkpoint in {root}"
        raise ConfigError(f"train.resume: checkpoint {os.path.join(root, tag)} is {reason}; {hint}")
    return root, tag


def start(cfg: Config, dist, log=print) -> tuple[str, str] | None:
    """Where this run starts, decided on rank 0 and broadcast: (root, tag) to resume from, or None
    for a fresh start; every rank first verifies its own files of the candidates (`_damaged`)."""
    damaged = _damaged(cfg, dist)
    decided = None
    if dist.is_main:
        try:
            resume = resolve_resume(cfg, log, damaged)
            check_claim(cfg, resume)
            decided = ("resume", resume)
        except ConfigError as e:
            decided = ("error", str(e))
    if dist.world > 1:
        box = [decided]
        torch.distributed.broadcast_object_list(box, src=0)
        decided = box[0]
    kind, value = decided
    if kind == "error":
        raise ConfigError(value)
    return None if value is None else tuple(value)


def _candidates(cfg: Config) -> list[tuple[str, str]]:
    """The complete checkpoints a resume may take, in the order it tries them (rank 0's view)."""
    how = cfg.train.resume
    try:
        if how in ("auto", "latest"):
            root = root_of(cfg)
            owner = run_id(root)
            return [(root, t) for _, t in _steps(root) if why_incomplete(root, t) is None and _owned(root, t, owner)]
        if how is not None and os.path.isdir(how):
            root, tag = _split(how)
            return [(root, tag)] if why_incomplete(root, tag) is None else []
    except (OSError, ValueError):  # resolve_resume names the problem
        pass
    return []


def _damaged(cfg: Config, dist) -> dict[str, str]:
    """{path: reason} for the candidates (`_candidates`, named by rank 0) whose files fail their
    checksums, tried in order up to the first that every rank finds intact. Each rank hashes only
    the files it wrote; every rank makes the same collectives."""
    box = [_candidates(cfg) if dist.is_main else None]
    if dist.world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    damaged = {}
    for root, tag in box[0]:
        mine = why_damaged(root, tag, dist.rank)
        reasons = [mine]
        if dist.world > 1:
            reasons = [None] * dist.world
            torch.distributed.all_gather_object(reasons, mine)
        bad = next((r for r in reasons if r), None)
        if bad is None:
            break
        damaged[os.path.join(root, tag)] = bad
    return damaged


def _resumes_here(cfg: Config, resume: tuple[str, str] | None) -> bool:
    return resume is not None and os.path.realpath(resume[0]) == os.path.realpath(root_of(cfg))


def _held_by_another(cfg: Config, resume: tuple[str, str] | None) -> list[str]:
    """The complete checkpoints in this run's directory that another run left (none when resuming there)."""
    root = root_of(cfg)
    return [] if _resumes_here(cfg, resume) else [t for _, t in _steps(root) if why_incomplete(root, t) is None]


def check_claim(cfg: Config, resume: tuple[str, str] | None) -> None:
    """A fresh run (or one resumed from another directory) refuses a directory with another run's
    checkpoints unless train.overwrite. Nothing is written: the run claims it (`claim`) only once
    everything else that can be refused has been."""
    held = _held_by_another(cfg, resume)
    if held and not cfg.train.overwrite:
        how = "continue it with --resume latest, " if resume is None else ""
        raise ConfigError(
            f"output_dir={cfg.output_dir} holds the checkpoints of another run ({', '.join(held)}); "
            f"{how}set train.overwrite=true to delete them and start over, or choose another output_dir"
        )


def claim(cfg: Config, resume: tuple[str, str] | None, dist, log=print) -> None:
    """Rank 0 makes this run the owner of its checkpoints directory (`start` has checked it may).
    Resuming there changes nothing; otherwise train.overwrite's deletions are done and the run id
    is written."""
    if not dist.is_main or _resumes_here(cfg, resume):
        return
    root = root_of(cfg)
    held = _held_by_another(cfg, resume)
    if held:
        log(f"train.overwrite: deleting the checkpoints of the previous run in {root} ({', '.join(held)})")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if _TAG.match(name.removesuffix(PARTIAL)):
                _remove(os.path.join(root, name))
        shutil.rmtree(os.path.join(root, "hf"), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    for name in ("latest", RUN):
        if os.path.isfile(os.path.join(root, name)):
            os.unlink(os.path.join(root, name))
    resumed_run = _marker(*resume).get("run") if resume is not None else None
    _write_atomic(os.path.join(root, RUN), resumed_run or uuid.uuid4().hex[:12])


# -- saving ---------------------------------------------------------------------------------------


def _kill_point(point: str, step: int) -> None:
    if os.environ.get(KILL_AT) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def _remove(path: str) -> None:
    """A checkpoint loses its marker first: a deletion cut short leaves an incomplete one, never a broken one."""
    try:
        os.unlink(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def architecture(student) -> str:
    """A short hash of the student's parameter names and full shapes (ZeRO-3 partitions included)."""
    h = hashlib.sha256()
    for name, p in student.named_parameters():
        h.update(f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))};".encode())
    return h.hexdigest()[:16]


def settings(student) -> dict[str, int]:
    """What a resume must keep besides the architecture: the block and the noise's mask token."""
    return {
        "diffusion.block_size": student.block_size,
        "the student's vocabulary size (student.tokenizer)": student.model.config.vocab_size,
        "the mask token id (diffusion.mask_token)": student.mask_token_id,
    }


def _weights_finite(engine) -> bool:
    device = engine.dist.device  # where the collective runs (ZeRO may offload partitions to the CPU)
    local = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all().to(device) for p in engine.student.parameters()]
    ok = torch.stack(local).all().to(torch.int32)
    if engine.dist.world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)  # sync point: once per save


# DeepSpeed's per-rank files: zero_pp_rank_<r>_..., bf16_zero_pp_rank_<r>_... (bf16 optimizer states)
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")


def _owner(name: str) -> int:
    """The rank that writes (and on resume verifies) a checkpoint file: DeepSpeed's per-rank shards
    by name, the rest rank 0."""
    m = _RANK_FILE.search(os.path.basename(name))
    return int(m.group(1)) if m else 0


def _checksum(path: str) -> str:
    """CRC-32 of the file, read in 8 MiB chunks: it finds damaged bytes, at about 2.5x BLAKE2b's speed."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _own_files(partial: str, rank: int) -> dict[str, tuple[int, str]]:
    """Fsyncs the files of partial that this rank wrote and returns their sizes and checksums
    (read back while still in the page cache): only the writer's view of a file is sure to be current."""
    files = {}
    for folder, _, names in os.walk(partial):
        for name in names:
            if _owner(name) != rank:
                continue
            path = os.path.join(folder, name)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[os.path.relpath(path, partial)] = (os.path.getsize(path), _checksum(path))
    return files


def why_damaged(root: str, tag: str, rank: int) -> str | None:
    """None when this rank's files of a complete checkpoint match the checksums in its marker (a
    marker of an older layout has none), else the reason."""
    try:
        checksums = _marker(root, tag).get("checksums", {})
    except (OSError, ValueError) as e:  # this rank's view of a shared filesystem differs from rank 0's
        return f"damaged (its {MARKER} cannot be read on rank {rank}: {e})"
    for name, digest in sorted(checksums.items()):
        if _owner(name) != rank:
            continue
        try:
            same = _checksum(os.path.join(root, tag, name)) == digest
        except OSError as e:
            return f"damaged (file {name} cannot be read on rank {rank}: {e.strerror})"
        if not same:
            return f"damaged (file {name} does not match its checksum: its contents changed after the save)"
    return None


def _barrier(dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def save(engine, cfg: Config, step: int, tokenizer) -> str:
    """Saves a complete checkpoint of `step` on every rank; returns its directory."""
    root, tag = root_of(cfg), f"step{step}"
    final, partial = os.path.join(root, tag), os.path.join(root, tag + PARTIAL)
    dist = engine.dist
    if not _weights_finite(engine):
        raise ConfigError(
            f"the student's weights are not finite at step {step}; nothing was saved, the "
            f"checkpoints in {root} are unchanged (lower train.lr or set train.nonfinite=stop)"
        )
    state = {"step": step, "torch_rng": torch.get_rng_state()}
    try:
        if dist.is_main:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(dist)
        engine.save(root, tag + PARTIAL, state)
        _kill_point("states", step)
        files = _own_files(partial, dist.rank)
        if dist.world > 1:
            every = [None] * dist.world
            torch.distributed.all_gather_object(every, files)
            files = {k: v for rank_files in every for k, v in rank_files.items()}
        if dist.is_main:
            _save_hf(root, engine, tokenizer)
            for folder, _, _ in os.walk(partial):  # each rank fsynced its own files
                fsync_dir(folder)
            marker = {
                "run": run_id(root),
                "step": step,
                "world": dist.world,
                "deepspeed": engine.deepspeed,
                "architecture": architecture(engine.student),
                "settings": settings(engine.student),
                "files": {name: size for name, (size, _) in files.items()},
                "checksums": {name: digest for name, (_, digest) in files.items()},
            }
            _write_atomic(os.path.join(partial, MARKER), json.dumps(marker, indent=1))
            _kill_point("marker", step)
            if os.path.isdir(final):  # the same step saved before (a run that stopped there): replace it
                _remove(final)
            os.rename(partial, final)
            fsync_dir(root)
            _kill_point("rename", step)
            _write_atomic(os.path.join(root, "latest"), tag)
            _kill_point("latest", step)
            rotate(root, cfg.train.keep_last, keep=tag)
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(_save_failed(e, root, tag)) from None
    _barrier(dist)
    return final


def _save_hf(root: str, engine, tokenizer) -> None:
    hf = os.path.join(root, "hf")
    if os.path.isdir(hf):
        return
    shutil.rmtree(hf + PARTIAL, ignore_errors=True)
    engine.student.model.config.save_pretrained(hf + PARTIAL)
    tokenizer.save_pretrained(hf + PARTIAL)
    fsync_tree(hf + PARTIAL)
    os.rename(hf + PARTIAL, hf)


def _save_failed(e: Exception, root: str, tag: str) -> str:
    previous, _ = newest_complete(root)
    kept = (
        f"the previous checkpoint {os.path.join(root, previous)} is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    fix = "free space there, lower train.keep_last, or set output_dir to a larger disk"
    return write_failed(e, root, f"saving checkpoint {tag}", kept, fix)


def rotate(root: str, keep_last: int, keep: str) -> None:
    """Deletes interrupted saves and all but the `keep_last` newest complete checkpoints (never `keep`)."""
    for name in os.listdir(root):
        if name.endswith(PARTIAL):
            _remove(os.path.join(root, name))
    if keep_last <= 0:
        return
    owner = run_id(root)
    others = [t for _, t in _steps(root) if t != keep and why_incomplete(root, t) is None and _owned(root, t, owner)]
    for tag in others[keep_last - 1 :]:
        _remove(os.path.join(root, tag))


# -- resuming -------------------------------------------------------------------------------------


def load(engine, root: str, tag: str) -> int:
    """Restores the engine states; returns the step to continue from."""
    where = os.path.join(root, tag)
    with open(os.path.join(where, MARKER)) as f:
        marker = json.load(f)
    if marker["deepspeed"] != engine.deepspeed:
        kind = "a DeepSpeed" if marker["deepspeed"] else "a single-process"
        raise ConfigError(
            f"train.resume: {where} is {kind} checkpoint; resume it the same way "
            f"(engine.ds_config / number of ranks as when it was saved)"
        )
    if marker.get("world", engine.dist.world) != engine.dist.world:
        raise ConfigError(
            f"train.resume: {where} was saved by {marker['world']} ranks, this run has "
            f"{engine.dist.world}; resume with {marker['world']} ranks, or export it (tide-ds export) "
            f"and start a new run from student.path"
        )
    now = settings(engine.student)
    for key, saved in marker.get("settings", {}).items():
        if key in now and now[key] != saved:
            raise ConfigError(
                f"train.resume: {where} was saved with {key} = {saved}, this run has {now[key]}; "
                f"set it as when saved, or start a new run from an export of it (tide-ds export)"
            )
    if marker.get("architecture", architecture(engine.student)) != architecture(engine.student):
        raise ConfigError(
            f"train.resume: {where} holds another student architecture than this run builds; "
            f"set student.path / student.init as when it was saved"
        )
    try:
        state = engine.load(root, tag)
    except ConfigError:
        raise
    except Exception as e:  # a damaged file: name it, and where to resume instead
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"train.resume: checkpoint {where} cannot be read ({type(e).__name__}: {first}); "
            f"it is damaged: resume from an earlier checkpoint in {root}, or delete it"
        ) from None
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def student_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights (transformers names) from a plain or (ZeRO) DeepSpeed checkpoint."""
    plain = os.path.join(root, tag, PLAIN_STATE)
    if os.path.isfile(plain):
        sd, prefix = torch.load(plain, map_location="cpu", weights_only=False)["model"], "model."
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd, prefix = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag), "student.model."
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# -- export ---------------------------------------------------------------------------------------


def export(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """Writes the checkpoint's student to `out` (whole, or not at all); a non-empty `out` is
    replaced only with `overwrite`, once the new model is complete."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} not found")
    check_out_dir(out, overwrite, "export")
    root, tag = _split(checkpoint)
    reason = why_incomplete(root, tag)
    if reason is not None:
        raise ConfigError(f"{os.path.join(root, tag)} is not a complete tide-ds checkpoint: {reason}")
    hf = os.path.join(root, "hf")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(student_state_dict(root, tag), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"checkpoint {root}/{tag} does not match the saved config: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    return write_dir(out, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory (<output_dir>/checkpoints/<tag>) or the "
        "checkpoints directory itself (its latest tag)",
    )
    p.add_argument("out", help="where to write the transformers model directory")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")


def run(args) -> int:
    print(f"exported {export(args.checkpoint, args.out, args.overwrite)}")
    return 0
