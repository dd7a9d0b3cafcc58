"""Optional FP8 linear layers for inference (opt-in; Hopper GPUs run them on FP8 tensor cores).

Weights are quantised once per output channel, activations per token at run time, both to
``float8_e4m3fn`` with float32 scales; the product runs through ``torch._scaled_mm`` (row-wise scales)
and comes back in the model dtype. Used only by the fused inference trunk
(``sf_model.speed.use_fused_kernels(model, fp8=True)``). It trades accuracy for speed: the README states the
measured error. The bias is fused into the GEMM where the PyTorch build supports that with row-wise
scales, otherwise added after the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; elsewhere the PyTorch version below runs.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows_ref(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1]) with x ~= q * scale, per row.
    ``gelu``: quantise GELU-tanh(x) instead (the FFN's hidden activation)."""
    xf = x.float()
    if gelu:
        xf = F.gelu(xf, approximate="tanh")
    return quantize_by_amax(xf, xf.abs().amax(dim=-1, keepdim=True))


def quantize_by_amax(xf: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x and its absolute maximum per block (broadcastable to x, keepdim) -> (fp8, float32 scales)
    with x ~= q * scale: the block's amax maps to the largest e4m3 value. Shared by the per-row quantisation
    above and the per-(frame, head) quantisation of the FP8 K/V cache (``kv_fp8``)."""
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(X, Q, S, K, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(X + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # tanh-approximate GELU, tanh written through exp (exact up to rounding)
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            e = tl.exp(-2.0 * tl.abs(u))
            th = (1.0 - e) / (1.0 + e)
            th = tl.where(u < 0, -th, th)
            x = 0.5 * x * (1.0 + th)
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + row, scale)


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantisation (see ``quantize_rows_ref``): one pass over x on CUDA (Triton)."""
    if triton is None or not x.is_cuda or not x.is_contiguous() or x.dim() != 2:
        return quantize_rows_ref(x, gelu)
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=FP8)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, GELU=gelu, BLOCK=block,
                                num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return q, s


@dataclass
class Fp8Weight:
    weight: torch.Tensor      # [N, K] float8_e4m3fn
    scale: torch.Tensor       # [1, N] float32
    bias: torch.Tensor | None
    source_ptr: int           # data_ptr of the weight it was made from (stale detection)
    bias_in_gemm: bool | None = None  # does this build fuse the bias into the scaled GEMM? (None: untried)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Fp8Weight":
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"FP8 linear layers need both sizes divisible by 16, got {tuple(weight.shape)}")
        q, s = quantize_rows(weight.detach())
        return cls(q, s.t().contiguous(), None if bias is None else bias.detach(), weight.data_ptr())


def fp8_linear(x: torch.Tensor, w: Fp8Weight, gelu: bool = False) -> torch.Tensor:
    """x [..., K] @ W^T (+ b) in FP8 with per-token activation scales; returns x's dtype.
    ``gelu``: multiply GELU-tanh(x) instead (fused into the activation quantisation)."""
    flat = x.reshape(-1, x.shape[-1])
    q, s = quantize_rows(flat, gelu)
    bias = None if w.bias is None else w.bias.to(x.dtype)
    if bias is not None and w.bias_in_gemm is not False:
        try:  # the bias as a GEMM epilogue, where this build's row-wise scaled GEMM takes one
            out = torch._scaled_mm(q, w.weight.t(), scale_a=s, scale_b=w.scale, bias=bias, out_dtype=x.dtype)
            w.bias_in_gemm = True
            return out.view(*x.shape[:-1], -1)
        except (RuntimeError, NotImplementedError):
            w.bias_in_gemm = False
    out = torch._scaled_mm(q, w.weight.t(), scale_a=s, scale_b=w.scale, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], -1)


def attach(layer_weight: torch.Tensor, layer_bias: torch.Tensor | None, current: Fp8Weight | None) -> Fp8Weight:
    """The FP8 copy of a weight, rebuilt when the weight tensor changed (e.g. after ``.to()``)."""
    if current is not None and current.source_ptr == layer_weight.data_ptr():
        return current
    return Fp8Weight.from_weight(layer_weight, layer_bias)
