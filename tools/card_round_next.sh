#!/usr/bin/env bash
# Card checks, each part one device call of under 600 s (the device tool's
# limit per command). Every part is the record of a round that ran (results
# under benchmarks/results/*_sNN*, write-ups in docs/cuda_decode.md,
# docs/cuda.md and docs/matmul.md): parts a-l sessions 11-15,
# m-r session 16 (n, o and p time the cp.async ring, removed since: they stop
# at its ValueError; r a merge not kept), s-z session 17, s18a-s18d session 18,
# s19a-s19f session 19.
# A card session:
#
#     call 1 (carry .device/first): mkdir -p /root/mlxcuda && cp .device/first/part.aa /root/mlxcuda/
#     call 2 (carry .device/rest):  bash .device/rest/install.sh >/dev/null 2>&1; . .device/rest/env.sh &&
#                                   bash tools/install_cuda_host.sh >/dev/null 2>&1; OUT=$OUT bash tools/card_round_next.sh PART
#     later calls, machine warm:    . tools/device_env.sh && OUT=$OUT bash tools/card_round_next.sh PART
#
# Part a: correctness of what changed default kernels or could be a default
# bug, then the opt-in variants waiting to be routed. Part b: side-by-side
# timings, each against mx.fast (cuDNN) or MLX in the same process (b's
# quant_tiles_ab step needed more than its 150 s on the H100: give it a call
# of its own; bwd_time without BWD_BEFORE_DIR, whose older kernel no longer
# builds against today's headers). Each step has its own time limit, so one
# that hangs costs only its share; every log lands in $OUT/<step>.txt and
# its last line is echoed.
set -u
PART=${1:?usage: card_round_next.sh a|b|...|z|s18a|...|s18d|s19a|...|s19f|s20a|...|s20e|s21a|s21b|s22b|s22c|s22d|s23a|s23b|s24a|s24b|s24c|s24e|s25a|s25b|s25c|s25d|s25e|s25f|s25g|s25h|s25i|s26a|s26b|s26c|s26d|s26e|s27a|s27b|s27c|s27d|s27e|s28a|s29a|s29b}
OUT=${OUT:?set OUT to the folder results go to}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc $? $(date +%T): $(tail -1 "$OUT/$name.txt" | cut -c1-200)"
}

# Session 19's parts: the in-kernel fp8 decode's GPU cases (with the default
# routes' float64 cases and the API's), and the prefill and targets timings.
s19_gpu_cases() {
  step raw_routes 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py \
    -k "decoded_in_kernel or exact_fp8_decoded_first or ws_batched or wgmma_matches_float64"
  step api_gpu 90 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py -k cuda
}
s19_timings() {
  step prefill 200 python3 -m mlx_flash.bench.cuda_matmul --sections prefill --out "$OUT/matmul_prefill.json"
  step targets 200 python3 -m mlx_flash.bench.cuda_matmul --sections targets --sizes 4096 8192 \
    --out "$OUT/matmul_targets.json"
}

# Session 22-23 (issue 14, backward): the backward alone (fwd+bwd - fwd) of the routes ROUTES (names of
# tools/cuda_bwd_ab.py's VARIANTS) beside mx.fast and torch, alternated per repetition, over a fresh kernel
# cache warmed in parallel (one process per dtype, head dim and causality).
bwd_routes_timed() {  # ROUTES
  export MLX_PTX_CACHE_DIR=$(mktemp -d /tmp/bwd_ptx.XXXXXX)
  export BWD_AB_ROWS="float16:1,16,8192,128;bfloat16:1,16,8192,128;float16:2,16,4096,128;float16:4,16,1024,64"
  for warm in "float16 128 0" "float16 128 1" "bfloat16 128 0" "bfloat16 128 1" "float16 64 0" "float16 64 1"; do
    (BWD_AB_WARM_ROUTES=$1 timeout 150 python3 tools/cuda_bwd_ab.py warm $warm >> "$OUT/warm.log" 2>&1 &)
  done
  sleep 5; while pgrep -f "cuda_bwd_ab.py warm" > /dev/null; do sleep 2; done
  step bwd_ab 300 env BWD_AB_ROUTES=$1 python3 tools/cuda_bwd_ab.py bwdonly "$OUT/bwd_ab.json"
}

# Session 23-24 (issue 14): the GPU cases of the float4 dQ atomics and of the ws backward.
bwd_dq_gpu_cases() {
  step bwd_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda_specific.py \
    -k "(dv_early_on_gpu and DQ_V4) or hopper_backward_ws_on_gpu"
}
# Session 24 (issue 15): stream-K's GPU cases (LIMIT, -k EXPR), then prompt tokens/s of Llama-8B and -3B
# shapes, fp16 beside FP8Linear, stream-K off and as set, plus the split VARIANTS (LIMIT, VARIANTS, JSON name;
# carry .device/mlxlm_full too).
stream_k_gpu_cases() {  # LIMIT EXPR
  step sk_gpu "$1" python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "$2"
}
llama_prefill_timed() {  # LIMIT VARIANTS NAME
  step llama_prefill "$1" env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_8b,llama_3b --llama-sk-variants "$2" --out "$OUT/$3.json"
}

if [ "$PART" = a ]; then
  # 1. Session 10's NaN on the warp-specialised matmul (a default route):
  #    the probe tells whether a cluster kernel's cached CUDA graph exec loses
  #    plain kernels' blocks (docs/matmul.md); the cluster kernels are gone,
  #    so the route suite, under six processes, must now pass.
  step ws_nan_probe 40 python3 tools/ws_matmul_nan_probe.py "$OUT/ws_nan_probe.json"
  step ws_routes 150 python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_matmul_cuda_routes.py \
    -k "ws_16bit or ws_fp8_native or session10"
  # 2. The backward kernels whose source changed for the NVRTC spills (D 128
  #    bool mask / ALiBi on the Hopper backward, D 112 softcap's fast tanh),
  #    the D 96 unroll of session 10 and the early dV.
  step bwd_changed 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_specific.py \
    -k "hopper_backward_d128_rules_on_gpu or mid_head_backward_on_gpu or dv_early_on_gpu or (hopper_backward_ws_on_gpu and causal and D128)"
  # 3. The C++ replay: decode and the opt-in prefill (keys now hold the settings epoch).
  step host_replay 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_host.py -k gpu
  # 4. Opt-in variants waiting for their card run: the forward's early
  #    rescale / continuous turns (the quantized decode's TILES / LATE are
  #    checked by part b's tools/cuda_tiles_check.sh before it times them).
  #    D 128's candidate is the persistent grid with turns across items
  #    (turns128), D 64's the turns with the early rescale (both64).
  step fwd_variants 120 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_cuda_specific.py \
    -k "ws_variant and (turns128 or both64)"
elif [ "$PART" = b ]; then
  # 5. Issue 16: TILES 2 (+ prefetch + LATE scales) against the routed decode
  #    and mx.fast, alternated, after their GPU tests at the timed shape (~120 s).
  step quant_tiles_ab 150 bash tools/cuda_tiles_check.sh "$OUT/tiles"
  # 6. Issue 14: the host-bound (4,16,1024,64) with the prefill replay off and on.
  step small_prefill_off 70 env MLX_FLASH_CUDA_HOST_PREFILL=0 python3 tools/cuda_small_prefill.py "$OUT/small_prefill.json"
  step small_prefill_on 70 env MLX_FLASH_CUDA_HOST_PREFILL=1 python3 tools/cuda_small_prefill.py "$OUT/small_prefill.json"
  # 7. Issue 14: the backward after the spill changes, beside mx.fast and torch
  #    (BWD_BEFORE_DIR with f496bce's kernel failed to build in session 12:
  #    its template no longer matches today's wrapper).
  step bwd_time 110 env BWD_AB_ROWS="float16:1,16,8192,128;float16:2,16,4096,128" \
    python3 tools/cuda_bwd_ab.py time "$OUT/bwd_time.json"
  # 8. Issue 15: fp8-weight decode over weights that do not fit in L2, beside the copy bandwidth.
  step mm_decode_stream 120 python3 -m mlx_flash.bench.cuda_matmul --sections decode_stream \
    --decode-shapes 4096:4096,4096:14336,8192:8192 --out "$OUT/mm_decode_stream.json"
