#!/bin/bash
# GPU check of the warp-specialised forward (attention_fwd_ws) before changing its
# route: every instance (fp16/bf16, D 64/128, dense/causal) built in parallel into a
# fresh MLX kernel cache, then test_ws_forward_on_gpu (both grids, odd shapes, GQA,
# Nq != Nk, blocks taking several items, sections of 3 heads) as one pytest per
# instance (a process loads each module once; -n over all tests took longer than a
# 48 s slot on the H200), and the non-finite tests it serves.
#     bash tools/cuda_fwd_ws_check.sh OUT_DIR
set -u
OUT=${1:-.}
mkdir -p "$OUT"
export MLX_PTX_CACHE_DIR=$(mktemp -d /tmp/fwdws_ptx.XXXXXX)  # MLX keys its disk cache by kernel name only
export SWEEP_PLAN="128:f16:ws=;128:bf16:ws=;64:f16:ws=;64:bf16:ws="
for i in $(seq 0 7); do
  python3 tools/cuda_wgmma_check.py "$OUT" build:$i:8 > "$OUT/build$i.txt" 2>&1 &
done
wait
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2
i=0
for kind in "float16-D128 and not bfloat16" "bfloat16-D128" "float16-D64 and not bfloat16" "bfloat16-D64"; do
  for feat in "none" "not none"; do
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_specific.py \
      -k "ws_forward_on_gpu and $kind and $feat" > "$OUT/correct$i.txt" 2>&1 &
    i=$((i+1))
  done
done
wait
for f in "$OUT"/correct*.txt; do echo "$(basename "$f"): $(grep -E 'passed|failed|error' "$f" | tail -1)"; done
MLX_FLASH_CUDA_FWD_WS=all python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_specific.py \
  -k "nonfinite_forward_backward_on_gpu and (float16-D64 or float16-D128 or bfloat16-D128)" 2>&1 | tail -5
