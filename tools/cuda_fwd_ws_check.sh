#!/bin/bash
# GPU check of the warp-specialised forward (attention_fwd_ws) before widening its
# route: every instance (fp16/bf16, D 64/128, dense/causal) built in parallel into a
# fresh MLX kernel cache, then test_ws_forward_on_gpu (both grids, odd shapes, GQA,
# Nq != Nk, blocks taking several items) and the non-finite tests it serves.
#     bash tools/cuda_fwd_ws_check.sh OUT_DIR
set -u
OUT=${1:-.}
mkdir -p "$OUT"
export MLX_PTX_CACHE_DIR=$(mktemp -d /tmp/fwdws_ptx.XXXXXX)  # MLX keys its disk cache by kernel name only
export WS_VARIANTS=""  # prewarm: the default instance of each case only
for i in $(seq 0 7); do
  python3 tools/cuda_wgmma_check.py "$OUT" prewarm:$i:8 > "$OUT/prewarm$i.txt" 2>&1 &
done
wait
MLX_FLASH_CUDA_FWD_WS=all python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_specific.py \
  -k "ws_forward_on_gpu or (nonfinite_forward_backward and (float16-D64 or float16-D128 or bfloat16-D128))" \
  2>&1 | tail -15
