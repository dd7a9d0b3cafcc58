"""Wan 2.1 latent format: raw VAE latents <-> the normalised "model space" the DiT works in.

ComfyUI's ``LATENT["samples"]`` for Wan 2.1 holds RAW VAE latents ``[B, 16, F, H, W]``; core's samplers
normalise them per channel on the way in and undo it on the way out. Self Forcing's model works on the
normalised latents, ``(raw - mean) / std``. The 16 means and standard deviations are the published
Wan 2.1 VAE statistics (the same numbers in Wan's VAE wrapper, Self Forcing and ComfyUI core).

Also here: the frames rule (``latent_frames`` / ``pixel_frames``: the first video frame is a latent frame
of its own, every later latent frame packs ``temporal`` video frames; Wan 2.1: 4, toy codecs: 1), and a
cheap latent -> RGB projection (one 16x3 linear map of normalised latents, the published
Wan 2.1 preview factors) for progress previews without running the VAE.
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4  # Wan 2.1 VAE: video frames per latent frame (after the first frame)
SPATIAL_STRIDE = 8  # Wan 2.1 VAE: pixels per latent pixel


def latent_frames(pixel_frames: int, temporal: int = TEMPORAL_STRIDE) -> int:
    """Latent frames of a video of ``pixel_frames`` frames: 1 + (T - 1) // temporal (Wan: 81 -> 21)."""
    pixel_frames = int(pixel_frames)
    return 0 if pixel_frames <= 0 else 1 + (pixel_frames - 1) // temporal


def pixel_frames(latent_frames: int, temporal: int = TEMPORAL_STRIDE) -> int:
    """Video frames decoded from ``latent_frames`` latent frames: 1 + temporal (n - 1) (Wan: 21 -> 81)."""
    latent_frames = int(latent_frames)
    return 0 if latent_frames <= 0 else 1 + temporal * (latent_frames - 1)

WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Per-channel RGB contributions of a normalised latent, and the RGB bias (output roughly in [-1, 1]).
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def _check(latents: torch.Tensor) -> None:
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"expected Wan 2.1 video latents [batch, 16, frames, height, width], got shape "
            f"{tuple(latents.shape)}; connect a LATENT from a Wan 2.1 VAE (VAEEncode) or a Self Forcing sampler")


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, LATENT_CHANNELS, 1, 1, 1)
    mean = torch.tensor(WAN21_MEAN, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(WAN21_STD, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def to_model_space(raw: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raw Wan 2.1 VAE latents -> normalised model-space latents (computed in float32)."""
    _check(raw)
    mean, std = _stats(raw)
    out = (raw.to(torch.float32) - mean) / std
    return out.to(dtype) if dtype is not None else out


def to_raw(model_space: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Normalised model-space latents -> raw Wan 2.1 VAE latents (what ComfyUI's LATENT holds)."""
    _check(model_space)
    mean, std = _stats(model_space)
    out = model_space.to(torch.float32) * std + mean
    return out.to(dtype) if dtype is not None else out


def latent_to_rgb(model_space: torch.Tensor) -> torch.Tensor:
    """Approximate RGB of normalised latents: [B, 16, F, H, W] -> [B, F, H, W, 3] floats in [0, 1]."""
    _check(model_space)
    x = model_space.detach().to(torch.float32)
    factors = torch.tensor(WAN21_RGB_FACTORS, dtype=torch.float32, device=x.device)  # [16, 3]
    bias = torch.tensor(WAN21_RGB_BIAS, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("bcfhw,cr->bfhwr", x, factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def preview_strip(model_space: torch.Tensor, max_frames: int = 4, scale: int = 4) -> torch.Tensor:
    """A uint8 image [H*scale, n*W*scale, 3] of up to ``max_frames`` frames of batch item 0, side by side.

    Frames are picked evenly over the clip (always including the last; only the last when n = 1).
    Cheap: no VAE involved.
    """
    rgb = latent_to_rgb(model_space[:1])[0]  # [F, H, W, 3]
    frames = rgb.shape[0]
    n = max(1, min(max_frames, frames))
    idx = torch.linspace(0, frames - 1, n).round().long() if n > 1 else torch.tensor([frames - 1])
    strip = torch.cat(list(rgb[idx]), dim=1)  # [H, n*W, 3]
    if scale > 1:
        strip = strip.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return (strip * 255.0).round().to(torch.uint8).cpu()
