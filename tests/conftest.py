"""Shared fixtures: tiny random causal Wan models (CPU, float32)."""

import pytest
import torch

from self_forcing.sf_model.config import TINY, WanConfig
from self_forcing.sf_model.model import CausalWanModel


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (norm gains and modulation included) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm3.weight" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def build_tiny(config: WanConfig = TINY, seed: int = 0, dtype=torch.float32) -> CausalWanModel:
    torch.manual_seed(seed)
    model = CausalWanModel(config, attn_backend="sdpa")
    randomize_(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture
def tiny_model():
    return build_tiny()


@pytest.fixture
def make_tiny():
    return build_tiny
