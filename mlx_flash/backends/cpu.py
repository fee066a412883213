"""CPU backend: the C++ primitive of mlx_flash._ext (csrc/)."""

from __future__ import annotations

from .._spec import AttentionInputs, AttentionSpec

# The kernel's row buffers and tile plan take MLA's widths (csrc MAX_ROW).
HEAD_DIM_LIMITS = (576, 512)
# key_start/key_len bound the kernels' key loops (csrc/attention_cpu_kernel.cpp):
# key tiles outside a batch's range are never packed or visited.
NATIVE_KEY_RANGES = True


def _ext():
    # Imported on first use: a CUDA-only install need not have built it.
    from .. import _ext

    return _ext


def _static(spec: AttentionSpec) -> dict:
    return dict(
        batch=spec.batch, scale=spec.scale, window_left=spec.window_left,
        window_right=spec.window_right, softcap=spec.softcap,
        block_q=spec.block_q, block_k=spec.block_k,
    )


def _extras(inputs: AttentionInputs) -> dict:
    return dict(
        mask=inputs.mask, alibi=inputs.alibi, sinks=inputs.sinks, block_mask=inputs.block_mask,
        cu_seqlens_q=inputs.cu_seqlens_q, cu_seqlens_k=inputs.cu_seqlens_k,
        key_start=inputs.key_start, key_len=inputs.key_len,
    )


def attention_forward(q, k, v, spec: AttentionSpec, inputs: AttentionInputs, stream):
    out, lse = _ext().attention_forward(q, k, v, **_extras(inputs), **_static(spec), stream=stream)
    return out, lse


def attention_backward(q, k, v, out, lse, dout, dlse, spec: AttentionSpec, inputs: AttentionInputs, stream,
                       own_output=True):
    # own_output lets the kernel take delta as sum P dP where a sequence's keys
    # fit one key tile (exact where the 16-bit out would round it; dispatch.py).
    dq, dk, dv = _ext().attention_backward(
        q, k, v, out, lse, dout, dlse, **_extras(inputs), **_static(spec), own_output=own_output, stream=stream
    )
    return dq, dk, dv


def _quant_static(qspec) -> dict:
    spec = qspec.attention
    return dict(bits=qspec.bits, group_size=qspec.group_size, scale=spec.scale,
                window_left=spec.window_left, window_right=spec.window_right, softcap=spec.softcap)


def quantized_attention_forward(q, k, v, qspec, inputs: AttentionInputs, stream):
    """(out, lse) from the (data, scales, biases) triples k, v; see dispatch.py."""
    out, lse = _ext().quant_attention_forward(
        q, list(k), list(v), mask=inputs.mask, alibi=inputs.alibi, sinks=inputs.sinks,
        **_quant_static(qspec), stream=stream)
    return out, lse


def quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs: AttentionInputs, stream):
    """dq of the quantized op (k, v constants); delta = dO . O - dlse."""
    (dq,) = _ext().quant_attention_backward(
        q, list(k), list(v), lse, delta, dout, mask=inputs.mask, alibi=inputs.alibi, sinks=inputs.sinks,
        **_quant_static(qspec), stream=stream)
    return dq


def matmul2d(a, b, a_scale, b_scale, spec, stream):
    """out [batch, M, N] = (dequant(a) * a_scale) @ (dequant(b) * b_scale); see dispatch.py."""
    return _ext().matmul2d(
        a, b, a_scale, b_scale, a_fmt=spec.a_fmt or "", b_fmt=spec.b_fmt or "",
        transpose_b=spec.transpose_b, out_dtype=spec.out_dtype, stream=stream,
    )
