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
    cpu = torch.device("cpu")  # explicit: models are built under a meta-device context when loading
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64, device=cpu),
                           torch.arange(0, d, 2, dtype=torch.float64, device=cpu) / d)


class Rope3D:
    """cos/sin tables for grids of frames x height x width token positions.

    Per device it keeps a temporal table of a fixed number of positions (moved along with a long stream) and
    one spatial table per resolution; a block's table is assembled from slices on the device, so memory
    stays flat however many blocks are generated and nothing is copied from the host per forward.
    """

    def __init__(self, head_dim: int, split: tuple[int, int, int], theta: float, max_frames: int):
        if sum(split) * 2 != head_dim:
            raise ValueError(f"RoPE split {split} does not cover head_dim {head_dim}")
        self.head_dim = head_dim
        self.split = split
        self.theta = theta
        self.max_frames = max_frames
        self.inv_freq = [axis_inv_freq(p, theta) for p in split]
        self._temporal: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._spatial: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _cos_sin(angles: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)

    def angles(self, start_frame: int, frames: int, height: int, width: int) -> torch.Tensor:
        """Rotation angles [frames*height*width, head_dim/2] in float64 on the CPU (reference form)."""
        f = torch.arange(start_frame, start_frame + frames, dtype=torch.float64, device="cpu")
        h = torch.arange(height, dtype=torch.float64, device="cpu")
        w = torch.arange(width, dtype=torch.float64, device="cpu")
        grid = (frames, height, width)
        parts = [
            torch.outer(f, self.inv_freq[0])[:, None, None, :].expand(*grid, -1),
            torch.outer(h, self.inv_freq[1])[None, :, None, :].expand(*grid, -1),
            torch.outer(w, self.inv_freq[2])[None, None, :, :].expand(*grid, -1),
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

    def temporal(self, start: int, end: int, device) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(first position, cos, sin) of a temporal table on ``device`` that covers positions [start, end).

        The table holds a fixed number of positions (the model's ``max_frames``, or twice the request if that
        is longer) beginning at some frame: when a stream moves past its end it is rebuilt from the new
        start, so its memory stays flat however long the stream runs (angles always come from the absolute
        position in float64, so the numbers are those of one big table).
        """
        key = str(device)
        entry = self._temporal.get(key)
        if entry is None or start < entry[0] or end > entry[0] + entry[1].shape[0]:
            base, size = start, max(self.max_frames, 2 * (end - start), 1)
            pos = torch.arange(base, base + size, dtype=torch.float64, device="cpu")
            entry = (base, *self._cos_sin(torch.outer(pos, self.inv_freq[0]), device))
            self._temporal[key] = entry
        return entry

    def spatial(self, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, str(device))
        table = self._spatial.get(key)
        if table is None:
            ah = torch.outer(torch.arange(height, dtype=torch.float64, device="cpu"), self.inv_freq[1])
            aw = torch.outer(torch.arange(width, dtype=torch.float64, device="cpu"), self.inv_freq[2])
            a = torch.cat([ah[:, None, :].expand(height, width, -1), aw[None, :, :].expand(height, width, -1)], -1)
            table = self._cos_sin(a.reshape(height * width, -1), device)
            if len(self._spatial) > 16:
                self._spatial.clear()
            self._spatial[key] = table
        return table

    def cos_sin(self, start_frame: int, frames: int, height: int, width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [1, frames*height*width, 1, head_dim/2] float32 on ``device``."""
        base, tcos, tsin = self.temporal(start_frame, start_frame + frames, device)
        scos, ssin = self.spatial(height, width, device)
        hw = height * width

        def assemble(t, s):
            t = t[start_frame - base:start_frame - base + frames, None, :].expand(frames, hw, -1)
            s = s[None].expand(frames, hw, -1)
            return torch.cat([t, s], dim=-1).reshape(1, frames * hw, 1, -1)

        return assemble(tcos, scos), assemble(tsin, ssin)


    def temporal_shift(self, delta: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [head_dim/2] (float32 on ``device``) of a rotation by ``delta`` temporal positions.

        The temporal pairs turn by ``delta * inv_freq`` (angles in float64 on the CPU), the height/width pairs not at
        all. RoPE rotations of a pair compose by adding angles, so ``apply_rope(k_at_p, *temporal_shift(d))`` is the
        key of position ``p + d`` (up to float32 rounding): a cached, already rotated key moves to another
        temporal position without its un-rotated value (``sf_model.positions``).
        """
        t = float(int(delta)) * self.inv_freq[0]
        rest = torch.zeros(sum(self.split[1:]), dtype=torch.float64, device="cpu")
        return self._cos_sin(torch.cat([t, rest]), device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, L, H, D] by the angles in cos/sin [1, L, 1, D/2] (or anything that
    broadcasts against [..., D/2], e.g. one rotation [D/2] for every token: ``Rope3D.temporal_shift``).

    Computed in float32 and returned in x's dtype (Wan computes it in float64 complex).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
