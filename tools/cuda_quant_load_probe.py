"""What the quantized decode's loads alone cost, chained (GPU machine; issue 16).

    python tools/cuda_quant_load_probe.py OUT.json [--rounds 9]
    python tools/cuda_quant_load_probe.py OUT.json --ab '{"routed": {}, "ring3": {"dec_ring": 3}}' [--rounds 15] [--bits 4]

Session 15's Nsight run put half of the routed 4-bit decode's cycles between
issues on global-load waits, and session 16's chained A/B found every way of
issuing the loads earlier (the one-tile prefetch with LATE scales, L2
prefetch 2-8 tiles ahead) slower, with as many or more load waits. This probe
separates the loads from the arithmetic: probe kernels read exactly the
words, scales and biases the register path reads (same grid: 49 splits x 8
KV heads, 4 warps a block, interleaved 16-key tiles, same lane map: K as
uint2 per (key g / 8 + g, group, lane t), V as one word per (key 2t + e,
group, lane g), the four scale planes as 16-bit values per (key lane % 16,
row)), over 32 layers' distinct 4-bit caches (B 1, 8 KV heads, Nk 32768,
D 128, group 64), each call's `dep` input the last call's output so the 32
calls run one after another as a model's layers do. Template DEPTH: tiles
whose loads are issued together before any is used (1: the routed loop's one
tile in flight a warp); SPIN: dependent FMAs a tile after its words are used
(a stand-in for the tile's arithmetic; 0: loads only); AHEAD: the next
iteration's loads issued before this iteration's SPIN (software pipelining).
Beside them, in the same process: the routed decode chained (flash_attention_quantized, each layer's
query the last output) and a trivial chained kernel (MLX's floor a call).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx

SOURCE = r"""
  constexpr int NW = 4, NK = 32768, KWR = 16, NG = 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int splits = gridDim.x, split = blockIdx.x, h = blockIdx.z;
  const int chunk = ((NK + splits - 1) / splits + 15) / 16 * 16;
  const int start = split * chunk, end = min(NK, start + chunk), last = end - 1;
  const unsigned* K = kw + (long)h * NK * KWR;
  const unsigned* V = vw + (long)h * NK * KWR;
  const __half* S[4] = {ks + (long)h * NK * NG, kb + (long)h * NK * NG, vs + (long)h * NK * NG, vb + (long)h * NK * NG};
  float acc = dep[0] * 1e-30f;
  unsigned x = 0;
  struct Tile { uint2 k[2][NG]; unsigned v[4][NG]; unsigned short s[4]; };
  auto load = [&](Tile& tl, int j0) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const long j = min(j0 + 8 * n + g, last);
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) tl.k[n][gi] = *reinterpret_cast<const uint2*>(K + j * KWR + gi * 8 + t * 2);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long j = min(j0 + 2 * t + (e & 1) + 8 * (e >> 1), last);
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) tl.v[e][gi] = V[j * KWR + gi * 8 + g];
    }
    const long j = min(j0 + lane % 16, last);
#pragma unroll
    for (int i = 0; i < 4; ++i) tl.s[i] = reinterpret_cast<const unsigned short*>(S[i])[j * NG + lane / 16];
  };
  auto use = [&](const Tile& tl) {
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) x ^= tl.k[n][gi].x + tl.k[n][gi].y;
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) x ^= tl.v[e][gi];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc += __half2float(__ushort_as_half(tl.s[i]));
    float y = acc;