elif [ "$PART" = c ]; then
  # Session 12's follow-up (after a and b ran on an H100): the opt-in fp8
  # plans promoting every 1 / 2 instructions, whose kernel names held "-1"
  # (NVRTC's name lookup failed; now PROMOTE_INSTR); the ws forward's new
  # defaults (D 128 persistent with turns across items, D 64 turns + early
  # rescale) through the GPU tests; the prefill replay; the quantized decode.
  step ws_fp8_promote_instr 90 python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_matmul_cuda_routes.py \
    -k "ws_fp8_native and (pr-1 or pr-2)"
  step ws_fwd_defaults 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_cuda_specific.py -k "ws_forward_on_gpu"
  # The prefill replay (now default) over the D 128 forward, persistent with tickets since session 12.
  step host_replay 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_host.py -k gpu
  # The bf16 quantized decode's sm < 90 branch is proven only on an A100 / L40; on Hopper a regression check.
  step quant_decode_shapes 120 python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_cuda_quant_emu.py -k decode_shapes_gpu
elif [ "$PART" = d ]; then
  # Session 12's follow-up timings: the ws forward's new defaults against the
  # old kernels and mx.fast, same card, then the backward beside mx.fast and torch.
  step ws_fwd_ab 150 env SWEEP_PLAN="128:f16:ws=,old=persistent~0/turns~0/early~0;64:f16:ws=,old=turns~0/early~0" \
    python3 tools/cuda_fwd_ws_ab.py "$OUT/ws_fwd_ab.json" 128:f16:0.1 64:f16:0.1 --rounds 3
  step bwd_time 110 env BWD_AB_ROWS="float16:1,16,8192,128;float16:2,16,4096,128" \
    python3 tools/cuda_bwd_ab.py time "$OUT/bwd_time.json"
elif [ "$PART" = e ]; then
  # Session 13 (after c and d ran on an H100): where the two DRAM-bound
  # decodes lose time. Issue 15: FP8Linear's direct call over weights from
  # DRAM with more loads in flight (U 8; 16 warps; 3 blocks an SM; RT 2),
  # 4 passes over the weight set per eval. Issue 16: the quantized decode's
  # register path with 8 warps a block (two a scheduler, same splits) and
  # Nsight Compute's sections (stall reasons, occupancy, memory) for the
  # routed kernel and the 8-warp one (part f has the per-SASS page).
  step mm_stream_plans 150 python3 -m mlx_flash.bench.cuda_matmul --sections decode_stream \
    --decode-shapes 4096:4096,4096:14336,8192:8192 --stream-cycles 4 \
    --gemv-plans "default;8,1,8,0,0,2,1;16,1,4,0,0,1,1;8,1,4,0,0,3,1;4,1,8,0,0,3,1;8,2,4,0,0,2,1" \
    --out "$OUT/mm_stream_plans.json"
  step quant_warps 120 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --bits 4 --no-lm --tag warps --plans \
    '{"routed": {}, "w8": {"dec_warps": 8}, "w8_s8": {"dec_warps": 8, "dec_splits": 8}, "w2_s33": {"dec_warps": 2, "dec_splits": 33}, "routed_b": {}, "w8_b": {"dec_warps": 8}}'
  step quant_ncu 150 ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SourceCounters --section MemoryWorkloadAnalysis -k regex:attention_quant_decode -c 4 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 --plans '{"routed": {}, "w8": {"dec_warps": 8}}'
elif [ "$PART" = f ]; then
  # Issue 14's forward beside cuDNN under Nsight (session 13 ran these
  # commands inline at the end of its card time; docs/cuda.md has the answer:
  # the SMs are busy as long as cuDNN's, ours waits longer between issues, in
  # the softmax's chains). Rerun after a forward change: D 128 at 4K and 16K,
  # D 64 causal at 4K (the worst row), SM active cycles against elapsed,
  # issue rate, stall reasons, tensor pipe use; then per-SASS stall samples
  # of ours at 4K and of the routed quantized decode (issue 16), summarised
  # by tools/ncu_sass_summary.py.
  ncu_fwd() {  # NAME REGEX ARGS...
    local name=$1 regex=$2
    shift 2
    step "ncu_$name" 100 ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section SchedulerStats -k "regex:$regex" -c 1 python3 tools/cuda_probe.py "$@"
  }
  ncu_fwd ws_4k_d128 attention_fwd_ws 2 16 16 4096 4096 128 0 float16
  PROBE_MXFAST=1 ncu_fwd cudnn_4k_d128 "[Ss]dpa|[Ff]mha|[Ff]lash|[Aa]ttn|cudnn" 2 16 16 4096 4096 128 0 float16
  ncu_fwd ws_16k_d128 attention_fwd_ws 1 16 16 16384 16384 128 0 float16
  PROBE_MXFAST=1 ncu_fwd cudnn_16k_d128 "[Ss]dpa|[Ff]mha|[Ff]lash|[Aa]ttn|cudnn" 1 16 16 16384 16384 128 0 float16
  ncu_fwd ws_4k_d64_causal attention_fwd_ws 2 16 16 4096 4096 64 1 float16
  PROBE_MXFAST=1 ncu_fwd cudnn_4k_d64_causal "[Ss]dpa|[Ff]mha|[Ff]lash|[Aa]ttn|cudnn" 2 16 16 4096 4096 64 1 float16
  grep -H -E "^  [a-z_]|Duration|Elapsed Cycles|SM Active Cycles|Issued Warp Per Scheduler|No Eligible|Warp Cycles Per Issued|Achieved Active Warps|Registers Per|Grid Size|Block Size|Tensor \(FP\)|Waves Per SM" \
    "$OUT"/ncu_*.txt > "$OUT/ncu_fwd_summary.txt"
  page() {  # NAME REGEX CMD...: Nsight's per-SASS source page as CSV, then its summary
    local name=$1 regex=$2
    shift 2
    step "sass_$name" 60 ncu --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
      -k "regex:$regex" -c 1 "$@"
    mv "$OUT/sass_$name.txt" "$OUT/sass_$name.csv"
    python3 tools/ncu_sass_summary.py "$OUT/sass_$name.csv" > "$OUT/sass_$name.summary.txt"
  }
  page ws_4k_d128 attention_fwd_ws python3 tools/cuda_probe.py 2 16 16 4096 4096 128 0 float16
  page quant_decode attention_quant_decode python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 \
    --plans '{"routed": {}}'
elif [ "$PART" = g ]; then
  # Session 14's queue, reordered in session 15 (starts keep failing: the
  # measurement that decides the decode defaults goes first).
  # The C++ replay's short graph (untraced calls without the custom
  # function's nodes): its GPU tests (bit-identical to the full graph and the
  # Python path; traced calls keep the nodes).
  step host_replay 110 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda_host.py -k "gpu or short or traced"
  # The decode step with its calls chained (each layer's query the last
  # one's output, as in a model: one kernel at a time, none overlapping),
  # routed and wider quantized-decode plans (more blocks / warps in flight;
  # 137 registers a thread: 3 blocks of 4 warps an SM, 7 of 2 warps, so s49
  # is one full wave of 4-warp blocks, s99 two, w2_s115 one of 2-warp blocks;
  # plans that differ only in splits share one compiled kernel), our fp16
  # decode's plans and mx.fast beside them.
  step quant_chain 330 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 4 --no-lm \
    --fp16-plans '{"routed": {}, "waves100": {"waves": 100}, "splits64": {"splits": 64}, "splits128": {"splits": 128}}' \
    --tag chain --plans '{"routed": {}, "s33": {"dec_splits": 33}, "s49": {"dec_splits": 49},
    "s66": {"dec_splits": 66}, "s99": {"dec_splits": 99}, "s132": {"dec_splits": 132},
    "w8": {"dec_warps": 8}, "w2_s99": {"dec_warps": 2, "dec_splits": 99}, "w2_s115": {"dec_warps": 2, "dec_splits": 115},
    "pf_s49": {"dec_prefetch": true, "dec_splits": 49}}'
