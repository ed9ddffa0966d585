#!/usr/bin/env bash
# A one-machine SLURM cluster for tests and trials: its own munged, slurmctld and slurmd, with every
# file (key, sockets, state, logs, pid files) under DIR and free ports, so it runs beside anything
# else on the machine. Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages.
#   launchers/slurm_local.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`: eval it
#   launchers/slurm_local.sh stop DIR    # stops the three daemons by their pid files
set -euo pipefail
cmd=${1:?start or stop} dir=${2:?a directory}
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
chmod 755 "$dir"  # munged runs as the munge user and must reach $dir/munge

stop() {
  local name pid
  for name in slurmd slurmctld munge/munged; do
    [[ -s $dir/$name.pid ]] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  for exe in munged slurmctld slurmd sinfo; do
    command -v "$exe" >/dev/null || { echo "slurm_local.sh: $exe not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
  done
  stop  # a previous cluster in the same directory
  rm -rf "$dir/state" "$dir/spool" "$dir/munge"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
  # munge: a fresh key and socket readable by the munge user only
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chown -R munge:munge "$dir/munge" && chmod 700 "$dir/munge" && chmod 400 "$dir/munge/munge.key"
  runuser -u munge -- munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed"
  local host
  host=$(hostname -s)
  cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket,cred_expire=10
SchedulerParameters=sched_interval=2
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; return; }
    sleep 0.5
  done
  echo "slurm_local.sh: the node did not become idle in 30 s; logs in $dir/log" >&2
  stop
  exit 1
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
