"""Inference speed-ups for ``CausalWanModel``, switched on from outside the model.

The model itself only offers hook points, which these functions fill:

- ``model.inference_trunk``: run gradient-free forwards through a ``trunk.FusedTrunk`` (fused
  elementwise kernels from ``kernels``, optionally FP8 GEMMs from ``fp8``) instead of the block loop;
- ``model.chunk_graphs``: replay KV-cached chunk forwards from CUDA graphs (``graphs.ChunkGraphs``);
- ``Block.ffn_first``: the FFN's first GEMM with a GELU epilogue (``kernels.ffn_first_gelu``);
- ``Block.pre_attention`` / ``Block.post_attention``: torch.compile'd versions of the code around attention.

Each function returns the model, so calls chain: ``use_cuda_graphs(use_fused_kernels(model))``.
"""

from __future__ import annotations

import torch

from .graphs import ChunkGraphs
from .kernels import ffn_first_gelu
from .trunk import FusedTrunk

__all__ = ["ChunkGraphs", "FusedTrunk", "compile_blocks", "fuse_gelu", "use_cuda_graphs", "use_fused_kernels"]


def _drop_recordings(model) -> None:
    if model.chunk_graphs is not None:
        model.chunk_graphs.clear()


def use_fused_kernels(model, enabled: bool = True, fp8: bool = False):
    """Inference trunk with fused elementwise kernels (``kernels``; Triton on CUDA), fused QKV and, on
    CUDA, the FFN GELU epilogue. Gradient-recording forwards keep the plain path.

    ``fp8=True`` (opt-in, less exact) runs the blocks' linear layers as FP8 GEMMs with per-channel
    weight and per-token activation scales (``fp8``); the FP8 weight copies, held by the trunk, are
    extra memory. ``enabled=False`` goes back to the plain block loop (fused QKV and the GELU
    epilogue stay: they do not change the math).
    """
    if enabled:
        model.fuse_qkv()
        fuse_gelu(model)
        trunk = model.inference_trunk
        if isinstance(trunk, FusedTrunk):
            trunk.fp8 = fp8
            if not fp8:
                trunk.fp8_weights = {}
        else:
            model.inference_trunk = FusedTrunk(fp8=fp8)
    else:
        model.inference_trunk = None
    _drop_recordings(model)
    return model


def use_cuda_graphs(model, enabled: bool = True, max_graphs: int = 32, graphs: ChunkGraphs | None = None):
    """Replay each KV-cached block forward from a recorded CUDA graph (``graphs``): the same kernels,
    so the same numbers, without the host's per-kernel launch cost. Used on CUDA for gradient-free
    forwards without history routing; other calls run as before. The graphs keep their own
    activation memory (one shared pool, about one forward's worth).
    ``graphs``: a ready ``ChunkGraphs`` (or subclass) to use instead of a new one."""
    model.chunk_graphs = (graphs or ChunkGraphs(max_graphs)) if enabled else None
    return model


def fuse_gelu(model, enabled: bool = True):
    """On CUDA, run each FFN's first linear layer and its GELU as one GEMM with a GELU epilogue."""
    for blk in model.blocks:
        blk.ffn_first = ffn_first_gelu if enabled else None
    return model


def compile_blocks(model, mode: str | None = None, fullgraph: bool = True):
    """torch.compile the parts of every block around attention (norms, modulation, RoPE, GEMMs,
    cross-attention, FFN). Attention against the cache stays eager, so the compiled graphs see
    the same shapes for every chunk of a video and do not recompile as the cache grows."""
    for blk in model.blocks:
        blk.pre_attention = torch.compile(blk._pre_attention, mode=mode, fullgraph=fullgraph, dynamic=False)
        blk.post_attention = torch.compile(blk._post_attention, mode=mode, dynamic=False,
                                           fullgraph=fullgraph and blk.ffn_first is None)
    return model
