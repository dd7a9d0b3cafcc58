"""Rollouts longer than the loss window: the official trainer's >21-frame path, reusable.

The official Self Forcing trainer (``model/base.py`` ``_run_generator``) can roll the student out for more
latent frames than the bidirectional scores were trained on (``num_training_frames`` > 21): the number of
blocks is drawn uniformly between the window's and the maximum, only the blocks of the last 21 frames record
gradient at their exit step, and the DMD / critic losses see only those last 21 frames. The window's first
latent frame is then not what the bidirectional model expects at a clip's start (Wan encodes a clip's first
pixel frame alone, as an image latent), so it is replaced: decode the rollout up to and including that frame,
take the last pixel frame, and encode it alone as a one-frame image latent (no gradient). The first block of
the window, which holds it, is left out of the DMD loss.

``loss_window`` does the slicing and the re-encoding for any start and length (Self-Forcing++'s window DMD
re-noises windows of a long rollout with it); ``ToyReencoder`` plays the VAE for the toy codec,
``VaeReencoder`` is the Wan2.1 VAE on model-space latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ToyReencoder:
    """The toy codec as the VAE: latent frame -> pixel frame -> latent. The codec has no temporal state (one
    latent frame per pixel frame), so only the prefix's last latent frame is decoded."""

    def __init__(self, codec):
        if getattr(codec, "temporal_factor", 1) != 1:
            raise ValueError("ToyReencoder needs a codec without temporal compression")
        self.codec = codec

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        last = prefix[:, :, -1:].to(self.codec.matrix.device)
        pixels = self.codec.decode(last.float()).clamp(-1, 1)
        return self.codec.encode(pixels).to(device=prefix.device, dtype=prefix.dtype)


class VaeReencoder:
    """The Wan2.1 VAE on model-space latents: decode the prefix (chunk by chunk through the VAE's causal
    stream, keeping only the last chunk's pixels), take its last pixel frame, encode it alone (an image
    latent) and normalise it back to model space."""

    def __init__(self, vae, chunk: int = 4):
        self.vae, self.chunk = vae, int(chunk)

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        from ..sf_model.latent_format import to_model_space, to_raw

        raw = to_raw(prefix.detach()).to(device=self.vae.device, dtype=self.vae.dtype)
        stream = self.vae.stream_decoder(clamp=True)
        pixels = None
        for s in range(0, raw.shape[2], self.chunk):
            pixels = stream.push(raw[:, :, s:s + self.chunk])
        frame = pixels[:, :, -1:]
        latent = self.vae.encode(frame)  # one pixel frame -> one (image) latent frame
        return to_model_space(latent).to(device=prefix.device, dtype=prefix.dtype)


@dataclass
class LossWindow:
    """``video`` [B, C, length, H, W]: the window the scores see; ``loss_from``: its first frame that carries
    the DMD loss (the first block is left out when its first latent was re-encoded)."""

    video: torch.Tensor
    loss_from: int = 0
    reencoded: bool = False


def loss_window(video: torch.Tensor, start: int, length: int, *, reencode_first=None,
                masked_frames: int = 0) -> LossWindow:
    """Frames [start, start + length) of a rollout ``video`` [B, C, F, H, W] as the scores' clip.

    ``reencode_first``: None keeps the latents as they are; a re-encoder (``ToyReencoder``, ``VaeReencoder`` or
    any callable prefix -> [B, C, 1, H, W]) replaces the window's first latent by the image latent of its last
    pixel frame, decoded from ``video[:, :, :start + 1]`` -- without gradient -- when the window does not start
    the video (``start`` > 0). Then the first ``masked_frames`` frames (the official trainer: one block) are
    left out of the DMD loss (``loss_from``). The other frames keep their gradient path.
    """
    frames = video.shape[2]
    if not (0 <= start and length >= 1 and start + length <= frames):
        raise ValueError(f"window [{start}, {start + length}) is outside the video's {frames} frames")
    window = video[:, :, start:start + length]
    if reencode_first is None or start == 0:
        return LossWindow(window, 0, False)
    with torch.no_grad():
        first = reencode_first(video[:, :, :start + 1].detach())
    if first.shape[2] != 1 or first.shape[:2] != video.shape[:2] or first.shape[3:] != video.shape[3:]:
        raise ValueError(f"the re-encoder returned {tuple(first.shape)}, expected one latent frame like "
                         f"{tuple(video[:, :, :1].shape)}")
    out = torch.cat([first.to(window.dtype), window[:, :, 1:]], dim=2)
    return LossWindow(out, min(int(masked_frames), length), True)


def draw_rollout_frames(window: int, max_frames: int, frames_per_block: int, value: torch.Generator) -> int:
    """The official rollout length: a whole number of blocks drawn uniformly in [window, max_frames]."""
    lo, hi = window // frames_per_block, max_frames // frames_per_block
    return int(torch.randint(lo, hi + 1, (), generator=value)) * frames_per_block
