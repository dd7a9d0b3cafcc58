"""A fixed, lossless, Wan-like latent codec for toy-world videos.

encode: video [B, 3, T, H, W] in [-1, 1]
  -> subtract a fixed per-RGB mean
  -> pixel unshuffle by 2 per frame: [B, 12, T, H/2, W/2]
  -> a fixed 16 x 12 matrix with orthonormal columns, times a fixed scale: [B, 16, T, H/2, W/2].
decode is the exact left inverse (transpose, unscale, shuffle, add the mean). No temporal compression:
one latent frame is one pixel frame. Latents the model makes off the 12-dimensional image of the map
are projected onto it by decode.

The matrix is (16-point Hadamard, first 12 columns) x (opponent colour basis (x) 2x2 Haar basis). The
Haar/opponent step separates block means from details; the Hadamard step spreads every coefficient's
energy equally over the 16 channels, so all latent channels have nearly the same variance. The mean and
scale were measured on 1024 toy clips of 8 frames (``iterate_batches(64, 8, seed=123)``): per-RGB mean
(-0.656, -0.723, -0.619); latent channel variance before scaling 0.092-0.141 (mean 0.1135), so a scale
of 3.0 gives latents of standard deviation 0.9-1.1 per channel and mean about 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 2
TEMPORAL_FACTOR = 1
PIXEL_MEAN = (-0.66, -0.72, -0.62)
LATENT_SCALE = 3.0


def codec_matrix() -> torch.Tensor:
    """The fixed [16, 12] float64 matrix with orthonormal columns (acting on pixel-unshuffled channels)."""
    colour = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)  # luminance + two opponent axes
    # Rows over the 2x2 block positions (unshuffle order: (0,0), (0,1), (1,0), (1,1)): mean, dx, dy, dxy.
    haar = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
    basis = torch.kron(colour, haar)  # unshuffle channel order is colour * 4 + position
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(4):  # Sylvester construction of the 16-point Hadamard matrix
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / 4)[:, :12] @ basis


class ToyCodec(nn.Module):
    """Fixed invertible codec; its matrix, mean and scale are buffers (saved in ``state_dict``)."""

    latent_channels = LATENT_CHANNELS
    spatial_factor = SPATIAL_FACTOR
    temporal_factor = TEMPORAL_FACTOR

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"ToyCodec needs a floating dtype, got {dtype}")
        self.register_buffer("matrix", codec_matrix().to(device=device, dtype=dtype))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN, device=device, dtype=dtype))
        self.register_buffer("scale", torch.tensor(LATENT_SCALE, device=device, dtype=dtype))

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} expects [B, {channels}, T, H, W], got shape {tuple(x.shape)}")
        if x.device != self.matrix.device:
            raise ValueError(f"input is on {x.device} but the codec is on {self.matrix.device}; "
                             "move one of them (codec.to(device) or x.to(device))")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> latents [B, 16, T, H/2, W/2] in the codec's dtype."""
        self._check(video, 3, "encode")
        B, C, T, H, W = video.shape
        if H % SPATIAL_FACTOR or W % SPATIAL_FACTOR:
            raise ValueError(f"frame size {H}x{W} must be divisible by {SPATIAL_FACTOR}")
        x = video.to(self.matrix.dtype) - self.pixel_mean[None, :, None, None, None]
        x = F.pixel_unshuffle(x.transpose(1, 2).reshape(B * T, C, H, W), SPATIAL_FACTOR)
        z = torch.einsum("oc,nchw->nohw", self.matrix, x) * self.scale
        return z.reshape(B, T, LATENT_CHANNELS, H // 2, W // 2).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] -> video [B, 3, T, 2h, 2w] (not clamped) in the codec's dtype."""
        self._check(latents, LATENT_CHANNELS, "decode")
        B, C, T, h, w = latents.shape
        z = latents.to(self.matrix.dtype).transpose(1, 2).reshape(B * T, C, h, w) / self.scale
        x = F.pixel_shuffle(torch.einsum("oc,nohw->nchw", self.matrix, z), SPATIAL_FACTOR)
        x = x.reshape(B, T, 3, h * 2, w * 2).transpose(1, 2)
        return x + self.pixel_mean[None, :, None, None, None]

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a video of that size."""
        return (LATENT_CHANNELS, num_frames // TEMPORAL_FACTOR, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR)
