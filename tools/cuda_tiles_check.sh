#!/bin/bash
# GPU job for the quantized decode's opt-in TILES 2 and LATE (TUNING "dec_tiles": two of
# a warp's 16-key tiles an iteration, register path; docs/cuda_decode.md,
# session 11): its GPU correctness tests, then the 32-layer decode step (B 1,
# GQA 32:8, Nk 32768, D 128, 4-bit group 64) in one process: mx.fast SDPA over
# fp16 first, then the routed plan and TILES 2 + prefetch + LATE alternated
# (A B .. A B), TILES 2 alone, prefetch + LATE, TILES 2 + LATE
# (tools/cuda_decode_profile.py --step; us a call).
#     bash tools/cuda_tiles_check.sh OUT_DIR        (under 2 minutes on an H100/H200: the correctness
#                                                    test of the timed shape, every variant, 4/8-bit)
#     FULL=1 bash tools/cuda_tiles_check.sh OUT_DIR (every GPU test of tests/test_cuda_quant_tiles.py)
# Route a variant only if both of its rows (or its one row) beat both routed rows' eval_us.
set -u
OUT=${1:-.}
mkdir -p "$OUT"
SEL=$([ "${FULL:-0}" = 1 ] && echo gpu || echo long_context_gpu)
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_quant_tiles.py -k "$SEL" > "$OUT/tiles_correct.txt" 2>&1
echo "tiles_correct.txt: $(tail -1 "$OUT/tiles_correct.txt")"
CARD=$(python3 -c "import mlx.core as mx; print(mx.device_info().get('device_name', 'gpu').lower().replace(' ', '_'))")
python3 tools/cuda_decode_profile.py "$OUT" --step --bits 4 --no-lm --tag "tiles_$CARD" --plans \
  '{"routed": {}, "tiles2_pf_late": {"dec_tiles": 2, "dec_prefetch": true, "dec_late_scales": true, "dec_pool": false}, "tiles2": {"dec_tiles": 2}, "pf_late": {"dec_prefetch": true, "dec_late_scales": true, "dec_pool": false}, "routed_b": {}, "tiles2_pf_late_b": {"dec_tiles": 2, "dec_prefetch": true, "dec_late_scales": true, "dec_pool": false}, "tiles2_late": {"dec_tiles": 2, "dec_late_scales": true}}' \
  2>&1 | tee "$OUT/tiles_step.txt" | grep -E "^step" | cut -c1-200
