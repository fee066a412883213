#!/usr/bin/env bash
# Builds mlx_flash._cuda_host (csrc/cuda_host.cpp) for the GPU machine:
# CPython 3.12, against the unpacked mlx-cuda wheel
# (default /work/mlxcuda_whl/mlx: its headers and libmlx.so, which the
# device's MLX loads under the same name), with the nanobind of this venv
# (the version MLX was built with). The module lands in devbuild/ as
# _cuda_host.cpython-312-x86_64-linux-gnu.so.bin: untracked but not
# git-ignored (*.so is), so it travels with the tree to the GPU machine, where
# tools/install_cuda_host.sh copies it into mlx_flash/ without the .bin.
#   tools/build_cuda_host.sh [MLX_ROOT] [PYTHON3.12]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mlx_root=${1:-/work/mlxcuda_whl/mlx}
py=${2:-/root/.pyenv/versions/3.12.1/bin/python3.12}
build="$root/build/cuda_host"
nb=$(python3 -m nanobind --cmake_dir)
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$py" \
  -DMLXF_MLX_ROOT="$mlx_root" -Dnanobind_ROOT="$nb" -DMLXF_CUDA_HOST=ON \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$build/out" > /dev/null
cmake --build "$build" --target _cuda_host
mkdir -p "$root/devbuild"
so=$(ls "$build"/out/_cuda_host*.so)
rm -f "$root"/devbuild/_cuda_host*.so.bin
cp "$so" "$root/devbuild/$(basename "$so").bin"
echo "built devbuild/$(basename "$so").bin"
