"""Process-group set-up under every launcher: deepspeed, torchrun, mpirun, SLURM srun, or none."""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass

import torch

from tide_ds.config import Config, ConfigError

_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """Ranks the launcher started (1 when run as a plain process)."""
    for key in ("WORLD_SIZE", *_MPI_SIZE):
        if key in os.environ:
            return int(os.environ[key])
    if "SLURM_STEP_ID" in os.environ and "SLURM_NTASKS" in os.environ:  # inside an srun step
        return int(os.environ["SLURM_NTASKS"])
    return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env() -> None:
    """`srun` starts the ranks itself: take rank and size from SLURM (MASTER_ADDR from the sbatch script;
    MASTER_PORT from it or from the job id). Under mpirun (OMPI_*) or a launcher (RANK set), their variables win."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "SLURM_STEP_ID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        if int(os.environ.get("SLURM_NNODES", "1")) > 1:
            raise ConfigError(
                "srun over several nodes: export MASTER_ADDR (the first node, e.g. "
                "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) in the sbatch script"
            )
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", str(slurm_port()))


def slurm_port() -> int:
    """A rendezvous port per job (the sbatch script computes the same one): a fixed port fails with
    EADDRINUSE as soon as two jobs share a node."""
    return 15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000


def local_size_for_autotp() -> None:
    """DeepSpeed's CPU all-reduce (used by AutoTP) reads LOCAL_SIZE, which only its own launcher sets;
    torchrun, mpirun and srun say the same thing under another name. Called before the process group starts."""
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if "LOCAL_SIZE" not in os.environ and key in os.environ:
            os.environ["LOCAL_SIZE"] = os.environ[key]
    if "LOCAL_SIZE" not in os.environ and "SLURM_STEP_ID" in os.environ:
        # srun: tasks per node of this step, "2" or "2(x3)"; left unset when nodes differ ("3,1")
        m = re.fullmatch(r"(\d+)(\(x\d+\))?", os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
        if m:
            os.environ["LOCAL_SIZE"] = m.group(1)


def init_distributed(cfg: Config, use_deepspeed: bool) -> Dist:
    """Starts the process group for a DeepSpeed run (the run plan's choice); a plain process otherwise."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if not use_deepspeed:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if want_cuda else "cpu")
    _slurm_env()
    if launched_world() == 1 and "RANK" not in os.environ:  # one process with a ds_config
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if cfg.engine.teacher_placement == "tensor_parallel":
        local_size_for_autotp()
    import deepspeed

    backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if want_cuda else "gloo")
    timeout = group_timeout(cfg.engine.timeout_s)
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=True,
        verbose=False,
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
        timeout=timeout,
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not want_cuda and world > 1:
        unlink_shm_workspace(rank)
    if want_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if want_cuda else "cpu"))


WATCHDOG_GRACE_S = 10  # the collectives time out this much after the watchdog, which can name the rank


def group_timeout(timeout_s: int) -> datetime.timedelta:
    """The timeout of every process group of the run. torch gives a group made by new_group()
    without a timeout (DeepSpeed makes its data-parallel and expert groups so) its own default, 10
    or 30 minutes, not the world group's: the defaults are set to engine.timeout_s too."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s + WATCHDOG_GRACE_S)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


SHM_WORKSPACE = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def unlink_shm_workspace(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce gives every rank of a one-node job a /dev/shm segment
    (about 66 MB) and never removes it, so each CPU run would leave its segments behind until the
    machine reboots, and /dev/shm counts against RAM. Once every rank has mapped every segment
    (the barrier), the names can go: the memory stays mapped and is freed when the last rank exits,
    however it exits."""
    path = SHM_WORKSPACE.format(
        uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""), port=os.environ.get("MASTER_PORT", ""), rank=rank
    )
    torch.distributed.barrier()  # on every rank: whether a segment exists is not known elsewhere
    try:
        os.unlink(path)
    except FileNotFoundError:  # no shared-memory allreduce in this job (ranks on several nodes)
        pass


def fail_fast(fn):
    """Runs fn(); on an exception in a multi-rank job, prints it with the rank and exits at once,
    so that the launcher stops the other ranks (they would otherwise wait in a collective)."""
    try:
        return fn()
    except BaseException as e:
        if not (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise
        rank = torch.distributed.get_rank()
        if isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, ConfigError):  # a bad input: one line, as the CLI prints it
            print(f"[rank {rank}] tide-ds: error: {e}", file=sys.stderr, flush=True)
            os._exit(2)
        text = "".join(traceback.format_exception(e)).rstrip().replace("\n", f"\n[rank {rank}] ")
        print(f"[rank {rank}] {text}\n[rank {rank}] error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # no atexit / process-group teardown: either could wait on the other ranks