elif [ "$PART" = h ]; then
  # After g on the same warm machine (that call's environment:
  # . tools/device_env.sh). Both forms of the replay beside mx.fast in
  # interleaved rounds: the 32-layer decode step (fp16 and 4-bit,
  # independent and chained) and the host-bound (4,16,1024,64) prefill.
  step short_graph_ab 200 python3 tools/cuda_short_graph_ab.py "$OUT/short_graph_ab.json" --rounds 9
  # Issue 14: the persistent D 128 forward's clock trace (first item's setup,
  # Q wait, loop and epilogue; each block's span and items), 4K and 16K:
  # whether a fixed cost per item explains the 4K rows' larger gap to cuDNN.
  step fwd_trace 120 python3 tools/cuda_wgmma_check.py "$OUT" \
    trace:2:16:4096:128:0:f16:1,trace:1:16:16384:128:0:f16:1,trace:2:16:4096:128:1:f16:1
elif [ "$PART" = i ]; then
  # Session 15, after g and h: the quantized decode's new default (one wave
  # of 3 blocks an SM, 49 splits at GQA 32:8) checked and re-timed chained at
  # 4 and 8 bits beside the old (pb1) and pb2; the fixed short-graph test
  # (gradients compared up to the atomics' sum order); the quantized op's GPU
  # tests at the new plan; Nsight on one call of the old and new plans; the
  # CUDA bench's decode rows (chained columns).
  step host_replay 80 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda_host.py -k "gpu or short or traced"
  step quant_chain_bits 120 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 4,8 --no-lm \
    --tag chain_bits --plans '{"routed": {}, "pb1": {"dec_blocks_per_sm": 1}, "pb2": {"dec_blocks_per_sm": 2}, "routed_b": {}}'
  step quant_gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_attention_quantized.py -k cuda
  step quant_ncu 100 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats -k regex:attention_quant_decode -c 4 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 --plans '{"routed": {}, "pb1": {"dec_blocks_per_sm": 1}}'
  step bench_decode 100 python3 -m mlx_flash.bench.cuda --sections decode --out "$OUT/bench_decode.json"
elif [ "$PART" = j ]; then
  # Session 15, after i: the quantized op's GPU tests with the memory test's
  # warm-up call (the ticket pool's one-time 4 MiB), then what a chained
  # step costs besides its kernels: tools/cuda_chain_floor.py plain, then
  # under Nsight Systems (its kernel summary: each kernel's GPU time).
  step quant_gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_attention_quantized.py -k cuda
  step chain_floor 120 python3 tools/cuda_chain_floor.py "$OUT/chain_floor.json"
  NSYS=$(command -v nsys || ls /opt/nvidia/nsight-systems*/bin/nsys /usr/local/cuda*/bin/nsys 2>/dev/null | head -1)
  if [ -n "$NSYS" ]; then
    step chain_nsys 150 "$NSYS" profile -o /tmp/chain --force-overwrite true --stats=true \
      python3 tools/cuda_chain_floor.py /tmp/chain_floor_nsys.json --rounds 3
  else
    echo "no nsys" > "$OUT/chain_nsys.txt"
  fi
elif [ "$PART" = k ]; then
  # Session 15, after j: our fp16 decode's plans chained at GQA 32:4 (where
  # the bench's chained step gave 0.88-0.91x mx.fast on the H200) and 32:8,
  # and the quantized decode's new default at 32:4 (99 splits) beside 1 and
  # 2 blocks an SM.
  for hkv in 4 8; do
    step "fp16_chain_hkv$hkv" 150 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 4 --no-lm \
      --hkv $hkv --tag "chain_hkv$hkv" --plans '{"routed": {}, "pb1": {"dec_blocks_per_sm": 1}, "pb2": {"dec_blocks_per_sm": 2}}' \
      --fp16-plans '{"routed": {}, "waves25": {"waves": 25}, "waves100": {"waves": 100}, "waves200": {"waves": 200},
      "splits8": {"splits": 8}, "splits16": {"splits": 16}, "splits24": {"splits": 24}, "routed_b": {}}'
  done
elif [ "$PART" = l ]; then
  # Session 15: the quantized decode's stall reasons (cycles a warp waits
  # per issued instruction, by reason) at the default 49 splits, with the
  # prefetch (the next tile's loads a tile earlier) beside it, real clocks.
  step quant_stalls 150 ncu --clock-control none --section WarpStateStats --section SourceCounters \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    -k regex:attention_quant_decode -c 4 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 --plans '{"routed": {}, "pf": {"dec_prefetch": true}}'
elif [ "$PART" = m ]; then
  # Session 16: the opt-in register-path variants CHAINED at the routed 49
  # splits (sessions 10-13 timed them only on the concurrent step, at 16
  # splits): the prefetch with LATE scales (the prefetch alone converts its
  # scales as they load, so it waits on DRAM at once), L2 prefetch 2/4/8
  # tiles ahead, KEYS_M 2; then the stall reasons of routed vs two of them.
  step quant_chain_variants 240 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 4 --no-lm \
    --tag chain_variants --plans '{"routed": {}, "pf_late": {"dec_prefetch": true, "dec_late_scales": true},
    "l2pf2": {"dec_l2pf": 2}, "l2pf4": {"dec_l2pf": 4}, "l2pf8": {"dec_l2pf": 8}, "keys_m2": {"dec_keys_m": 2},
    "keys_m2_l2pf4": {"dec_keys_m": 2, "dec_l2pf": 4}, "late": {"dec_late_scales": true}, "routed_b": {},
    "pf_late_b": {"dec_prefetch": true, "dec_late_scales": true}, "l2pf4_b": {"dec_l2pf": 4}}'
  step quant_chain_variants8 120 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 8 --no-lm \
    --tag chain_variants8 --plans '{"routed": {}, "pf_late": {"dec_prefetch": true, "dec_late_scales": true},
    "l2pf4": {"dec_l2pf": 4}, "routed_b": {}}'
  step quant_stalls 150 ncu --clock-control none --section WarpStateStats --section SchedulerStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    -k regex:attention_quant_decode -c 6 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 \
    --plans '{"routed": {}, "pf_late": {"dec_prefetch": true, "dec_late_scales": true}, "l2pf4": {"dec_l2pf": 4}}'
elif [ "$PART" = n ]; then
  # Session 16, after m and tools/cuda_quant_load_probe.py (one tile of
  # loads in flight a warp alone costs 55 us a chained call, two 24): the
  # ring (cp.async slots a warp, RING - 1 tiles ahead) checked on the GPU,
  # then timed chained beside the routed plan and mx.fast.
  step ring_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_quant_emu.py \
    -k "(decode_shapes_gpu or decode_features_gpu or (decode_long_context_gpu and (ring or default)))"
  step ring_chain 200 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 4 --no-lm \
    --tag chain_ring --plans '{"routed": {}, "ring2": {"dec_ring": 2}, "ring3": {"dec_ring": 3},
    "ring4": {"dec_ring": 4}, "ring3_fold": {"dec_ring": 3, "dec_fold": true}, "routed_b": {},
    "ring3_b": {"dec_ring": 3}, "ring4_b": {"dec_ring": 4}}'
  step ring_chain8 100 python3 tools/cuda_decode_profile.py "$OUT/quant" --step --chain --bits 8 --no-lm \
    --tag chain_ring8 --plans '{"routed": {}, "ring3": {"dec_ring": 3}, "ring3_pb2": {"dec_ring": 3, "dec_blocks_per_sm": 2}, "routed_b": {}}'
