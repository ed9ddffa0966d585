#!/usr/bin/env bash
# mpirun (Open MPI): ranks, sizes and the master address come from MPI (pip install "tide-ds[mpi]").
#   NP=16 HOSTS=node-001:8,node-002:8 launchers/mpirun.sh CONFIG.yaml [key=value ...]
# One node: NP=2 launchers/mpirun.sh ...   (as root add MPI_ARGS=--allow-run-as-root)
set -euo pipefail
config=$1; shift
hosts=()
[[ -n ${HOSTS:-} ]] && hosts=(--host "$HOSTS")
exec mpirun -np "${NP:-2}" "${hosts[@]}" ${MPI_ARGS:-} -x PATH -x PYTHONPATH -x DS_ACCELERATOR \
  python -m tide_ds.cli distill --config "$config" engine.ds_config="${DS_CONFIG:-ds_configs/zero3.json}" "$@"
