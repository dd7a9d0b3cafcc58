"""Attention backends behind one function.

``attention(q, k, v, backend)`` takes and returns Wan's layout [B, L, heads, head_dim]. Backends:
flash-attn 3 (``flash_attn_interface``) or 2 (``flash_attn``) when importable on CUDA, PyTorch SDPA
otherwise (which itself picks cuDNN / flash / memory-efficient kernels on CUDA). All compute the same
softmax attention with scale 1/sqrt(head_dim). Masked attention (the block-causal training view) goes
through ``masked_attention`` with a mask from ``sf_model.mask``: a dense boolean mask for SDPA, or a
FlexAttention block mask on CUDA.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash3", "flash2")


@lru_cache(maxsize=None)
def _flash_module(name: str):
    try:
        if name == "flash3":
            return importlib.import_module("flash_attn_interface")
        if name == "flash2":
            return importlib.import_module("flash_attn")
    except Exception:  # ImportError, or a broken binary build raising OSError/RuntimeError
        return None
    return None


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` in this environment (``sdpa`` always)."""
    out = []
    if torch.device(device).type == "cuda":
        out += [b for b in ("flash3", "flash2") if _flash_module(b) is not None]
    return out + ["sdpa"]


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn 'auto' into the fastest available backend; refuse one that cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose one of {', '.join(BACKENDS)}")
    avail = available_backends(device)
    if name == "auto":
        return avail[0]
    if name not in avail:
        raise ValueError(
            f"attention backend '{name}' is not available on {device} (available: {', '.join(avail)}); "
            "install flash-attn for CUDA, or choose 'sdpa'")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Unmasked attention over [B, L, H, D] tensors; returns [B, Lq, H, D]."""
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    mod = _flash_module(backend)
    if mod is None:
        raise ValueError(f"attention backend '{backend}' is not importable")
    out = mod.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def attention_bhld(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, H, L, D] tensors (used where keys differ per head, e.g. history routing)."""
    return F.scaled_dot_product_attention(q, k, v)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Attention under a mask: a dense bool tensor [Lq, Lk] (True = attend) or a FlexAttention BlockMask."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = _compiled_flex()(qt, kt, vt, block_mask=mask)
    return out.transpose(1, 2)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