elif [ "$PART" = o ]; then
  # Session 16, after n (whose plan-after-plan timings drifted: the routed
  # plan 63 then 94 us a call in one run): the ring against the routed plan
  # INTERLEAVED (every round runs each plan once), then each plan's kernel
  # alone under Nsight Compute (GPU time, load waits, instructions).
  step ring_ab 200 python3 tools/cuda_quant_load_probe.py "$OUT/ring_ab.json" --rounds 15 --ab \
    '{"routed": {}, "ring2": {"dec_ring": 2}, "ring3": {"dec_ring": 3}, "ring4": {"dec_ring": 4},
    "pf_late": {"dec_prefetch": true, "dec_late_scales": true}}'
  step ring_ncu 150 ncu --clock-control none --metrics \
    gpu__time_duration.sum,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__inst_executed.sum,smsp__warps_issue_stalled_barrier_per_warp_active.pct \
    -k regex:attention_quant_decode -c 8 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 \
    --plans '{"routed": {}, "ring2": {"dec_ring": 2}, "ring3": {"dec_ring": 3}, "ring4": {"dec_ring": 4}}'
elif [ "$PART" = p ]; then
  # Session 16, after the small-pool fix (const_array: every constant array
  # over 8 bytes, in device memory): the quantized decode's kernel alone
  # (routed, the ring) and chained, interleaved; then the CUDA bench's decode
  # and forward rows and the fp8-weight decode beside their anchors.
  step fix_ncu 150 ncu --clock-control none --metrics gpu__time_duration.sum,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio \
    -k regex:attention_quant_decode -c 8 \
    python3 tools/cuda_decode_profile.py "$OUT/quant" --kernels-step --bits 4 \
    --plans '{"routed": {}, "ring2": {"dec_ring": 2}, "ring3": {"dec_ring": 3}, "ring4": {"dec_ring": 4}}'
  step fix_ab4 150 python3 tools/cuda_quant_load_probe.py "$OUT/fix_ab4.json" --rounds 15 --ab \
    '{"routed": {}, "ring2": {"dec_ring": 2}, "ring3": {"dec_ring": 3}, "ring4": {"dec_ring": 4}}'
  step fix_ab8 100 python3 tools/cuda_quant_load_probe.py "$OUT/fix_ab8.json" --rounds 15 --bits 8 --ab \
    '{"routed": {}, "ring3": {"dec_ring": 3}}'
  step bench_decode 120 python3 -m mlx_flash.bench.cuda --sections decode --out "$OUT/bench_decode.json"
  step bench_fwd 150 python3 -m mlx_flash.bench.cuda --sections fwd --out "$OUT/bench_fwd.json"
elif [ "$PART" = q ]; then
  # Session 16, after the small-pool fix: the loop now sets the time (load
  # waits 0.3-1.5 cycles an instruction): the opt-in variants that issue fewer
  # instructions (FOLD, KEYS_M 1/2) and those that overlap more (LATE, the
  # prefetch, TILES 2), kernel alone at Nk 512 (fixed cost) and 32768, then
  # chained and interleaved.
  PLANS='{"routed": {}, "fold": {"dec_fold": true}, "keys_m1": {"dec_keys_m": 1}, "keys_m2": {"dec_keys_m": 2},
    "fold_keys_m1": {"dec_fold": true, "dec_keys_m": 1}, "late": {"dec_late_scales": true},
    "pf_late": {"dec_prefetch": true, "dec_late_scales": true}, "tiles2": {"dec_tiles": 2}}'
  step variants_ncu 200 ncu --clock-control none --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
    -k regex:attention_quant_decode python3 tools/cuda_quant_nk_sweep.py 512,32768 --plans "$PLANS"
  step variants_ab 200 python3 tools/cuda_quant_load_probe.py "$OUT/variants_ab.json" --rounds 15 --ab "$PLANS"
elif [ "$PART" = r ]; then
  # Session 16, after the last block's merge took its (m, l) in one round trip
  # (rows in pairs, lanes over splits), 25 partial loads in flight, and the
  # splits from the grid: kernel alone at Nk 512 / 32768 (routed, KEYS_M 1/2),
  # chained and interleaved, then the decode's GPU tests and the replay's.
  PLANS='{"routed": {}, "keys_m1": {"dec_keys_m": 1}, "keys_m2": {"dec_keys_m": 2}}'
  step merge_ncu 100 ncu --clock-control none --metrics gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_active.max \
    -k regex:attention_quant_decode python3 tools/cuda_quant_nk_sweep.py 512,32768 --plans "$PLANS"
  step merge_ab 120 python3 tools/cuda_quant_load_probe.py "$OUT/merge_ab.json" --rounds 15 --ab "$PLANS"
  step merge_ab8 100 python3 tools/cuda_quant_load_probe.py "$OUT/merge_ab8.json" --rounds 15 --bits 8 --ab "$PLANS"
  step decode_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_quant_emu.py \
    tests/test_cuda_host.py -k "(decode and gpu) or test_cuda_host"
elif [ "$PART" = s ]; then
  # Session 16 (queued: its device time ran out): per-tensor fp8 scales out
  # of MLX's host-resident small pool (cuda.out_of_small_pool), chained decode
  # products before / after, then matmul2d's and FP8Linear's GPU tests.
  step small_scale_ab 100 python3 tools/cuda_small_scale_ab.py "$OUT/small_scale_ab.json" --rounds 15
  step matmul_gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_cuda_const_arrays.py -k "cuda or gpu or const or small"
elif [ "$PART" = t ]; then
  # Session 16 (queued): Q's fragments in shared memory at D 128 (TUNING
  # dec_q_shared, template QSF: 108 registers under NVRTC, four blocks an SM,
  # 66 splits at GQA 32:8) -- GPU tests, then the kernel alone (Nk 512 /
  # 32768) and chained, interleaved, beside the routed plan, KEYS_M 2 and FOLD.
  step qs_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_quant_emu.py \
    -k "(decode_shapes_gpu or decode_features_gpu or (decode_long_context_gpu and (q_shared or default)))"
  PLANS='{"routed": {}, "q_shared": {"dec_q_shared": true}, "q_shared_km2": {"dec_q_shared": true, "dec_keys_m": 2},
    "q_shared_fold": {"dec_q_shared": true, "dec_fold": true}, "keys_m2": {"dec_keys_m": 2},
    "q_shared_pb3": {"dec_q_shared": true, "dec_blocks_per_sm": 3}}'
  step qs_ncu 150 ncu --clock-control none --metrics gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
    -k regex:attention_quant_decode python3 tools/cuda_quant_nk_sweep.py 512,32768 --plans "$PLANS"
  step qs_ab 150 python3 tools/cuda_quant_load_probe.py "$OUT/qs_ab.json" --rounds 15 --ab "$PLANS"
  step qs_ab8 100 python3 tools/cuda_quant_load_probe.py "$OUT/qs_ab8.json" --rounds 15 --bits 8 --ab \
    '{"routed": {}, "q_shared": {"dec_q_shared": true}}'
