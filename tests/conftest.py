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


@pytest.fixture(scope="session")
def cli_frames():
    """``frames(loaded, num_frames, seed)``: the frames ``self-forcing generate`` should write for a toy model
    (latents sampled here, decoded chunk by chunk, quantised to uint8), as a numpy array [T, H, W, 3]."""
    from self_forcing.cli.generate import DEFAULT_PROMPT
    from self_forcing.sf_model.pipeline import frames_to_uint8
    from self_forcing.sf_model.sampler import StreamOptions, generate
    from self_forcing.toy.bundle import encode_prompt, latents_to_video

    def frames(loaded, num_frames: int, seed: int):
        meta = loaded.meta
        opts = StreamOptions(frames_per_block=meta["frames_per_block"], steps=meta["steps"], shift=meta["shift"],
                             warp=meta["warp"], context_noise=meta["context_noise"], partial_last_chunk=True)
        ctx = encode_prompt(loaded, DEFAULT_PROMPT, "cpu")
        h, w = meta["toy"]["latent_size"]
        lat = generate(loaded.model, ctx, num_frames=num_frames, height=h, width=w, seed=seed, options=opts)
        chunks = [frames_to_uint8(latents_to_video(loaded, lat[:, :, s:s + 3]))[0] for s in range(0, num_frames, 3)]
        return torch.cat(chunks).numpy()

    return frames
