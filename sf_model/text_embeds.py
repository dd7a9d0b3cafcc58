"""Prompt embeddings on disk: one safetensors file holding text-encoder states [B, tokens, dim].

Written by the 'Save Text Embeddings' node and read by the nodes, the CLI (``--embeds``) and the trainer's
Wan data source, so a prompt encoded once with umT5-XXL is reused without loading the 11 GB encoder again.
"""

from __future__ import annotations

import json
import os

import torch

EMBED_FORMAT = "self_forcing.text_embeds"
EMBED_KEY = "context"


def save_text_embeds(path: str, context: torch.Tensor, meta: dict | None = None) -> None:
    """Write a prompt tensor to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    from .checkpoint import publish

    if context.ndim != 3:
        raise ValueError(f"text embeddings must be [batch, tokens, dim], got shape {tuple(context.shape)}")
    info = {"format": EMBED_FORMAT, "shape": list(context.shape), **(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({EMBED_KEY: context.detach().cpu().contiguous()}, tmp, metadata={EMBED_FORMAT: json.dumps(info)})
    publish(tmp, path)


def load_text_embeds(path: str) -> tuple[torch.Tensor, dict]:
    """Read a file written by ``save_text_embeds`` -> (tensor [B, tokens, dim], metadata)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"text embeddings file not found: {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        if EMBED_KEY not in keys:
            raise ValueError(f"{os.path.basename(path)} is not a text-embeddings file (tensors: {keys[:5]}); "
                             "create one with 'Save Text Embeddings'")
        tensor = f.get_tensor(EMBED_KEY)
    info = json.loads(meta[EMBED_FORMAT]) if EMBED_FORMAT in meta else {}
    if tensor.ndim != 3:
        raise ValueError(f"{os.path.basename(path)}: embeddings must be [batch, tokens, dim], got {tuple(tensor.shape)}")
    return tensor, info
