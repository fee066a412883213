#!/bin/bash
# GPU job for the quantized decode's opt-in TILES 2 (TUNING "dec_tiles": two of
# a warp's 16-key tiles an iteration, register path; docs/cuda_decode.md,
# session 11): its GPU correctness tests, then the 32-layer decode step (B 1,
# GQA 32:8, Nk 32768, D 128, 4-bit group 64) in one process: mx.fast SDPA over
# fp16 first, then the routed plan and TILES 2 alternated (A B A B), and
# TILES 2 with FOLD (tools/cuda_decode_profile.py --step; us a call).
#     bash tools/cuda_tiles_check.sh OUT_DIR        (about 2 minutes on an H100/H200)
# Route it (cuda_quant._DEC_TILES = 2) only if both TILES 2 rows beat both routed rows' eval_us.
set -u
OUT=${1:-.}
mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_quant_tiles.py -k gpu > "$OUT/tiles_correct.txt" 2>&1
echo "tiles_correct.txt: $(tail -1 "$OUT/tiles_correct.txt")"
CARD=$(python3 -c "import mlx.core as mx; print(mx.device_info().get('device_name', 'gpu').lower().replace(' ', '_'))")
python3 tools/cuda_decode_profile.py "$OUT" --step --bits 4 --no-lm --tag "tiles_$CARD" --plans \
  '{"routed": {}, "tiles2": {"dec_tiles": 2}, "routed_b": {}, "tiles2_b": {"dec_tiles": 2}, "tiles2_fold": {"dec_tiles": 2, "dec_fold": true}}' \
  2>&1 | tee "$OUT/tiles_step.txt" | grep -E "^step" | cut -c1-200
