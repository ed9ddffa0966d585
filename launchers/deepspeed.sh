#!/usr/bin/env bash
# Multi-node (or single-node) distillation with the deepspeed launcher.
#   launchers/deepspeed.sh HOSTFILE CONFIG.yaml [key=value ...]
# One node without a hostfile: HOSTFILE=none; on CPU add NUM_RANKS=2 (the launcher sees no GPUs).
# Environment: DS_CONFIG (default ds_configs/zero3.json), MASTER_ADDR (default: first host), MASTER_PORT,
# DS_LAUNCHER_ARGS (more launcher options, e.g. "--ssh_port 2222 --no_ssh_check").
set -euo pipefail
hostfile=$1 config=$2; shift 2
args=(--master_port "${MASTER_PORT:-29500}")
if [[ $hostfile != none ]]; then
  args+=(--hostfile "$hostfile" --master_addr "${MASTER_ADDR:-$(grep -v '^#' "$hostfile" | awk 'NF{print $1; exit}')}")
fi
[[ -n ${NUM_RANKS:-} ]] && args+=(--num_accelerators "$NUM_RANKS")
read -ra extra <<< "${DS_LAUNCHER_ARGS:-}"
exec deepspeed "${args[@]}" "${extra[@]}" --module tide_ds.cli distill --config "$config" \
  engine.ds_config="${DS_CONFIG:-ds_configs/zero3.json}" "$@"