elif [ "$PART" = u ]; then
  # Session 17: the few-rows product reads a per-tensor scale once, at its
  # start (matmul_gemv.cuh gemv_load_scale): the scale left in MLX's small
  # pool ("per_tensor_in_pool") against the padded copy and per-channel; then
  # the decode's acquire-release ticket (TUNING dec_release, template REL):
  # GPU tests, kernel alone, chained 4- and 8-bit beside routed. (A record:
  # that kernel read was never committed, and REL was removed in c092ea9, so
  # its plans now raise.)
  step small_scale_ab 100 python3 tools/cuda_small_scale_ab.py "$OUT/small_scale_ab.json" --rounds 15
  step matmul_gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_cuda_const_arrays.py -k "cuda or gpu or const or small"
  step rel_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_cuda_quant_emu.py \
    -k "decode_shapes_gpu or decode_features_gpu or (decode_long_context_gpu and (release or default))"
  PLANS='{"routed": {}, "release": {"dec_release": true}, "release_km2": {"dec_release": true, "dec_keys_m": 2}}'
  step rel_ncu 120 ncu --clock-control none --metrics gpu__time_duration.sum \
    -k regex:attention_quant_decode python3 tools/cuda_quant_nk_sweep.py 512,32768 --plans "$PLANS"
  step rel_ab 150 python3 tools/cuda_quant_load_probe.py "$OUT/rel_ab.json" --rounds 21 --ab "$PLANS"
  step rel_ab8 100 python3 tools/cuda_quant_load_probe.py "$OUT/rel_ab8.json" --rounds 15 --bits 8 --ab \
    '{"routed": {}, "release": {"dec_release": true}}'
elif [ "$PART" = v ]; then
  # Session 17 (issue 14): the forward and forward+backward bench on one card, ours beside mx.fast and torch.
  step bench_fwd 560 python3 -m mlx_flash.bench.cuda --sections fwd,fwdbwd --out "$OUT/cuda_fwd_fwdbwd.json"
elif [ "$PART" = w ]; then
  # Session 17: the few-rows kernel reading a per-tensor scale with one thread
  # a block (cf52303): GPU tests; chained products beside the package before
  # it (f12c875, carried as .device/s17old), run old / new / old / new; then
  # the decode's splits after session 16's fix (session 15 chose 49 while every
  # block still read its constants over PCIe), interleaved, 4-bit. (A record:
  # be439ff reverted cf52303, so "new" is the old code again.)
  step matmul_gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_matmul_cuda_routes.py -k "cuda or gpu or small"
  for r in 1 2; do
    step small_scale_old$r 100 env PYTHONPATH="$PWD/.device/s17old:$PYTHONPATH" python3 tools/cuda_small_scale_ab.py \
      "$OUT/small_scale_old$r.json" --rounds 11
    step small_scale_new$r 100 python3 tools/cuda_small_scale_ab.py "$OUT/small_scale_new$r.json" --rounds 11
  done
  step splits_ab 200 python3 tools/cuda_quant_load_probe.py "$OUT/splits_ab.json" --rounds 21 --ab \
    '{"routed": {}, "s33": {"dec_splits": 33}, "s40": {"dec_splits": 40}, "s57": {"dec_splits": 57},
      "s66": {"dec_splits": 66}, "s82": {"dec_splits": 82}}'
elif [ "$PART" = x ]; then
  # Session 17: the decode's partials and merge over the block's real rows only
  # (4 of 8 at GQA 32:8): GPU tests, the kernel alone, chained 4- and 8-bit;
  # then the chained step's GPU timeline (CUPTI through torch.profiler): gaps
  # between kernels against the kernels' own time, ours and mx.fast.
  step dec_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_cuda_quant_emu.py \
    -k "decode_shapes_gpu or decode_features_gpu or decode_keys_m_gpu or (decode_long_context_gpu and default)"
  step dec_ncu 90 ncu --clock-control none --metrics gpu__time_duration.sum \
    -k regex:attention_quant_decode python3 tools/cuda_quant_nk_sweep.py 512,32768 --plans '{"routed": {}}'
  step dec_ab 120 python3 tools/cuda_quant_load_probe.py "$OUT/dec_ab.json" --rounds 21 --ab \
    '{"routed": {}, "keys_m2": {"dec_keys_m": 2}}'
  step dec_ab8 90 python3 tools/cuda_quant_load_probe.py "$OUT/dec_ab8.json" --rounds 15 --bits 8 --ab '{"routed": {}}'
  step timeline 150 python3 tools/cuda_chain_timeline.py "$OUT/timeline.json"
elif [ "$PART" = y ]; then
  # Session 17 (issue 16): the decode inside a model-like step (projections, and an MLP), 4- and 8-bit,
  # against mx.fast over the fp16 cache; the attention's cost = a chain less its projections-only chain.
  step in_model4 200 python3 tools/cuda_decode_in_model.py "$OUT/in_model4.json" --rounds 21
  step in_model8 200 python3 tools/cuda_decode_in_model.py "$OUT/in_model8.json" --rounds 15 --bits 8
elif [ "$PART" = z ]; then
  # Session 17 (issue 16): the quantized-cache bench on the card (ours, mx.fast over fp16, mlx-lm's quantized
  # path, side by side), then the model-like step again (a second run of part y's 4-bit case). mlx-lm's
  # rows need mlx_lm importable: session 17 carried its models/base.py alone as .device/mlxlm_shim.
  step qkv_bench 330 python3 -m mlx_flash.bench.quantized_kv --device gpu --out "$OUT/quantized_kv_gpu.json"
  step in_model4b 150 python3 tools/cuda_decode_in_model.py "$OUT/in_model4b.json" --rounds 31
elif [ "$PART" = s18a ]; then
  # Session 18 (issue 15): the targets' products through the public matmul2d beside MLX's matmul and
  # torch._scaled_mm, timed in turn with the queue full and under CUPTI (bench section "targets"); then
  # FP8Linear generation tokens/s in mlx-lm Llamas of 1B and 8B shape (carry .device/mlxlm_full too).
  step targets 330 python3 -m mlx_flash.bench.cuda_matmul --sections targets --sizes 4096 8192 \
    --out "$OUT/matmul_targets.json"
  step llama 200 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama --llama-models llama_1b,llama_8b --out "$OUT/matmul_llama.json"
elif [ "$PART" = s18b ]; then
  # Session 18 (issue 15): the whole matmul suite on the card, first half: every CUDA case of the
  # public-API tests, FP8Linear, the fp8 formats and bound, LoRA over fp8 layers (mlx-lm), the
  # matmul's constant arrays, and the few-rows (gemv) routes. -v: a cut-short log still lists each result.
  step matmul_suite_1a 250 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m pytest -v \
    -p no:cacheprovider -n 14 tests/test_fp8_nn.py tests/test_fp8.py tests/test_fp8_wgmma_bound.py \
    tests/test_mlx_lm_lora_fp8.py tests/test_cuda_const_arrays.py
  step matmul_suite_1b 120 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul.py -k cuda
  step matmul_suite_1c 200 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k gemv
elif [ "$PART" = s18c ]; then
  # Session 18 (issue 15): the second half, every Hopper (wgmma) case of the route suite.
  step matmul_suite_2 570 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "not gemv"
elif [ "$PART" = s18d ]; then
  # Session 18 (issue 15): native fp8 on 128 x 192 tiles by default (part s18a timed it faster). First the
  # route suite's fp8 cases that run the default plan (or the new plan by name), then the targets again,
  # each call's GPU time now measured alone, then the API's GPU cases. Ordered by what matters most, for a
  # call cut short (s18b and s18c ran the whole suite on the old default). Not run in session 18 (no card
  # could be started again): the next card session's first part.
  step routes 120 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py \
    -k "(fp8 or fast) and not bn128 and not bn256 and not pr2 and not pr4 and not pr-1 and not pr-2 and not acc2"
  step targets 150 python3 -m mlx_flash.bench.cuda_matmul --sections targets --sizes 4096 8192 \
    --out "$OUT/matmul_targets.json"
  step api_gpu 60 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py -k cuda
elif [ "$PART" = s19a ]; then
  # Session 19 (issue 15): FP8Linear's prefill with the fp8 weight decoded inside the warp-specialised kernel
  # (RAW slots, cuda_matmul.CVT_RAW_SLOTS, the new default). Its GPU cases first (bit-equal to the decode pass,
  # float64 of every code), then the native default's odd-shape cases that session 18 could not run (s18d's
  # first step); s19b the prefill shapes and the targets, s19c the API's GPU cases and the Hopper route suite.
  step raw_routes 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py \
    -k "decoded_in_kernel or exact_fp8_decoded_first or ws_batched"
  step native_default_routes 120 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py \
    -k "(fp8 or fast) and not bn128 and not bn256 and not pr2 and not pr4 and not pr-1 and not pr-2 and not acc2 and not decoded"
