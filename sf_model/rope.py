"""Wan's 3-D rotary position embedding (frames, height, width), computed in real arithmetic.

Wan splits the head's complex pairs across the three axes (22/21/21 for head_dim 128) with theta 10000
and rotates adjacent channel pairs. The official code builds complex float64 tables; here the angles are
computed in float64 (on the CPU, once per position) and cos/sin are kept in float32, which gives the
same rotation without complex or float64 arithmetic on the device.
"""

from __future__ import annotations

import torch


def axis_inv_freq(pairs: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of one axis with ``pairs`` complex pairs (Wan's rope_params), float64."""
    d = 2 * pairs
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64),
                           torch.arange(0, d, 2, dtype=torch.float64) / d)


class Rope3D:
    """Builds cos/sin tables for a grid of frames x height x width token positions.

    Tables are cached per (start_frame, frames, height, width, device), so the hot loop only indexes
    dictionaries; building one touches the device once (a copy from the CPU, no host sync).
    """

    def __init__(self, head_dim: int, split: tuple[int, int, int], theta: float, max_frames: int):
        if sum(split) * 2 != head_dim:
            raise ValueError(f"RoPE split {split} does not cover head_dim {head_dim}")
        self.head_dim = head_dim
        self.split = split
        self.theta = theta
        self.max_frames = max_frames
        self.inv_freq = [axis_inv_freq(p, theta) for p in split]
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, start_frame: int, frames: int, height: int, width: int) -> torch.Tensor:
        """Rotation angles [frames*height*width, head_dim/2] in float64 on the CPU."""
        f = torch.arange(start_frame, start_frame + frames, dtype=torch.float64)
        h = torch.arange(height, dtype=torch.float64)
        w = torch.arange(width, dtype=torch.float64)
        af = torch.outer(f, self.inv_freq[0])  # [F, pf]
        ah = torch.outer(h, self.inv_freq[1])  # [H, ph]
        aw = torch.outer(w, self.inv_freq[2])  # [W, pw]
        grid = (frames, height, width)
        parts = [
            af[:, None, None, :].expand(*grid, -1),
            ah[None, :, None, :].expand(*grid, -1),
            aw[None, None, :, :].expand(*grid, -1),
        ]
        return torch.cat(parts, dim=-1).reshape(frames * height * width, -1)

    def check_frames(self, start_frame: int, frames: int, extend: bool = False) -> None:
        end = start_frame + frames
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        if end > self.max_frames and not extend:
            raise ValueError(
                f"latent frames {start_frame}..{end - 1} go beyond the model's {self.max_frames} absolute "
                f"RoPE positions (Wan's table). Generate at most {self.max_frames} latent frames, or allow "
                "extended positions (StreamOptions(extend_positions=True)); RoPE only sees position "
                "differences, so extended positions are exact, but the model never saw such distances "
                "beyond its attention window")

    def cos_sin(self, start_frame: int, frames: int, height: int, width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [1, L, 1, head_dim/2] float32 on ``device``."""
        key = (start_frame, frames, height, width, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        a = self.angles(start_frame, frames, height, width)
        cos = torch.cos(a).to(torch.float32)[None, :, None, :]
        sin = torch.sin(a).to(torch.float32)[None, :, None, :]
        if len(self._cache) > 256:
            self._cache.clear()
        out = (cos.to(device), sin.to(device))
        self._cache[key] = out
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, L, H, D] by the angles in cos/sin [1, L, 1, D/2].

    Computed in float32 and returned in x's dtype (Wan computes it in float64 complex).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
