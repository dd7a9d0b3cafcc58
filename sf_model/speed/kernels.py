"""Fused elementwise kernels for inference (Triton on CUDA, plain PyTorch elsewhere).

Between its GEMMs and attention calls a Wan block spends most of its elementwise time in three
patterns, each fused here into one pass over the tokens:

- ``residual_norm``: ``x += y * gate`` (float32 residual stream, in place), then LayerNorm of the new
  x followed by Wan's per-frame modulation ``* (1 + scale) + shift`` or by an affine weight/bias,
  written in the model dtype for the next GEMM;
- ``qk_norm_rope``: RMSNorm of q and k across heads (from the fused QKV output) and 3-D RoPE;
- ``rms_norm``: RMSNorm of the cross-attention query.

The PyTorch versions define the semantics and are what CPUs run; the Triton kernels must match them
(checked by ``benchmarks/gpu_checks.py``).

Also here: ``linear_gelu``, the FFN's first linear layer and its GELU as one cuBLASLt GEMM with a GELU
epilogue, and ``ffn_first_gelu``, the ``Block.ffn_first`` hook that uses it on CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU installs simply use the PyTorch versions.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None


def triton_ok(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


# -- PyTorch reference versions ------------------------------------------------------------------
def residual_norm_ref(x, y, gate, scale, shift, weight, bias, rows_per_frame: int, eps: float, out_dtype,
                      normalize: bool = True):
    """x [R, D] float32 (updated in place when y is given); gate/scale/shift [R // rows_per_frame, D].
    ``normalize=False`` skips the LayerNorm (Wan without cross-attention norm)."""
    if y is not None:
        upd = y.float()
        if gate is not None:
            upd = (upd.unflatten(0, (-1, rows_per_frame)) * gate[:, None]).flatten(0, 1)
        x.add_(upd)
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, eps) if normalize else x
    if weight is not None:
        h = h * weight.float() + bias.float()
    if scale is not None:
        h = (h.unflatten(0, (-1, rows_per_frame)) * (1 + scale[:, None]) + shift[:, None]).flatten(0, 1)
    return h.to(out_dtype)


def rms_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def qk_norm_rope_ref(qkv, wq, wk, cos, sin, tokens: int, heads: int, eps: float):
    """qkv [R, 3D] -> q, k [R, D] (RMSNorm across heads, then RoPE per head on adjacent pairs)."""
    d = wq.shape[0]
    outs = []
    for i, w in enumerate((wq, wk)):
        v = rms_rows(qkv[:, i * d:(i + 1) * d], w, eps)
        v = v.unflatten(0, (-1, tokens)).unflatten(-1, (heads, -1, 2))  # [B, L, H, D/2/H, 2]
        c, s = cos.view(1, tokens, 1, -1), sin.view(1, tokens, 1, -1)
        x1, x2 = v[..., 0], v[..., 1]
        v = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1)
        outs.append(v.flatten(2).flatten(0, 1).to(qkv.dtype))
    return outs[0], outs[1]


# -- Triton kernels -------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _residual_norm_kernel(X, Y, GATE, SCALE, SHIFT, W, B, OUT, D, rows_per_frame, gate_stride, mod_stride, eps,
                              HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, MODULATE: tl.constexpr,
                              AFFINE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0)
        frame = row // rows_per_frame
        if HAS_Y:
            y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * tl.load(GATE + frame * gate_stride + cols, mask=mask, other=0.0)
            x = x + y
            tl.store(X + row * D + cols, x, mask=mask)
        if NORM:
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / D
            h = xc * tl.rsqrt(var + eps)
        else:
            h = x
        if AFFINE:
            h = h * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) \
                + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        if MODULATE:
            sc = tl.load(SCALE + frame * mod_stride + cols, mask=mask, other=0.0)
            sh = tl.load(SHIFT + frame * mod_stride + cols, mask=mask, other=0.0)
            h = h * (1.0 + sc) + sh
        tl.store(OUT + row * D + cols, h.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(QKV, W, COS, SIN, OUT, R, D, tokens, half_head, eps,
                             ROPE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        which = tl.program_id(1)  # 0: q, 1: k
        p = tl.arange(0, BLOCK)  # pair index within the row
        mask = p < D // 2
        src = QKV + row * (3 * D) * ROPE + row * D * (1 - ROPE) + which * D
        x1 = tl.load(src + 2 * p, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + 2 * p + 1, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
        y1 = x1 * r * tl.load(W + which * D + 2 * p, mask=mask, other=0.0).to(tl.float32)
        y2 = x2 * r * tl.load(W + which * D + 2 * p + 1, mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            t = row % tokens
            j = p % half_head
            c = tl.load(COS + t * half_head + j, mask=mask, other=1.0)
            s = tl.load(SIN + t * half_head + j, mask=mask, other=0.0)
            o1 = y1 * c - y2 * s
            o2 = y1 * s + y2 * c
        else:
            o1, o2 = y1, y2
        dst = OUT + which * R * D + row * D
        tl.store(dst + 2 * p, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(dst + 2 * p + 1, o2.to(OUT.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


# -- dispatch -------------------------------------------------------------------------------------
def residual_norm(x, y=None, *, gate=None, scale=None, shift=None, weight=None, bias=None,
                  rows_per_frame: int, eps: float, out_dtype, normalize: bool = True):
    """See the module docstring. gate/scale/shift are [frames_total, D] float32 views (any row stride)."""
    if not triton_ok(x):
        return residual_norm_ref(x, y, gate, scale, shift, weight, bias, rows_per_frame, eps, out_dtype,
                                 normalize)
    rows, d = x.shape
    out = torch.empty((rows, d), device=x.device, dtype=out_dtype)
    for m in (gate, scale, shift):
        if m is not None and (m.stride(1) != 1 or m.dtype != torch.float32):
            raise ValueError("modulation terms must be float32 and contiguous along D")
    if scale is not None and (shift is None or shift.stride(0) != scale.stride(0)):
        raise ValueError("scale and shift must be given together with one row stride")
    gate_stride = gate.stride(0) if gate is not None else 0
    mod_stride = scale.stride(0) if scale is not None else 0
    dummy = x
    _residual_norm_kernel[(rows,)](
        x, y if y is not None else dummy, gate if gate is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy, out,
        d, rows_per_frame, gate_stride, mod_stride, eps,
        HAS_Y=y is not None, HAS_GATE=gate is not None, MODULATE=scale is not None,
        AFFINE=weight is not None, NORM=normalize, BLOCK=_block(d), num_warps=8 if d >= 2048 else 4)
    return out


def qk_norm_rope(qkv, wqk, cos, sin, *, tokens: int, heads: int, eps: float):
    """Fused QKV output [R, 3D] -> (q, k) [R, D]; ``wqk`` = cat(norm_q.weight, norm_k.weight)."""
    d = wqk.shape[0] // 2
    if not triton_ok(qkv):
        return qk_norm_rope_ref(qkv, wqk[:d], wqk[d:], cos, sin, tokens, heads, eps)
    rows = qkv.shape[0]
    out = torch.empty((2, rows, d), device=qkv.device, dtype=qkv.dtype)
    half_head = d // heads // 2
    _qk_norm_rope_kernel[(rows, 2)](qkv, wqk, cos, sin, out, rows, d, tokens, half_head, eps,
                                    ROPE=True, BLOCK=_block(d // 2), num_warps=4)
    return out[0], out[1]


def rms_norm(x, weight, eps: float):
    """RMSNorm of rows of x [R, D] (Wan's q/k norm), in x's dtype."""
    if not triton_ok(x) or not x.is_contiguous():
        return rms_rows(x, weight, eps).to(x.dtype)
    rows, d = x.shape
    out = torch.empty((1, rows, d), device=x.device, dtype=x.dtype)
    _qk_norm_rope_kernel[(rows, 1)](x, weight, x, x, out, rows, d, 1, 1, eps,
                                    ROPE=False, BLOCK=_block(d // 2), num_warps=4)
    return out[0]


# -- FFN GEMM with a GELU epilogue ----------------------------------------------------------------
@torch.compiler.disable
def linear_gelu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(x W^T + b) as one cuBLASLt GEMM with a GELU epilogue (kept out of torch.compile,
    which would split it again into a GEMM and an elementwise kernel)."""
    out = torch._addmm_activation(layer.bias, x.flatten(0, -2), layer.weight.t(), use_gelu=True)
    return out.unflatten(0, x.shape[:-1])


def ffn_first_gelu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``Block.ffn_first`` hook: GELU-tanh(layer(x)), through ``linear_gelu`` on CUDA tensors and as
    the plain layer + GELU elsewhere."""
    if x.is_cuda:
        return linear_gelu(layer, x)
    return F.gelu(layer(x), approximate="tanh")