elif [ "$PART" = s19b ]; then
  # Session 19: the timings (each case against its anchor in the same process).
  s19_timings
elif [ "$PART" = s19d ]; then
  # Session 19, after s19b timed the first in-kernel decode slower than the decode pass at large M (three
  # decoding warps paced by the stage ring): the whole producer warpgroup decodes, codes loaded RAW stages
  # ahead; fp8 weights at fewer than 512 rows take it too. Its GPU cases (with the default routes' float64
  # cases and the API's), then the prefill shapes (with plans and slots side by side) and the targets.
  s19_gpu_cases
  s19_timings
elif [ "$PART" = s19e ]; then
  # Session 19, after s19d timed the merged producer-decoder slower still: s19a's kernel again (three decoding
  # warps), taken below 1024 rows (CVT_RAW_MAX_ROWS), the decode pass from there. The same steps as s19d.
  # Not run in session 19 (no card could be started again): the next card session's first part.
  s19_gpu_cases
  s19_timings
elif [ "$PART" = s19f ]; then
  # Session 19, the device time left after s19d: s19e's GPU cases only (no timings).
  s19_gpu_cases
elif [ "$PART" = s20a ]; then
  # Session 20: the weight-as-A kernel (matmul_wgmma_wa.cuh, route wgmma_wa)'s GPU cases, then s19f's (the
  # routing of session 19, never run on a card) and the API's GPU cases.
  step wa_routes 200 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  s19_gpu_cases
elif [ "$PART" = s20b ]; then
  # Session 20: the prefill shapes with the weight-as-A kernel beside the routes and MLX's fp16 (one process).
  step prefill 420 python3 -m mlx_flash.bench.cuda_matmul --sections prefill --out "$OUT/matmul_prefill.json"
elif [ "$PART" = s20c ]; then
  # Session 20: the targets (4096^3, 8192^3), then Nsight on the weight-as-A kernel at 512 and 2048 rows.
  step targets 200 python3 -m mlx_flash.bench.cuda_matmul --sections targets --sizes 4096 8192 \
    --out "$OUT/matmul_targets.json"
  python3 tools/cuda_matmul_wa_profile.py 512 4096 4096 2048 4096 4096 > /dev/null 2>&1  # compiled first
  step ncu_wa 240 ncu -k regex:matmul_wgmma_w -c 4 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section SchedulerStats python3 tools/cuda_matmul_wa_profile.py 512 4096 4096 2048 4096 4096
elif [ "$PART" = s20d ]; then
  # Session 20, the weight-as-A kernel routed by default (17 to 4096 rows; BT 256 from 256 rows) and its
  # DEPTH 4 plans: its GPU cases, the API's and FP8Linear's, the Hopper route suite, then the prefill shapes
  # (128 to 4096 rows, the plans side by side) and the targets.
  step wa_routes 120 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  step api_gpu 90 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py -k cuda
  step wgmma_all 200 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "not gemv"
  s19_timings
elif [ "$PART" = s20e ]; then
  # Session 20, after s20d: the weight-as-A kernel without DEPTH 4 (the kernel text of s20a again), routed by
  # default: its GPU cases, the API's and FP8Linear's, then the prefill shapes (the routed call now timed last
  # in a round) and the targets.
  step wa_routes 120 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  step api_gpu 90 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py -k cuda
  s19_timings
elif [ "$PART" = s21a ]; then
  # Session 21: stream-K on the weight-as-A kernel (opt-in; since session 22 its own kernel text,
  # matmul_wgmma_wa_sk.cuh, the default route keeping the text s20e ran): its GPU cases (stream-K forced on
  # and off, the same bits twice, off = the default kernel's bits, the tickets back at 0), the API's and
  # FP8Linear's.
  step wa_routes 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  step api_gpu 90 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py -k cuda
elif [ "$PART" = s21b ]; then
  # Session 21: the prefill shapes with stream-K on (the switch set: "ours_wa"), the default kernel
  # ("ours_wa_whole") and the stream-K form with every tile whole ("_sk0"), each also timed alone on the
  # GPU (CUPTI); rows are printed as they come, so a cut run keeps what finished.
  step prefill 420 env MLX_FLASH_CUDA_FP8W_WA_SK=1 python3 -m mlx_flash.bench.cuda_matmul --sections prefill \
    --prefill-rows 128,512,1024,2048,4096 --out "$OUT/matmul_prefill.json"
elif [ "$PART" = s22b ]; then
  # Session 22: s21b cut to what a short slot allows: the prefill shapes at 512 and 1024 rows (the partial
  # waves stream-K is for) with the switch on, beside the default kernel, each also timed alone on the GPU.
  step prefill 240 env MLX_FLASH_CUDA_FP8W_WA_SK=1 python3 -m mlx_flash.bench.cuda_matmul --sections prefill \
    --prefill-rows 512,1024 --out "$OUT/matmul_prefill.json"
elif [ "$PART" = s22c ]; then
  # Session 22 (issue 14, backward): is the warp-specialised backward with its dQ writer (opt-in since
  # session 8, one 5 % timing at 8K dense) faster than the default everywhere it serves? Its GPU cases,
  # then the backward alone (fwd+bwd - fwd) of the default, the ws + dQ writer and the early dV beside
  # mx.fast and torch, alternated per repetition, over a fresh kernel cache warmed in parallel.
  step bwd_ws_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda_specific.py \
    -k "hopper_backward_ws_on_gpu or hopper_backward_ws_long_keys_on_gpu"
  bwd_routes_timed new,wsdq,dvearly
elif [ "$PART" = s22d ]; then
  # Session 22 (issue 14, backward): where the default backward (attention_bwd_wgmma) loses to cuDNN's
  # at (1,16,8192,128) fp16 dense, under Nsight's locked clocks: every kernel of one fwd+bwd call after
  # warm-ups (ours: delta, backward, dQ conversion; cuDNN's), then ours per SASS instruction.
  nsight() {  # NAME WHICH REGEX
    step "ncu_bwd_$1" 150 ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section MemoryWorkloadAnalysis \
      -k "regex:$3" python3 tools/cuda_bwd_ab.py one float16 1,16,8192,128 0 "$2"
  }
  nsight ours new "mlx_flash"
  nsight cudnn fast "[Ss]dpa|[Ff]mha|[Ff]lash|[Bb]prop|cudnn|[Dd]ot"
  step sass_bwd 150 ncu --profile-from-start off --section SourceCounters --section WarpStateStats --page source \
    --print-source sass --csv -k "regex:attention_bwd_wgmma" -c 1 python3 tools/cuda_bwd_ab.py one float16 1,16,8192,128 0 new
  mv "$OUT/sass_bwd.txt" "$OUT/sass_bwd.csv"
  python3 tools/ncu_sass_summary.py "$OUT/sass_bwd.csv" > "$OUT/sass_bwd.summary.txt" 2>&1
elif [ "$PART" = s23a ]; then
  # Session 23 (one short slot): stream-K's own GPU cases (forced on, off = the default kernel's bits,
  # all shared; float64, the same bits twice, the tickets back at 0), then the prefill shapes at 512 and
  # 1024 rows with the switch on beside the default kernel, each also timed alone on the GPU.
  step sk_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py \
    -k "wgmma_wa_stream_k"
  step prefill 240 env MLX_FLASH_CUDA_FP8W_WA_SK=1 python3 -m mlx_flash.bench.cuda_matmul --sections prefill \
    --prefill-rows 512,1024 --out "$OUT/matmul_prefill.json"
