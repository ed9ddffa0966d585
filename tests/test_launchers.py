"""Multi-node launches on one machine and the SLURM batch script.

Two "nodes" are two loopback addresses (127.0.0.1 and 127.0.0.2): the deepspeed launcher reaches them
through pdsh and an sshd this test starts, torchrun through a c10d rendezvous. Both train a ZeRO-3
student with a ZeRO-3 teacher on 2 ranks and must give the losses of one process. The SLURM tests need
a controller that answers (launchers/slurm_local.sh starts one; .ci/run does)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import BIN, NEEDS_SLURM, REPO, _args, _port

from tide_ds import checkpoint
from tide_ds.config import ConfigError, load_config
from tide_ds.train import distill

NODES = ("127.0.0.1", "127.0.0.2")
COMMON = ["recipe=tide_cross", "train.steps=4", "train.warmup_steps=0", "train.lr=3e-3"]


def _env(**extra) -> dict[str, str]:
    """The environment of test_engine.launch: this checkout first on PYTHONPATH, CPU ranks, no
    inherited rank variables."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _zero3(tmp_path) -> list[str]:
    """ZeRO-3 for the student and the teacher, every tensor partitioned (even the tiny ones)."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    return [f"engine.ds_config={tmp_path / 'zero3.json'}", "engine.teacher_placement=zero3"]


def _single_process_losses(tiny_overrides, tmp_path) -> list[float]:
    """The reference: one plain process, the same global batch of 4 as 2 accumulation steps of 2."""
    run = distill(
        load_config(None, _args(tiny_overrides, tmp_path / "one", *COMMON, "train.gradient_accumulation_steps=2"))
    )
    return [h["loss"] for h in run["history"]]


def _check_two_ranks(out, tmp_path, tiny_overrides, name):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] teacher (zero3): 0.04 MiB of parameters on this rank (of 0.08 MiB)" in log, log[-3000:]
    run = json.loads((tmp_path / name / "metrics.json").read_text())
    assert run["world"] == 2
    assert [h["loss"] for h in run["history"]] == pytest.approx(
        _single_process_losses(tiny_overrides, tmp_path), abs=1e-5
    )
    return log


# -- deepspeed --hostfile over ssh ---------------------------------------------------------------


@pytest.fixture
def ssh_nodes(tmp_path):
    """An sshd on both loopback addresses accepting a key made here; yields (port, ssh options)."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    missing = [t for t in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(t)] + (
        [] if os.path.exists(sshd) else ["sshd"]
    )
    if missing or os.geteuid() != 0:
        pytest.skip(
            f"needs root, sshd, ssh and pdsh (apt-get install openssh-server pdsh); missing: {missing or 'root'}"
        )
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user.pub", d / "authorized_keys")
    port = _port()
    (d / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                *(f"ListenAddress {a}" for a in NODES),
                f"HostKey {d / 'host'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "UsePAM no",
                "StrictModes no",
                f"PidFile {d / 'sshd.pid'}",
                "",
            ]
        )
    )
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    opts = (
        f"-i {d / 'user'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
        "-o LogLevel=ERROR"
    )
    try:
        for _ in range(50):  # until it answers on both addresses
            ok = all(
                subprocess.run(["ssh", *opts.split(), "-p", str(port), a, "true"], capture_output=True).returncode == 0
                for a in NODES
            )
            if ok or proc.poll() is not None:
                break
            time.sleep(0.2)
        if not ok:
            proc.kill()
            pytest.fail(f"sshd did not answer on {NODES}: {proc.communicate()[1][-2000:]}")
        yield port, opts
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.multirank
@pytest.mark.slow
def test_deepspeed_hostfile_two_nodes_match_one_process(ssh_nodes, tiny_overrides, tmp_path):
    """launchers/deepspeed.sh (`deepspeed --hostfile`) with 2 hosts of 1 slot: pdsh logs into each over
    ssh and starts its rank there; the master address is the first host of the hostfile."""
    port, opts = ssh_nodes
    (tmp_path / "hostfile").write_text("".join(f"{a} slots=1\n" for a in NODES))
    # the launcher exports only PYTHON* variables to the nodes by default; the rest go in its env file
    env = _env()
    (tmp_path / "ds_env").write_text(
        "".join(f"{k}={env[k]}\n" for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR") if k in env)
    )
    env.update(
        DS_ENV_FILE=str(tmp_path / "ds_env"),
        PDSH_SSH_ARGS_APPEND=opts,
        MASTER_PORT=str(_port()),
        DS_LAUNCHER_ARGS=f"--ssh_port {port} --no_ssh_check",
    )
    (tmp_path / "run.yaml").write_text("recipe: tide_cross\n")
    cmd = [
        str(REPO / "launchers" / "deepspeed.sh"),
        str(tmp_path / "hostfile"),
        str(tmp_path / "run.yaml"),
        *_args(tiny_overrides, tmp_path / "ds2", *COMMON, *_zero3(tmp_path)),
    ]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = _check_two_ranks(out, tmp_path, tiny_overrides, "ds2")
    for node, addr in enumerate(NODES):  # pdsh prefixes each node's output with its host
        assert re.search(rf"^{re.escape(addr)}: .*nnodes=2, num_local_procs=1, node_rank={node}", log, re.M), log[
            -3000:
        ]
    assert re.search(rf"^{re.escape(NODES[1])}: .*\[rank 1\] teacher \(zero3\)", log, re.M), log[-3000:]


# -- torchrun --nnodes 2 -------------------------------------------------------------------------


@pytest.mark.multirank
@pytest.mark.slow
def test_torchrun_two_nodes_match_one_process(tiny_overrides, tmp_path):
    """Two torchrun agents (one per address, 1 process each) meet at a c10d rendezvous endpoint."""
    endpoint = f"{NODES[0]}:{_port()}"
    args = ["distill", *_args(tiny_overrides, tmp_path / "tr2", *COMMON, *_zero3(tmp_path))]
    procs = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "tide-ds-test",
                "--rdzv_conf",
                f"is_host={int(node == 0)}",
                "--local_addr",
                addr,
                "-m",
                "tide_ds.cli",
                *args,
            ],
            env=_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node, addr in enumerate(NODES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    out = subprocess.CompletedProcess([], max(p.returncode for p in procs), "\n".join(logs), "")
    _check_two_ranks(out, tmp_path, tiny_overrides, "tr2")
    assert "[rank 1] teacher" in logs[0] + logs[1] and "[rank 0] teacher" in logs[0] + logs[1]


# -- SLURM: launchers/slurm.sbatch ---------------------------------------------------------------

SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]


