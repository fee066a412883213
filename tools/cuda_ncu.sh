#!/usr/bin/env bash
# Nsight Compute summaries of the attention kernels at a few shapes (GPU machine).
# Writes $OUT/ncu_*.txt. Usage: bash tools/cuda_ncu.sh
set -u
out=${OUT:-.}
ncu_run() {
  local name=$1; shift
  ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      -k regex:mlx_flash -c "${NCU_COUNT:-2}" python3 tools/cuda_probe.py "$@" > "$out/ncu_$name.txt" 2>&1
  echo "$name: rc=$? $(grep -c 'Duration' "$out/ncu_$name.txt") kernels"
}
ncu_run fwd_2tile 1 16 16 8192 8192 128 0 float16
MLX_FLASH_CUDA_FWD_TWO_TILES=0 ncu_run fwd_1tile 1 16 16 8192 8192 128 0 float16
NCU_COUNT=3 ncu_run decode 1 32 4 1 32768 128 0 float16
NCU_COUNT=3 ncu_run bwd 1 16 16 8192 8192 128 0 float16 1