elif [ "$PART" = s23b ]; then
  # Session 23 (issue 14, backward): the float4 dQ atomics (MLX_FLASH_BWD_DQ_V4=1, after
  # Nsight showed the float2 atomics holding the consumers) and the ws backward's dQ writer: their GPU cases,
  # then the backward alone of the default, dqv4, wsdq and the early dV beside mx.fast and torch,
  # alternated per repetition, over a fresh kernel cache warmed in parallel.
  bwd_dq_gpu_cases
  bwd_routes_timed new,dqv4,wsdq,dvearly
elif [ "$PART" = s24a ]; then
  # Session 24 (issue 15): stream-K's GPU cases again (the forced plan that gave NaN in s23a, fixed since:
  # a forced count launches no more blocks than shared k-steps), then the prefill in a model: prompt
  # tokens/s of Llama-8B and -3B shapes, fp16 beside FP8Linear with stream-K off and on, timed in turn
  # (carry .device/mlxlm_full too).
  stream_k_gpu_cases 150 "wgmma_wa_stream_k"
  llama_prefill_timed 240 "" matmul_llama_prefill
elif [ "$PART" = s24b ]; then
  # Session 24 (issue 14, backward): s23b's timing half alone (a call holds install + this within its
  # 600 s): the backward alone of the default, dqv4, wsdq and the early dV beside mx.fast and torch.
  bwd_routes_timed new,dqv4,wsdq,dvearly
elif [ "$PART" = s24c ]; then
  # Session 24 (issue 14, backward): s23b's GPU cases half: the float4 dQ atomics and the ws backward.
  bwd_dq_gpu_cases
elif [ "$PART" = s24e ]; then
  # Session 24 (issue 15), the last of its device time, beside the install in ~250 s: below half a wave
  # each tile split between up to WA_SK_SPLITS blocks (s24a's products at the models' shapes: 512 x 4096 x
  # 1024 ran 0.23x MLX's fp16 by GPU time, 16 tiles on 132 SMs). The stream-K GPU cases with 8 splits,
  # then the model prefill with 2, 4 and 8 splits, the from-one-wave sharing off.
  stream_k_gpu_cases 60 "wgmma_wa_stream_k and splits8"
  llama_prefill_timed 150 "s2:2:0,s4:4:0,s8:8:0" matmul_llama_prefill_splits
elif [ "$PART" = s25a ]; then
  # Session 25 (issue 15): where a prefill's GPU time goes, kernel by kernel (CUPTI), fp16 beside FP8Linear
  # (stream-K as set), Llama-8B and -3B shapes at 512 and 2048 tokens (carry .device/mlxlm_full too).
  step llama_profile 200 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill_profile --llama-models llama_8b,llama_3b --llama-prompts 512,2048 \
    --out "$OUT/matmul_llama_prefill_profile.json"
elif [ "$PART" = s25b ]; then
  # Session 25 (issue 15): FP8Linear with quantized activations (activations="e4m3": the row-wise quantize
  # kernel, then fp8 x fp8 on native wgmma): its GPU cases and FP8Linear's, then the model prefill with it
  # beside fp16 and the default FP8Linear, then the profile of the same forwards.
  step act_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
  llama_prefill_timed 240 "" matmul_llama_prefill_act
elif [ "$PART" = s25d ]; then
  # Session 25 (issue 15): s25b again after s25c's profile (the quantize kernel now loads 16 bytes at a time),
  # then the profile of the 8B forwards at 2048 tokens.
  step act_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
  llama_prefill_timed 240 "" matmul_llama_prefill_act2
  step llama_profile 120 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill_profile --llama-models llama_8b --llama-prompts 2048 \
    --out "$OUT/matmul_llama_prefill_profile_act2.json"
elif [ "$PART" = s25e ]; then
  # Session 25 (issue 15): s25d again with the quantize kernel on the hardware's paired fp8 conversion (a
  # multiply by max_finite / amax instead of a division a value).
  step act_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
  llama_prefill_timed 240 "" matmul_llama_prefill_act3
  step llama_profile 150 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill_profile --llama-models llama_8b,llama_3b --llama-prompts 512,2048 \
    --out "$OUT/matmul_llama_prefill_profile_act3.json"
elif [ "$PART" = s25f ]; then
  # Session 25 (issue 15): the matmul suite's GPU cases on the card with the defaults as they are now (stream-K
  # below half a wave since session 24; s18b/s18c ran the whole suite on session 18's defaults): the
  # Hopper routes (every case but the few-rows ones, then those), the public API's CUDA cases, FP8Linear's and
  # the quantized activations'. -v: a cut-short log still lists each result.
  step routes_wgmma 230 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "not gemv"
  step routes_gemv 120 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k gemv
  step api_gpu 120 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_fp8_activations.py -k cuda
elif [ "$PART" = s25g ]; then
  # Session 25 (issue 15): the quantized activations' GPU cases after the review's fix (rows below 2^-64
  # scaled by 2^64 first: max_finite / amax overflowed to inf there, and inf times a zero is NaN).
  step act_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_fp8_activations.py -k cuda
elif [ "$PART" = s25h ]; then
  # Session 25 (issue 15): the quantized activations' native fp8 products with their sums promoted every
  # 256 K instead of 128 (MLX_FLASH_CUDA_FP8_PROMOTE_K, process-wide): the model prefill in two processes.
  for k in 128 256; do
    step llama_prefill_promote$k 120 env MLX_FLASH_CUDA_FP8_PROMOTE_K=$k PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" \
      python3 -m mlx_flash.bench.cuda_matmul --sections llama_prefill --llama-models llama_8b,llama_3b \
      --llama-prompts 512,2048 --out "$OUT/matmul_llama_prefill_promote$k.json"
  done
elif [ "$PART" = s25i ]; then
  # Session 25 (issue 15), after the final review: the quantize kernel takes the format's largest finite
  # value as a constant of FMT (no parameter word): the quantized activations' GPU cases again. Not run in
  # session 25 (no card could be started after the review); the next card session's first part.
  step act_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
elif [ "$PART" = s26a ]; then
  # Session 26 (issue 15): first session 25's s25i (the quantize kernel with max_finite a constant of FMT),
  # then the weight-as-A kernel's new stream-K form: 192-token tiles and the decode's 4-byte loads (every plan
  # with both widths: the same bits, float64), beside the wa cases run before (stream-K, the operand cases).
  # (The 4-byte loads were removed after s26d: no faster. s26a-s26d ran with them; their variant lists below
  # are in today's NAME:FIT form.)
  step act_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
  step wa_gpu 240 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
elif [ "$PART" = s26b ]; then
  # Session 26 (issue 15): the models' prefill with the tile fit and the 4-byte decode loads, each alone and
  # together, beside session 25's defaults (16-byte loads, no fit); then each tile height and decode load
  # width by the GPU time of a call alone, at the products of Llamas of 3B and 8B shape, 512 / 2048 tokens,
  # beside MLX's fp16 product.
  step llama_prefill 250 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_3b,llama_8b --llama-prompts 512,2048 \
    --llama-wa-variants old:0,fit:1 --out "$OUT/matmul_llama_prefill_wa.json"
  step wa_tiles 250 python3 -m mlx_flash.bench.cuda_matmul --sections wa_tiles --wa-tiles-rows 512,2048 \
    --out "$OUT/matmul_wa_tiles.json"
elif [ "$PART" = s26c ]; then
  # Session 26 (issue 15): s26b's model prefill at 1024 tokens too (not run unless time is left).
  step llama_prefill 400 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_3b,llama_8b --llama-prompts 1024 \
    --llama-wa-variants old:0,fit:1 --out "$OUT/matmul_llama_prefill_wa_1024.json"
