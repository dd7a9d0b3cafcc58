"""The inference trunk with fused elementwise kernels (see ``kernels``), optionally with FP8 GEMMs.

Same math as ``Block.forward`` + ``Head.forward``, restructured so that every residual update is
fused with the LayerNorm that follows it -- including the next block's first norm -- and the float32
residual stream is updated in place. A ``FusedTrunk`` is installed as ``model.inference_trunk`` by
``sf_model.speed.use_fused_kernels``; the model calls it for gradient-free forwards only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import attention
from . import kernels as K
from .fp8 import Fp8Weight, attach, fp8_linear


class FusedTrunk:
    """The fused trunk of one model. ``fp8``: run the blocks' linear layers as FP8 GEMMs (opt-in,
    less exact); the FP8 weight copies are kept in ``fp8_weights``, built on first use and rebuilt
    when a weight tensor is replaced."""

    def __init__(self, fp8: bool = False):
        self.fp8 = fp8
        self.fp8_weights: dict[str, Fp8Weight] = {}

    @property
    def graph_key(self) -> tuple:
        """Names this trunk's variant in the CUDA-graph situation key (see ``graphs``)."""
        return ("fused", self.fp8)

    def linear(self, key: str, x_in: torch.Tensor, weight, bias, gelu: bool = False) -> torch.Tensor:
        """x_in W^T + b; ``gelu`` applies GELU-tanh to x_in first."""
        if self.fp8:
            w = self.fp8_weights[key] = attach(weight, bias, self.fp8_weights.get(key))
            return fp8_linear(x_in, w, gelu)
        return F.linear(F.gelu(x_in, approximate="tanh") if gelu else x_in, weight, bias)

    def __call__(self, model, h: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, frames: int, rope, text,
                 attend_for_layer) -> torch.Tensor:
        """h: [B, L, dim] float32 patch embeddings; returns the head output [B, L, patch*out_dim]."""
        cfg = model.config
        b, length, dim = h.shape
        rows_per_frame = length // frames
        dtype, eps, backend = model.dtype, cfg.eps, model.attn_backend
        heads, head_dim = cfg.num_heads, cfg.head_dim
        x = h.reshape(b * length, dim).contiguous()
        cos = rope[0].reshape(-1, head_dim // 2).contiguous()
        sin = rope[1].reshape(-1, head_dim // 2).contiguous()
        lin = self.linear

        def mods_of(blk):  # [B*F, 6, dim] float32: shift1, scale1, gate1, shift2, scale2, gate2
            return (blk.modulation.float().unsqueeze(1) + e0).reshape(b * frames, 6, dim)

        def norm(y=None, gate=None, scale=None, shift=None, weight=None, bias=None, normalize=True):
            return K.residual_norm(x, y, gate=gate, scale=scale, shift=shift, weight=weight, bias=bias,
                                   rows_per_frame=rows_per_frame, eps=eps, out_dtype=dtype, normalize=normalize)

        blocks = list(model.blocks)
        m = mods_of(blocks[0])
        hn = norm(scale=m[:, 1], shift=m[:, 0])
        for i, blk in enumerate(blocks):
            sa, ca = blk.self_attn, blk.cross_attn
            qkv = lin(f"{i}.qkv", hn, *sa.fused)
            wqk = torch.cat([sa.norm_q.weight, sa.norm_k.weight])
            q, k = K.qk_norm_rope(qkv, wqk, cos, sin, tokens=length, heads=heads, eps=eps)
            v = qkv[:, 2 * dim:]
            shape = (b, length, heads, head_dim)
            y = attend_for_layer(i)(q.view(shape), k.view(shape), v.view(shape))
            y = lin(f"{i}.o", y.reshape(b * length, dim), sa.o.weight, sa.o.bias)
            if cfg.cross_attn_norm:
                hn = norm(y, gate=m[:, 2], weight=blk.norm3.weight, bias=blk.norm3.bias)
            else:  # Wan without a cross-attention norm feeds the residual stream as it is
                hn = norm(y, gate=m[:, 2], normalize=False)
            cq = K.rms_norm(lin(f"{i}.cq", hn, ca.q.weight, ca.q.bias), ca.norm_q.weight, eps).view(shape)
            tk, tv = text[i]
            y = attention(cq, tk, tv, backend).reshape(b * length, dim)
            hn = norm(lin(f"{i}.co", y, ca.o.weight, ca.o.bias), scale=m[:, 4], shift=m[:, 3])
            f0, f2 = blk.ffn[0], blk.ffn[2]
            if self.fp8:
                y = lin(f"{i}.ffn2", lin(f"{i}.ffn0", hn, f0.weight, f0.bias), f2.weight, f2.bias, gelu=True)
            elif blk.ffn_first is not None:  # e.g. the GELU-epilogue GEMM (kernels.ffn_first_gelu)
                y = F.linear(blk.ffn_first(f0, hn), f2.weight, f2.bias)
            else:
                y = blk.ffn(hn)
            if i + 1 < len(blocks):
                nxt = mods_of(blocks[i + 1])
                hn = norm(y, gate=m[:, 5], scale=nxt[:, 1], shift=nxt[:, 0])
                m = nxt
            else:
                hm = (model.head.modulation.float().unsqueeze(1) + e.unsqueeze(2)).reshape(b * frames, 2, dim)
                hn = norm(y, gate=m[:, 5], scale=hm[:, 1], shift=hm[:, 0])
        return model.head.head(hn).view(b, length, -1)
