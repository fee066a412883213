"""The bandwidth ceiling of a quantized decode step (GPU machine): a kernel
that only streams the bytes attention_quant_decode reads, nothing computed.

    python tools/cuda_decode_probe.py OUT_DIR [--bits 4] [--layers 32]

The decode step of issue 16 (B 1, 8 KV heads, Nk 32768, D 128, group 64)
reads each KV head's K and V codes and their four scale/bias planes once:
38 MB at 4 bits. The probe reads exactly those arrays (mx.quantize's layout),
one block per (KV head, split) like the decode kernel, each warp taking
interleaved 16-key tiles with DEPTH tiles' loads issued before any is used
(the loads of one batch are independent: DEPTH tiles in flight a warp).
`layers` distinct caches are read in turn (one per call, as a model's
layers are), so a call never finds its cache in the 50 MB L2 from the call
before. Per (warps, depth, splits) it reports the GPU time per call (20 *
layers calls an eval, the median of several evals) and the bytes per second:
the floor the decode kernel's plan can approach, in the same run as the
kernel's own timing.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import mlx.core as mx

# Each lane loads its share of a tile: K and V rows as 16-byte words (WR / 8
# per lane per array), one 4-byte word of each scale/bias plane pair (lanes
# 0-15: scales, 16-31: biases; the planes of a 16-key tile are 16 words at
# 2 groups a row). The XOR of everything loaded is stored so nothing is dead.
_SOURCE = r"""
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y, split = blockIdx.x;
  const int nk = ns[0], splits = ns[1];
  const int tiles = nk / 16;
  const int per = (tiles + splits - 1) / splits;
  const int t0 = split * per, t1 = min(tiles, t0 + per);
  constexpr int RV = WR / 8;  // 16-byte words of a tile's K (or V) rows per lane
  const uint4* K = reinterpret_cast<const uint4*>(kw) + (long)head * nk * (WR / 4);
  const uint4* V = reinterpret_cast<const uint4*>(vw) + (long)head * nk * (WR / 4);
  const unsigned* KS = reinterpret_cast<const unsigned*>(lane < 16 ? ks : kb) + (long)head * nk;
  const unsigned* VS = reinterpret_cast<const unsigned*>(lane < 16 ? vs : vb) + (long)head * nk;
  unsigned acc = 0u;
  for (int t = t0 + warp; t < t1; t += W * DEPTH) {
    uint4 a[DEPTH][RV], b[DEPTH][RV];
    unsigned c[DEPTH][2];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const long tt = min(t + u * W, t1 - 1);
#pragma unroll
      for (int i = 0; i < RV; ++i) {
        a[u][i] = K[tt * 4 * WR + i * 32 + lane];
        b[u][i] = V[tt * 4 * WR + i * 32 + lane];
      }
      c[u][0] = KS[tt * 16 + lane % 16];
      c[u][1] = VS[tt * 16 + lane % 16];
    }
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
#pragma unroll
      for (int i = 0; i < RV; ++i) acc ^= a[u][i].x ^ a[u][i].y ^ a[u][i].z ^ a[u][i].w ^ b[u][i].x ^ b[u][i].y ^ b[u][i].z ^ b[u][i].w;
      acc ^= c[u][0] ^ c[u][1];
    }
  }
  out[((long)head * splits + split) * W * 32 + threadIdx.x] = acc;
"""


def _layers(n_layers, bits, hkv=8, nk=32768, d=128, gs=64):
    caches = []
    for i in range(n_layers):
        key = mx.random.key(100 + i)
        k = mx.random.normal((1, hkv, nk, d), key=key).astype(mx.float16)
        v = mx.random.normal((1, hkv, nk, d), key=mx.random.split(key)[0]).astype(mx.float16)
        kq = tuple(mx.quantize(k, group_size=gs, bits=bits))
        vq = tuple(mx.quantize(v, group_size=gs, bits=bits))
        mx.eval(kq, vq)
        caches.append((kq, vq))
    return caches


def probe(out_dir, bits=4, n_layers=32, configs=None, rounds=5):
    os.makedirs(out_dir, exist_ok=True)
    hkv, nk, d, gs = 8, 32768, 128, 64
    wr = d * bits // 32
    caches = _layers(n_layers, bits, hkv, nk, d, gs)
    nbytes = sum(x.nbytes for x in caches[0][0] + caches[0][1])
    kern = mx.fast.cuda_kernel(name="mlx_flash_decode_probe", input_names=["kw", "ks", "kb", "vw", "vs", "vb", "ns"],
                               output_names=["out"], source=_SOURCE)
    res = {"card": mx.device_info().get("device_name", "?"), "bits": bits, "layers": n_layers,
           "bytes_per_call": nbytes, "shape": f"Hkv {hkv} Nk {nk} D {d} group {gs}", "runs": {}}
    configs = configs or [(4, 1, 16), (4, 2, 16), (4, 4, 16), (4, 8, 16), (8, 4, 16), (16, 1, 16), (16, 2, 16),
                          (16, 4, 16), (4, 4, 66), (8, 4, 33)]
    for w, depth, splits in configs:
        ns = mx.array([nk, splits], mx.int32)

        def call(layer, w=w, depth=depth, splits=splits, ns=ns):
            kq, vq = caches[layer]
            return kern(inputs=[kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], ns], template=[
                ("W", w), ("DEPTH", depth), ("WR", wr)], grid=(splits * 32 * w, hkv, 1), threadgroup=(32 * w, 1, 1),
                output_shapes=[(hkv * splits * 32 * w,)], output_dtypes=[mx.uint32])[0]

        name = f"w{w}_depth{depth}_splits{splits}"
        try:
            mx.eval(call(0))
            times = []
            for _ in range(rounds):
                outs = [call(i % n_layers) for i in range(20 * n_layers)]
                t0 = time.perf_counter()
                mx.eval(outs)
                times.append((time.perf_counter() - t0) / len(outs))
            us = statistics.median(times) * 1e6
            res["runs"][name] = {"us": us, "tb_per_s": nbytes / us / 1e6}
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            res["runs"][name] = {"error": repr(e)[:300]}
        print("probe", bits, "bit", name, res["runs"][name], flush=True)
        with open(os.path.join(out_dir, f"decode_probe_{bits}bit.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[0] if args and not args[0].startswith("--") else "."
    bits = int(args[args.index("--bits") + 1]) if "--bits" in args else 4
    layers = int(args[args.index("--layers") + 1]) if "--layers" in args else 32
    probe(out, bits, layers)
