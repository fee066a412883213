#!/usr/bin/env bash
# Developer build: compiles mlx_flash._ext into mlx_flash/ of this checkout,
# so `PYTHONPATH=$PWD` (or running from the repo root) imports it. Several
# git worktrees can each have their own build this way.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmake -S "$root" -B "$root/build/inplace" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$root/mlx_flash" \
  -DPython_EXECUTABLE="$(command -v python3)" > /dev/null
cmake --build "$root/build/inplace"