elif [ "$PART" = s26d ]; then
  # Session 26 (issue 15), after s26b: the tile fit with 128-token tiles below a wave (K <= 4096); the tile
  # costs again with BT 128 at both load widths, 512 / 1024 / 2048 tokens; then the models with the fit.
  step wa_tiles 200 python3 -m mlx_flash.bench.cuda_matmul --sections wa_tiles --wa-tiles-rows 512,1024,2048 \
    --out "$OUT/matmul_wa_tiles.json"
  step llama_prefill 250 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_3b,llama_8b --llama-prompts 512,1024,2048 \
    --llama-wa-variants old:0,fit:1 --out "$OUT/matmul_llama_prefill_wa.json"
  step wa_gpu 200 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "tile_heights"
elif [ "$PART" = s26e ]; then
  # Session 26 (issue 15), the defaults as they land (the tile fit on, the 4-byte decode loads removed): the
  # weight-as-A route's GPU cases, then the public API's, FP8Linear's and the quantized activations' (their
  # products of 256 rows and more now take the fitted plans).
  step wa_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  step api_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_fp8_activations.py -k cuda
elif [ "$PART" = s27a ]; then
  # Session 27: s26e (the weight-as-A route's and the public API's GPU cases with the tile fit on by default);
  # the CUDA backward's known gap on peaked short rows (a strict expected failure: it must still fail);
  # decode at GQA 32:4 and 32:8 beside mx.fast (32:8 not timed since the constant-array fix).
  step wa_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "wgmma_wa"
  step api_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py \
    tests/test_fp8_activations.py -k cuda
  step peaked_gpu 90 python3 -m pytest -v -rxX -p no:cacheprovider tests/test_attention_edges.py -k "peaked and cuda"
  step decode 200 python3 -m mlx_flash.bench.cuda --sections decode,decode_gqa8 --out "$OUT/cuda_decode.json"
elif [ "$PART" = s27b ]; then
  # Session 27 (issue 15): the quantized activations' GPU cases with one quantization shared by the
  # projections that read one input (q / k / v, gate / up); then the models' prefill, shared beside unshared
  # (carry .device/mlxlm_full too).
  step act_gpu 150 python3 -m pytest -v -p no:cacheprovider -n 14 tests/test_fp8_activations.py tests/test_fp8_nn.py \
    -k cuda
  step llama_prefill 300 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_3b,llama_8b --llama-prompts 512,1024,2048 --llama-act-unshared \
    --out "$OUT/matmul_llama_prefill_act_shared.json"
elif [ "$PART" = s27c ]; then
  # Session 27 (issue 14, host cost): does a decode call at a new cache length stall a pipelined generation
  # loop (its parameter block evaluated at once)? Host time of such a call with the GPU busy, and a 32-layer
  # generation-like loop: mx.fast, ours, ours with host-written parameter blocks.
  step new_length 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe.json"
elif [ "$PART" = s27d ]; then
  # Session 27 (issue 14), after s27c: the int parameter block host-written (length_array) and the new-length
  # caches (validation, templates, decode plan): the probe again, the host cost, then the GPU cases of the
  # replay, the constant arrays and the attention values / edges.
  step new_length 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe.json"
  step host_cost 150 python3 tools/host_cost.py --json "$OUT/host_cost.json"
  step host_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda_host.py tests/test_cuda_const_arrays.py
  step attn_gpu 240 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_attention_values.py \
    tests/test_attention_edges.py tests/test_attention_key_ranges.py -k cuda
elif [ "$PART" = s27e ]; then
  # Session 27 (issue 14), not run (no device time left): the probe's step loops with main's parameter
  # blocks ("device": the int block host-written), every block host-written ("host") and the int block
  # evaluated on the GPU at each new length ("eval", main before session 27), on one machine, twice.
  step new_length 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe.json" --no-host
  step new_length2 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe2.json" --no-host
elif [ "$PART" = s28a ]; then
  # Session 28 (issue 14, host cost): the C++ replay's key-count families (a recorded decode call replayed at
  # every key count of its range, its int block written on the host). The replay's GPU cases first (the
  # growing-cache ones new), then the new-length probe twice (variants family / device / eval in turn, each
  # from no records), then the host cost with the real kernels.
  step host_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda_host.py tests/test_cuda_const_arrays.py
  step new_length 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe.json"
  step new_length2 200 python3 tools/cuda_new_length_probe.py "$OUT/cuda_new_length_probe2.json" --no-host
  step host_cost 200 python3 tools/host_cost.py --json "$OUT/host_cost.json"
  # mlx-lm generation over a growing cache (unquantized, 4- and 8-bit), patched vs mlx-lm's own, with the
  # key-count families and without (MLX_FLASH_CUDA_HOST_KEY_COUNTS=0).
  step lm_kv 200 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.lm --sections kv \
    --device gpu --kv-context 8192 --new-tokens 128 --out "$OUT/lm_kv.json"
  step lm_kv_nofam 200 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" MLX_FLASH_CUDA_HOST_KEY_COUNTS=0 \
    python3 -m mlx_flash.bench.lm --sections kv --device gpu --kv-context 8192 --new-tokens 128 \
    --out "$OUT/lm_kv_nofam.json"
elif [ "$PART" = s29a ]; then
  # Session 29 (issue 15): stream-K on the native fp8 kernel (matmul_wgmma_ws.cuh with SK; opt-in until this part
  # has run). Its GPU cases with the native route's others and the quantized activations' (FP8Linear(activations=
  # "e4m3")), switched on (MLX_FLASH_CUDA_FP8_NATIVE_SK=1: they take it where its rule does), then the products
  # alone by CUPTI GPU time, each stream-K rule beside MLX's fp16 product.
  step native_gpu 200 env MLX_FLASH_CUDA_FP8_NATIVE_SK=1 python3 -m pytest -q -p no:cacheprovider -n 14 \
    tests/test_matmul_cuda_routes.py -k "native_stream_k or fp8_native or native_plans or every_code_short_k or poisoned_memory"
  step act_gpu 120 env MLX_FLASH_CUDA_FP8_NATIVE_SK=1 python3 -m pytest -q -p no:cacheprovider -n 14 \
    tests/test_fp8_activations.py -k cuda
  step native_sk 240 python3 -m mlx_flash.bench.cuda_matmul --sections native_sk --wa-tiles-rows 512,2048 \
    --out "$OUT/matmul_native_sk.json"
elif [ "$PART" = s29b ]; then
  # Session 29 (issue 15): Llamas of 3B and 8B shape, prompt tokens/s with quantized activations, the native
  # kernel's tiles whole (the default) / split in two below half a wave / also shared over every SM between half a
  # wave and one (carry .device/mlxlm_full too).
  step llama_prefill 300 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill --llama-models llama_3b,llama_8b --llama-prompts 512,2048 \
    --llama-native-sk-variants "whole:0:2:0,split2:1:2:0,partial:1:2:1" --out "$OUT/matmul_llama_prefill_native_sk.json"
elif [ "$PART" = s25c ]; then
  # Session 25 (issue 15): s25b's model prefill with quantized activations came out slower than FP8Linear's
  # default: the same forwards profiled kernel by kernel (the quantize kernel, the native fp8 products).
  step llama_profile 200 env PYTHONPATH="$PWD/.device/mlxlm_full:$PYTHONPATH" python3 -m mlx_flash.bench.cuda_matmul \
    --sections llama_prefill_profile --llama-models llama_8b,llama_3b --llama-prompts 512,2048 \
    --out "$OUT/matmul_llama_prefill_profile_act.json"
elif [ "$PART" = s19c ]; then
  # Session 19: the API's GPU cases and FP8Linear (fp8 layers' prefill now decodes in the kernel).
  step api_gpu 90 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul.py tests/test_fp8_nn.py -k cuda
  step wgmma_all 200 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_matmul_cuda_routes.py -k "not gemv"
else
  echo "card_round_next.sh: PART must be a, b, ..., y, z, s18a-s18d, s19a-s19f, s20a-s20e, s21a-s21b, s22b-s22d, s23a-s23b, s24a-s24c, s24e, s25a-s25i, s26a-s26e, s27a-s27e, s28a, s29a or s29b, got $PART" >&2
  exit 2
fi