def _sbatch(tmp_path, overrides, *options):
    (tmp_path / "run.yaml").write_text("recipe: tide_cross\n")
    cmd = [
        "sbatch",
        "--parsable",
        *SBATCH_CPU,
        f"--output={tmp_path / 'job.log'}",
        *options,
        str(REPO / "launchers" / "slurm.sbatch"),
        str(tmp_path / "run.yaml"),
        *overrides,
    ]
    return subprocess.run(cmd, env=_env(PYTHON=sys.executable), cwd=REPO, capture_output=True, text=True, timeout=900)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.mark.multirank
@NEEDS_SLURM
def test_sbatch_script_on_a_node_without_gpus(tiny_overrides, tmp_path):
    """The batch script asks for no GPUs, so a CPU node accepts it; 2 ranks train and save."""
    out = _sbatch(
        tmp_path,
        _args(
            tiny_overrides, tmp_path / "job", *COMMON, *_zero3(tmp_path), "train.resume=null"
        ),  # after the script's train.resume=auto: a fresh run
        "--wait",
    )
    log = _read(tmp_path / "job.log")
    assert out.returncode == 0, out.stderr[-2000:] + log[-3000:]
    assert "2 ranks on 1 node(s), GPUs per node: none" in log, log[-3000:]
    run = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert run["world"] == 2 and all(math.isfinite(h["loss"]) for h in run["history"])
    assert (tmp_path / "job" / "checkpoints" / "step4" / checkpoint.MARKER).is_file()


def _resume_auto_supported(tiny_overrides, tmp_path) -> bool:
    """Whether this tide_ds resumes with train.resume=auto: from the newest complete checkpoint in
    output_dir, or from scratch when there is none."""
    try:
        cfg = load_config(None, _args(tiny_overrides, tmp_path / "empty", "train.resume=auto"))
        return checkpoint.resolve_resume(cfg) is None
    except ConfigError:
        return False


@pytest.mark.multirank
@pytest.mark.slow
@NEEDS_SLURM
def test_sbatch_requeues_on_usr1_and_resumes_from_the_checkpoint(tiny_overrides, tmp_path):
    """USR1 to the batch shell (as --signal=B:USR1@... sends it before the time limit): the ranks save a
    checkpoint and exit, the script requeues the job, and the second start continues from that checkpoint
    with the losses of an uninterrupted run."""
    if not _resume_auto_supported(tiny_overrides, tmp_path):
        pytest.skip(
            "needs train.resume=auto (resume from the newest complete checkpoint in output_dir, "
            "or start fresh), which this tide_ds refuses"
        )
    steps = ["train.steps=150", "train.warmup_steps=0", "train.lr=3e-3", "recipe=tide_cross"]
    out = _sbatch(tmp_path, _args(tiny_overrides, tmp_path / "job", *steps, *_zero3(tmp_path)))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 600
        # a few steps done: metrics.jsonl gets a flushed line per step (log_every=1), unlike the buffered job log
        while len(_read(tmp_path / "job" / "metrics.jsonl").splitlines()) < 3:
            assert time.time() < deadline and _job(job).get("JobState") in ("PENDING", "RUNNING"), _read(
                tmp_path / "job.log"
            )
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        while (state := _job(job)).get("JobState") != "COMPLETED":
            assert time.time() < deadline and state.get("JobState") in (
                "PENDING",
                "RUNNING",
                "REQUEUED",
                "COMPLETING",
            ), (state.get("JobState"), _read(tmp_path / "job.log")[-3000:])
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = _read(tmp_path / "job.log")
    assert state.get("Restarts") == "1" and "SIGUSR1" in log and "requeued" in log and "start 2," in log, log[-3000:]
    run = json.loads((tmp_path / "job" / "metrics.json").read_text())
    saved = tmp_path / "job" / "checkpoints" / f"step{run['first_step']}"
    assert 0 < run["first_step"] < 150 and (saved / checkpoint.MARKER).is_file(), run["first_step"]
    reference = distill(
        load_config(None, _args(tiny_overrides, tmp_path / "one", *steps, "train.gradient_accumulation_steps=2"))
    )
    # the first 30 resumed steps: later ones drift apart by rounding (2 ZeRO-3 ranks against one process)
    resumed = {h["step"]: h["loss"] for h in run["history"] if h["step"] < run["first_step"] + 30}
    assert resumed and min(resumed) == run["first_step"]
    assert list(resumed.values()) == pytest.approx(
        [h["loss"] for h in reference["history"] if h["step"] in resumed], abs=1e-5
    )
