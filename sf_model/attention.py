"""Attention backends behind one function.

``attention(q, k, v, backend)`` takes and returns Wan's layout [B, L, heads, head_dim]. Backends:
flash-attn 3 (``flash_attn_interface``) or 2 (``flash_attn``) when importable on CUDA, FlashInfer's Hopper
("fa3") prefill kernel (``flashinfer``, the optional ``flashinfer`` extra) when importable on an sm90 GPU,
PyTorch SDPA otherwise (which itself picks cuDNN / flash / memory-efficient kernels on CUDA). ``auto`` takes
the first available of flash3, flashinfer, flash2, sdpa. All compute the same softmax attention with scale
1/sqrt(head_dim); FlashInfer and flash-attn run fp16/bf16 only, other dtypes (float32) go through SDPA.
FlashInfer compiles its kernel on first use (JIT, about 1.5 min with nvcc) and keeps the build in its
on-disk cache (``~/.cache/flashinfer`` unless ``FLASHINFER_WORKSPACE_BASE`` says otherwise). Masked attention (the block-causal training view) goes
through ``masked_attention`` with a mask from ``sf_model.mask``: a dense boolean mask for SDPA, or a
FlexAttention block mask on CUDA.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash3", "flash2", "flashinfer")
_MODULES = {"flash3": "flash_attn_interface", "flash2": "flash_attn", "flashinfer": "flashinfer"}
HALF = (torch.float16, torch.bfloat16)


@lru_cache(maxsize=None)
def _flash_module(name: str):
    try:
        return importlib.import_module(_MODULES[name]) if name in _MODULES else None
    except Exception:  # ImportError, or a broken binary build raising OSError/RuntimeError
        return None


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The (major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` in this environment, fastest first (``sdpa`` always)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["sdpa"]
    out = ["flash3"] if _flash_module("flash3") is not None else []
    if _flash_module("flashinfer") is not None and cuda_capability(device)[0] == 9:  # Hopper (sm90) kernel
        out.append("flashinfer")
    if _flash_module("flash2") is not None:
        out.append("flash2")
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
            "install flash-attn for CUDA (or the 'flashinfer' extra on an sm90 GPU), or choose 'sdpa'")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Unmasked attention over [B, L, H, D] tensors; returns [B, Lq, H, D]."""
    if backend == "sdpa" or (backend == "flashinfer" and q.dtype not in HALF):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "flashinfer":
        return flashinfer_attention(q, k, v)
    mod = _flash_module(backend)
    if mod is None:
        raise ValueError(f"attention backend '{backend}' is not importable")
    out = mod.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def flashinfer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashInfer's single-request prefill kernel on Hopper ("fa3"), one call per batch element: q [Lq, H, D]
    against k/v [Lk, H, D] in its "NHD" layout (a batch element of Wan's layout: no copy unless strided), not
    causal, default scale 1/sqrt(head_dim)."""
    mod = _flash_module("flashinfer")
    if mod is None:
        raise ValueError("attention backend 'flashinfer' is not importable (pip install 'flashinfer-python')")
    # .contiguous(): a no-op except for strided views (v sliced from a fused qkv GEMM)
    outs = [mod.single_prefill_with_kv_cache(q[b].contiguous(), k[b].contiguous(), v[b].contiguous(),
                                             causal=False, kv_layout="NHD", backend="fa3")
            for b in range(q.shape[0])]
    return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


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