#pragma unroll 1
    for (int i = 0; i < SPIN; ++i) y = fmaf(y, 0.999f, 1e-7f);
    acc = y;
  };
  Tile cur[DEPTH], nxt[DEPTH];
  int j0 = start + 16 * warp;
  if (AHEAD) {
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) load(cur[u], j0 + 16 * NW * u);
  }
  for (; j0 < end; j0 += 16 * NW * DEPTH) {
    const int j1 = j0 + 16 * NW * DEPTH;
    if (AHEAD) {
      if (j1 < end) {
#pragma unroll
        for (int u = 0; u < DEPTH; ++u) load(nxt[u], j1 + 16 * NW * u);
      }
#pragma unroll
      for (int u = 0; u < DEPTH; ++u) if (j0 + 16 * NW * u < end) use(cur[u]);
#pragma unroll
      for (int u = 0; u < DEPTH; ++u) cur[u] = nxt[u];
    } else {
#pragma unroll
      for (int u = 0; u < DEPTH; ++u) load(cur[u], j0 + 16 * NW * u);
#pragma unroll
      for (int u = 0; u < DEPTH; ++u) if (j0 + 16 * NW * u < end) use(cur[u]);
    }
  }
  const long o = ((long)blockIdx.z * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  out[o] = acc + (float)(x & 1u);
"""

TRIVIAL = r"""
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 8192) out[i] = dep[i % 1] * 1.0001f + 1.f;
"""


def layer_caches(layers, Hkv, Nk, D, bits):
    """Each layer's quantized K / V triples (group 64) and the fp16 caches they came from (fixed keys)."""
    caches, fp16 = [], []
    for i in range(layers):
        kk, kv = mx.random.split(mx.random.key(500 + i))
        k = mx.random.normal((1, Hkv, Nk, D), key=kk).astype(mx.float16)
        v = mx.random.normal((1, Hkv, Nk, D), key=kv).astype(mx.float16)
        kq, vq = mx.quantize(k, group_size=64, bits=bits), mx.quantize(v, group_size=64, bits=bits)
        mx.eval(kq, vq, k, v)
        caches.append((tuple(kq), tuple(vq)))
        fp16.append((k, v))
    return caches, fp16


def chained_step(kind, q, caches, fp16, bits):
    """A model's decode step of attention alone: each layer's query the last layer's output. kind "ours":
    flash_attention_quantized over the quantized triples; "mx_fast": mx.fast SDPA over the fp16 caches."""
    import mlx_flash

    x = q
    for i, (kq, vq) in enumerate(caches):
        if kind == "mx_fast":
            x = mx.fast.scaled_dot_product_attention(x, *fp16[i], scale=q.shape[-1] ** -0.5)
        else:
            x = mlx_flash.flash_attention_quantized(x, kq, vq, bits=bits, group_size=64)
    return x


