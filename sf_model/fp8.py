"""Optional FP8 linear layers for inference (opt-in; Hopper GPUs run them on FP8 tensor cores).

Weights are quantised once per output channel, activations per token at run time, both to
``float8_e4m3fn`` with float32 scales; the product runs through ``torch._scaled_mm`` (row-wise scales)
and comes back in the model dtype. Used only by the fused inference trunk
(``CausalWanModel.use_fused_kernels(fp8=True)``). It trades accuracy for speed: the README states the
measured error. Bias is added after the product (row-wise scaling with a fused bias is not available
in every PyTorch build).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1]) with x ~= q * scale, per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@dataclass
class Fp8Weight:
    weight: torch.Tensor      # [N, K] float8_e4m3fn
    scale: torch.Tensor       # [1, N] float32
    bias: torch.Tensor | None
    source_ptr: int           # data_ptr of the weight it was made from (stale detection)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Fp8Weight":
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"FP8 linear layers need both sizes divisible by 16, got {tuple(weight.shape)}")
        q, s = quantize_rows(weight.detach())
        return cls(q, s.t().contiguous(), None if bias is None else bias.detach(), weight.data_ptr())


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x [..., K] @ W^T (+ b) in FP8 with per-token activation scales; returns x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    q, s = quantize_rows(flat)
    out = torch._scaled_mm(q, w.weight.t(), scale_a=s, scale_b=w.scale, out_dtype=x.dtype)
    if w.bias is not None:
        out = out + w.bias.to(out.dtype)
    return out.view(*x.shape[:-1], -1)


def attach(layer_weight: torch.Tensor, layer_bias: torch.Tensor | None, current: Fp8Weight | None) -> Fp8Weight:
    """The FP8 copy of a weight, rebuilt when the weight tensor changed (e.g. after ``.to()``)."""
    if current is not None and current.source_ptr == layer_weight.data_ptr():
        return current
    return Fp8Weight.from_weight(layer_weight, layer_bias)
