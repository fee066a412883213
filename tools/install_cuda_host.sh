#!/usr/bin/env bash
# On the GPU machine: puts the module tools/build_cuda_host.sh left in
# devbuild/ into mlx_flash/ (where `from mlx_flash import _cuda_host` finds it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
for f in "$root"/devbuild/_cuda_host*.so.bin; do
  cp "$f" "$root/mlx_flash/$(basename "${f%.bin}")"
  echo "installed mlx_flash/$(basename "${f%.bin}")"
done