def ab(path, plans, rounds, bits=4):
    """The quantized decode's plans (TUNING dicts) chained over 32 layers, INTERLEAVED: each round runs
    every plan's step once, in turn, so that drifts of the card or of MLX's caches over a run fall on every
    plan alike (session 16: the same routed plan measured 63 and 94 us a call at the two ends of one
    plan-after-plan run). mx.fast over the fp16 caches is one of the plans ("mx_fast")."""
    from mlx_flash.backends import cuda_quant as cq

    layers, Hkv, Nk, D = 32, 8, 32768, 128
    q = mx.random.normal((1, 32, 1, D), key=mx.random.key(3)).astype(mx.float16)
    caches, fp16 = layer_caches(layers, Hkv, Nk, D, bits)

    def step(name):
        if name != "mx_fast":
            cq.TUNING.clear()
            cq.TUNING.update(plans[name])
            cq.decode_plan.cache_clear()
        return chained_step("mx_fast" if name == "mx_fast" else "ours", q, caches, fp16, bits)

    names = ["mx_fast"] + list(plans)
    res = {"card": mx.device_info().get("device_name", "?"), "bits": bits, "plans": plans,
           "shape": f"B1 GQA 32:8 Nk 32768 D128 {bits}-bit group 64, 32 layers chained, plans interleaved",
           "eval_us_per_call": {n: [] for n in names}}
    for name in names:  # warm-up: compile, plan caches
        mx.eval(step(name))
    for _ in range(rounds):
        for name in names:
            x = step(name)
            t0 = time.perf_counter()
            mx.eval(x)
            res["eval_us_per_call"][name].append((time.perf_counter() - t0) / layers * 1e6)
    cq.TUNING.clear()
    cq.decode_plan.cache_clear()
    res["median"] = {n: statistics.median(v) for n, v in res["eval_us_per_call"].items()}
    res["min"] = {n: min(v) for n, v in res["eval_us_per_call"].items()}
    res["vs_mx_fast_median"] = {n: res["median"]["mx_fast"] / m for n, m in res["median"].items()}
    for n in names:
        print(n, "median", round(res["median"][n], 1), "min", round(res["min"][n], 1),
              "x mx.fast", round(res["vs_mx_fast_median"][n], 3), flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def main():
    path = sys.argv[1]
    if "--ab" in sys.argv:
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 15
        bits = int(sys.argv[sys.argv.index("--bits") + 1]) if "--bits" in sys.argv else 4
        return ab(path, json.loads(sys.argv[sys.argv.index("--ab") + 1]), rounds, bits)
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 9
    import mlx_flash

    layers, Hkv, Nk, D, splits = 32, 8, 32768, 128, 49
    caches, _ = layer_caches(layers, Hkv, Nk, D, 4)
    probe = mx.fast.cuda_kernel(name="qd_load_probe", input_names=["kw", "ks", "kb", "vw", "vs", "vb", "dep"],
                                output_names=["out"], source=SOURCE)
    trivial = mx.fast.cuda_kernel(name="qd_trivial_chain", input_names=["dep"], output_names=["out"], source=TRIVIAL)
    nthreads = splits * 128 * Hkv
    res = {"card": mx.device_info().get("device_name", "?"), "shape": "B1 Hkv 8 Nk 32768 D128 4-bit group 64, "
           "49 splits x 4 warps, 32 layers chained", "us_per_call": {}}

    def timed(name, call, x0):
        outs = call(0, x0)
        mx.eval(outs)
        ev = []
        for _ in range(rounds):
            x = x0
            for i in range(layers):
                x = call(i, x)
            t0 = time.perf_counter()
            mx.eval(x)
            ev.append((time.perf_counter() - t0) / layers * 1e6)
        res["us_per_call"][name] = {"median": statistics.median(ev), "min": min(ev)}
        print(name, {k: round(v, 1) for k, v in res["us_per_call"][name].items()}, flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    dep0 = mx.zeros((nthreads,), mx.float32)
    timed("trivial_chain", lambda i, x: trivial(inputs=[x], grid=(8192, 1, 1), threadgroup=(256, 1, 1),
                                               output_shapes=[(8192,)], output_dtypes=[mx.float32])[0],
          mx.zeros((8192,), mx.float32))
    for depth, spin, ahead in [(1, 0, 0), (2, 0, 0), (4, 0, 0), (1, 0, 1), (2, 0, 1), (1, 300, 0), (1, 300, 1),
                               (2, 300, 1), (1, 600, 0), (1, 600, 1), (1, 0, 0)]:
        def call(i, x, depth=depth, spin=spin, ahead=ahead):
            (kw, ks, kb), (vw, vs, vb) = caches[i]
            return probe(inputs=[kw, ks, kb, vw, vs, vb, x], template=[("DEPTH", depth), ("SPIN", spin),
                                                                        ("AHEAD", ahead)],
                         grid=(splits * 128, 1, Hkv), threadgroup=(128, 1, 1), output_shapes=[(nthreads,)],
                         output_dtypes=[mx.float32])[0]
        timed(f"probe_depth{depth}_spin{spin}_ahead{ahead}", call, dep0)
    q = mx.random.normal((1, 32, 1, D), key=mx.random.key(3)).astype(mx.float16)
    timed("routed_quant_decode", lambda i, x: mlx_flash.flash_attention_quantized(
        x, caches[i][0], caches[i][1], bits=4, group_size=64), q)
    timed("trivial_chain_b", lambda i, x: trivial(inputs=[x], grid=(8192, 1, 1), threadgroup=(256, 1, 1),
                                                 output_shapes=[(8192,)], output_dtypes=[mx.float32])[0],
          mx.zeros((8192,), mx.float32))


if __name__ == "__main__":
    main()
