"""CONDITIONING <-> text-embedding tensors, and text embeddings on disk (no ComfyUI import).

A core CONDITIONING is a list of ``[tensor [B, tokens, dim], {extra...}]`` entries. For Wan the tensor
holds umT5-XXL hidden states (dim 4096), zero-padded to at least 512 tokens by core's tokenizer.
"""

from __future__ import annotations

import os
import re

import torch

from ..sf_model.text_embeds import EMBED_FORMAT, EMBED_KEY, load_text_embeds, save_text_embeds  # noqa: F401

def tensor_of(conditioning) -> torch.Tensor:
    """The prompt tensor [B, tokens, dim] of a one-prompt CONDITIONING."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("the conditioning is empty; connect a CONDITIONING from CLIPTextEncode (CLIPLoader type "
                         "'wan') or 'Load Text Embeddings'")
    if len(conditioning) > 1:
        raise ValueError(f"the conditioning holds {len(conditioning)} prompts (ConditioningCombine?); Self Forcing "
                         "takes one prompt: connect a single CLIPTextEncode")
    entry = conditioning[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) else entry
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"the conditioning is not a text-encoder output [batch, tokens, dim] (got {shape})")
    return tensor


def context_from_conditioning(conditioning, text_dim: int, text_len: int) -> torch.Tensor:
    """The prompt tensor [B, <=text_len, text_dim] of a one-prompt CONDITIONING (float32, on its device).

    Tokens beyond ``text_len`` are dropped (Wan truncates prompts to 512 tokens).
    """
    tensor = tensor_of(conditioning)
    if tensor.shape[-1] != text_dim:
        raise ValueError(
            f"positive has width {tensor.shape[-1]} but the model expects {text_dim}: encode the prompt with the "
            "umT5-XXL text encoder (CLIPLoader type 'wan', umt5_xxl_fp8_e4m3fn_scaled.safetensors)")
    return tensor[:, :text_len].to(torch.float32)


def conditioning_from_context(context: torch.Tensor) -> list:
    """Wrap a prompt tensor [B, tokens, dim] as a core CONDITIONING."""
    if context.ndim != 3:
        raise ValueError(f"text embeddings must be [batch, tokens, dim], got shape {tuple(context.shape)}")
    return [[context, {"pooled_output": None}]]


_SAFE = re.compile(r"[^A-Za-z0-9._\-/ ]")


def next_embed_path(folder: str, prefix: str) -> tuple[str, str]:
    """A new file path ``folder/prefix_00001.safetensors`` (counter past existing files).

    Returns (absolute path, path relative to ``folder``). Refuses prefixes that leave ``folder``.
    """
    prefix = (prefix or "prompt").strip().replace("\\", "/")
    prefix = _SAFE.sub("_", prefix).strip("/") or "prompt"
    root = os.path.abspath(folder)
    sub, base = os.path.split(prefix)
    target_dir = os.path.abspath(os.path.join(root, sub))
    if os.path.commonpath([root, target_dir]) != root:
        raise ValueError(f"filename_prefix '{prefix}' points outside {root}; use a relative name like 'cats/walk'")
    os.makedirs(target_dir, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d{5})\.safetensors$")
    used = [int(m.group(1)) for name in os.listdir(target_dir) if (m := pattern.match(name))]
    name = f"{base}_{max(used, default=0) + 1:05d}.safetensors"
    path = os.path.join(target_dir, name)
    return path, os.path.relpath(path, root).replace(os.sep, "/")
