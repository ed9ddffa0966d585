#!/usr/bin/env bash
# The toolchain of the CUDA compile checks, from the package registry (no GPU, no CUDA install):
# nvcc with the CUDA and libcu++ headers (pinned nvidia-* wheels) in DEST/cuda, and the headers of
# the CUDA build of this venv's torch in DEST/torch-include. Prints the variables tests/test_kernels.py
# reads, as shell exports. Usage: .ci/cuda_toolchain.sh PYTHON DEST
set -euo pipefail
py=$1 dest=$2
nvcc=$dest/cuda/nvidia/cu13/bin/nvcc
if [[ ! -x $nvcc ]]; then
  "$py" -m pip install -q --target "$dest/cuda" \
    nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-cccl==13.3.5.0.6 >&2
fi
[[ -x $nvcc ]] || { echo "no nvcc at $nvcc after the install" >&2; exit 1; }
include=$dest/torch-include
if [[ ! -f $include/c10/cuda/impl/cuda_cmake_macros.h ]]; then
  version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
  "$py" .ci/torch_cuda_headers.py "$version" "$include" >&2
fi
echo "export TIDE_DS_NVCC=$nvcc TIDE_DS_CUDA_TORCH_INCLUDE=$include"
