#!/bin/bash
# GPU job for the quantized decode's bounded ring (cuda_src/attention_quant_ring_bound.cuh:
# __maxnreg__(128), so that two 8-warp blocks fit an SM under MLX's NVRTC; opt-in,
# TUNING "dec_stages"): its GPU correctness tests, its registers and occupancy as
# the card loads it (ncu), then the 32-layer decode step (B 1, GQA 32:8, Nk 32768,
# D 128, 4-bit group 64) of the bounded ring, the routed register path and
# mx.fast SDPA over fp16 side by side (tools/cuda_decode_profile.py --step).
#     bash tools/cuda_ring_check.sh OUT_DIR        (about 6-8 minutes on an H200)
set -u
OUT=${1:-.}
mkdir -p "$OUT"
export MLX_PTX_CACHE_DIR=$(mktemp -d /tmp/ring_ptx.XXXXXX)  # fresh kernels: the bound is in the header text
# 1. Correctness: the ring on every decode shape (1-8 warps), KEYS_M, features, the long-context plans.
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_quant_emu.py \
  -k "decode_ring_gpu or decode_keys_m_gpu or decode_features_gpu" > "$OUT/ring_correct.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_quant_emu.py -k "decode_long_context_gpu" \
  > "$OUT/ring_long.txt" 2>&1
for f in "$OUT"/ring_correct.txt "$OUT"/ring_long.txt; do echo "$(basename "$f"): $(tail -1 "$f")"; done
PLANS='{"regs": {"dec_stages": 0}, "ring_w8": {"dec_stages": 4, "dec_warps": 8}, "ring_w8_km": {"dec_stages": 4, "dec_warps": 8, "dec_keys_m": 1}, "ring_w8_km2": {"dec_stages": 4, "dec_warps": 8, "dec_keys_m": 2}}'
# 2. Registers a thread and the register-limited blocks an SM, as loaded (expect <= 128 and 2 for ring_w8 / _km).
if command -v ncu > /dev/null; then
  ncu --csv --kernel-name regex:attention_quant_decode \
    --metrics launch__registers_per_thread,launch__occupancy_limit_registers,launch__block_size,gpu__time_duration.sum \
    python3 tools/cuda_decode_profile.py "$OUT" --kernels-step --bits 4 --plans "$PLANS" > "$OUT/ring_ncu.csv" 2>&1
  grep -E "registers|occupancy_limit|kernels-step" "$OUT/ring_ncu.csv" | head -40
fi
# 3. The 32-layer step: mx.fast over fp16, the routed plan and each ring (us a call).
python3 tools/cuda_decode_profile.py "$OUT" --step --bits 4 --no-lm --tag ring_bound \
  --plans "{\"default\": {}, ${PLANS:1}" 2>&1 | tee "$OUT/ring_step.txt" | tail -20
