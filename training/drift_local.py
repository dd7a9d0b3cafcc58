"""Minimal per-frame drift metrics of toy videos (used when ``training.drift`` is absent).

A toy frame should hold only the prompt's colours: a plain background and each named object. Per frame:

- ``palette_error``: mean RGB distance of every pixel to the nearest prompt colour (0 for a clean render
  apart from antialiased edges);
- ``off_palette``: fraction of pixels farther than 0.25 from every prompt colour (artefacts, smears);
- ``background_error``: RGB distance of the frame's median background-ish pixel to the prompt's background;
- ``missing_objects``: fraction of the prompt's objects with fewer than ``min_pixels`` pixels of their colour.
"""

from __future__ import annotations

import torch

OFF_PALETTE = 0.25
NEAR = 0.2


def per_frame_drift(video: torch.Tensor, prompts: list[str], min_pixels: int = 12) -> dict[str, torch.Tensor]:
    """video [B, 3, T, H, W] in [-1, 1]; returns {metric: [B, T]} (float64)."""
    from .toyworld import colour_rgb, parse_prompt

    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [batch, 3, frames, height, width], got {tuple(video.shape)}")
    if len(prompts) != video.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {video.shape[0]} videos")
    px = ((video.double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, T, H, W, 3]
    out = {k: torch.zeros(video.shape[0], video.shape[2], dtype=torch.float64)
           for k in ("palette_error", "off_palette", "background_error", "missing_objects")}
    for b, prompt in enumerate(prompts):
        attr = parse_prompt(prompt)
        bg = torch.tensor(colour_rgb(attr.background), dtype=torch.float64)
        objs = torch.tensor([colour_rgb(c) for c, _ in attr.objects], dtype=torch.float64)
        palette = torch.cat([bg[None], objs])                       # [K, 3]
        d = (px[b][..., None, :] - palette).norm(dim=-1)             # [T, H, W, K]
        nearest = d.min(-1).values
        out["palette_error"][b] = nearest.mean((1, 2))
        out["off_palette"][b] = (nearest > OFF_PALETTE).double().mean((1, 2))
        bg_d = d[..., 0].flatten(1)                                  # [T, HW]
        out["background_error"][b] = bg_d.median(dim=1).values
        counts = (d[..., 1:] < NEAR).flatten(1, 2).sum(1)            # [T, objects]
        out["missing_objects"][b] = (counts < min_pixels).double().mean(1)
    return out
