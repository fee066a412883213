"""Every kernel object and launch the CUDA path makes for a grid of calls, printed
on the CPU (tools/host_cost.py's stub kernels, an H200's routes), to prove that
a host-cost change keeps the graph: run it on two trees and diff.

    PYTHONPATH=OLD_TREE python tools/cuda_launch_dump.py > before.txt
    PYTHONPATH=NEW_TREE python tools/cuda_launch_dump.py > after.txt
    cmp before.txt after.txt

Per call (forward with lse, and the gradient to q) it prints each kernel
object's creation arguments (body, input and output names, shared memory,
template constants written into the source) and each launch's template,
grid, threadgroup, input shapes and dtypes, output shapes and dtypes and init
value; over head dims 64-256, GQA, decode and prefill shapes, fp16/bf16,
causal / window / softcap, and the warp-specialised forward's settings.
"""
import os
import sys

sys.argv = ["x", "--stub"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_cost as hc  # noqa: E402
import mlx.core as mx  # noqa: E402

stub = hc.install_stubs()
import mlx_flash
from mlx_flash.backends import cuda as cb, cuda_fwd_ws as ws
log = []
real = hc._StubKernel.__call__
def rec(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None, verbose=False, stream=None):
    log.append((template, grid, threadgroup, [(tuple(x.shape), str(x.dtype)) for x in inputs],
                [tuple(s) for s in output_shapes], [str(d) for d in output_dtypes], init_value))
    return real(self, inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                threadgroup=threadgroup, template=template, init_value=init_value)
hc._StubKernel.__call__ = rec
def kern(*a, **kw):
    log.append(("kernel", a, sorted(kw.items())))
    return stub
cb._kernel = kern
def call(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, **o):
    q = mx.zeros((B, Hq, Nq, D), dtype); k = mx.zeros((B, Hkv, Nk, D), dtype); v = mx.zeros((B, Hkv, Nk, Dv), dtype)
    out = mlx_flash.flash_attention(q, k, v, return_lse=True, **o)
    g = mx.grad(lambda q: mlx_flash.flash_attention(q, k, v, **o).astype(mx.float32).sum())(q)
shapes = [(4, 16, 16, 1024, 1024, 64, 64), (1, 16, 16, 8192, 8192, 128, 128), (1, 32, 8, 2048, 2048, 128, 128),
          (2, 8, 2, 300, 2100, 64, 64), (1, 4, 4, 257, 333, 96, 96), (1, 4, 4, 200, 500, 192, 192),
          (1, 4, 4, 130, 300, 256, 256), (1, 8, 8, 100, 200, 192, 128), (1, 32, 8, 1, 32768, 128, 128),
          (1, 32, 8, 1, 32769, 128, 128), (1, 32, 8, 4, 5000, 64, 64), (2, 4, 4, 77, 99, 80, 80)]
opts = [{}, dict(causal=True), dict(window=(100, 0)), dict(scale=0.3, softcap=20.0)]
settings = [{}, dict(CHECKED_ONLY=False), dict(WG3_D64="0"), dict(WG3_D64="1", CHECKED_ONLY=False), dict(CHAINS_D128=2),
            dict(KEYS_DENSE_D64=192, WG3_D64="0", CHECKED_ONLY=False), dict(PERSISTENT=True), dict(PERSISTENT=False),
            dict(HEAD_GROUP=0), dict(POISON_OUTPUTS=True), dict(KEYS_DENSE_D128=144)]
for st in settings:
    saved = {n: getattr(ws, n) for n in st}
    for n, x in st.items(): setattr(ws, n, x)
    ws._templates.cache_clear(); ws._kernel.cache_clear()
    for c in (cb._wgmma_fwd_config, cb._mma_fwd_config, cb._simt_fwd_config, cb._wgmma_bwd_config, cb._mma_bwd_config,
              cb._simt_bwd_config, cb._decode_launch_cached):
        c.cache_clear()
    for shp in shapes:
        for dt in (mx.float16, mx.bfloat16):
            for o in opts:
                log.clear()
                call(*shp, dt, **o)
                print(st, shp, dt, o); [print("  ", l) for l in log]
    for n, x in saved.items(): setattr(ws, n, x)
