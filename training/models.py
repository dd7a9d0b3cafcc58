"""Building, initialising, saving and loading the DiTs of the trainer (teacher, critic, student).

All three share one architecture (a ``CausalWanModel``); the teacher and the critic run it bidirectionally
(``frames_per_block=None``), the student block-causally. Stage outputs are safetensors written with
``sf_model.checkpoint.save_model`` (bare Wan keys + our metadata, with ``role`` saying which model it is),
so every stage's output also loads in the nodes and the CLI.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..sf_model.checkpoint import load_model, save_model
from ..sf_model.config import WanConfig
from ..sf_model.model import CausalWanModel


def init_wan_weights(model: CausalWanModel, seed: int) -> CausalWanModel:
    """Wan's initialisation for training from scratch: Xavier-uniform linears and patch embedding,
    N(0, 0.02) text/time embeddings, zero biases, a zero output head (the first prediction is 0)."""
    g = torch.Generator().manual_seed(int(seed))

    def xavier_(w: torch.Tensor) -> None:
        fan_out, fan_in = w.shape[0], w[0].numel()
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                xavier_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        for seq in (model.text_embedding, model.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for blk in model.blocks:
            blk.modulation.copy_(torch.randn(blk.modulation.shape, generator=g) / model.config.dim ** 0.5)
        model.head.modulation.copy_(torch.randn(model.head.modulation.shape, generator=g) / model.config.dim ** 0.5)
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    return model


def build_model(config: WanConfig, seed: int, device: torch.device) -> CausalWanModel:
    """A freshly initialised float32 model on ``device`` (same weights for the same seed everywhere)."""
    model = CausalWanModel(config, attn_backend="sdpa")
    init_wan_weights(model, seed)
    return model.to(device=device, dtype=torch.float32)


def load_dit(path: str, device: torch.device, trainable: bool = False) -> tuple[CausalWanModel, dict]:
    """Load any checkpoint sf_model reads as a float32 model; returns (model, metadata)."""
    loaded = load_model(path, device=device, dtype=torch.float32, attn_backend="sdpa")
    model = loaded.model
    if trainable:
        model.train().requires_grad_(True)
    return model, loaded.meta


def frozen_copy(model: CausalWanModel) -> CausalWanModel:
    """A non-trainable copy (the real score)."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def save_dit(path: str, model: nn.Module, config: WanConfig, role: str, meta: dict | None = None,
             dtype: torch.dtype | None = None, extras: dict | None = None) -> None:
    """Write a stage's model (atomic, via ``save_model``) with ``role`` in the metadata."""
    save_model(path, model, config, meta={"role": role, **(meta or {})}, dtype=dtype, extras=extras)
