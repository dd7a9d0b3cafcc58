"""Building blocks of the Wan2.1 VAE, written so that one call processes many frames.

Every temporal operation in the Wan2.1 VAE is causal, so a video can be processed in one pass
or in consecutive chunks with a small per-layer cache. The cache is EXPLICIT: each layer that
needs one owns a slot index into a plain Python list (``cache``) handed in by the caller; an
entry of ``None`` means "the stream has not started" (equivalent to zero padding in front).
Layers read their slot and overwrite it with the state needed by the next chunk, so decoding
chunk by chunk gives the same numbers as decoding the whole video at once.

Parameter names follow the original Wan2.1 code (``residual.0.gamma``, ``residual.2.weight``,
``resample.1.weight``, ``time_conv.weight`` ...), which is why some containers are
``nn.Sequential`` objects padded with parameter-free ``nn.Identity`` entries: the indices are
part of the checkpoint key names. Those containers are never called as a sequence.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Cache = List[Optional[torch.Tensor]]

# Temporal context a kernel-3 causal convolution needs from the previous chunk.
CAUSAL_CONTEXT = 2


def indexed(modules: Mapping[int, nn.Module]) -> nn.Sequential:
    """An ``nn.Sequential`` holding ``modules`` at the given indices (parameter-free fillers elsewhere)."""
    size = max(modules) + 1
    return nn.Sequential(*[modules.get(i, nn.Identity()) for i in range(size)])


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (a free view for channels-last-3d tensors)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W] (a view; channels-last 2-D becomes channels-last-3d)."""
    bt, c, h, w = x.shape
    return x.view(batch, bt // batch, c, h, w).transpose(1, 2)


def zero_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` zero frames shaped like ``x``'s frames, in ``x``'s memory layout."""
    zero = torch.zeros_like(x[:, :, :1])
    return zero.expand(-1, -1, n, -1, -1).clone() if n > 1 else zero


class RMSNorm(nn.Module):
    """Wan's RMS_norm: ``x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`` (no bias).

    ``images=False`` stores gamma as [C, 1, 1, 1] (for 5-D video tensors), ``images=True`` as
    [C, 1, 1] (for 4-D frame tensors); the shapes are part of the checkpoint format.

    Computed as ``F.rms_norm`` over the channel axis moved last (x * rsqrt(mean(x^2) + eps) with
    eps = 1e-24 / C, the same function up to rounding): one fused kernel on CUDA, statistics
    in float32 for bf16/fp16 inputs. The result is channels-last in memory.
    """

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.dim = dim
        self.eps = 1e-24 / dim
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        y = F.rms_norm(x.movedim(1, -1), (self.dim,), self.gamma.view(self.dim), self.eps)
        if silu:
            y = F.silu(y, inplace=True)
        return y.movedim(-1, 1)


class CausalConv3d(nn.Conv3d):
    """3-D convolution that is causal in time and 'same'-padded in space.

    A kernel of temporal size ``k`` sees the current frame and the ``k-1`` previous ones; frames
    before the start of the stream are zeros (as in Wan). With ``k > 1`` the layer keeps the last
    ``k-1`` input frames in ``cache[self.slot]``.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size=3):
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_dim, out_dim, ks, padding=(0, ks[1] // 2, ks[2] // 2))
        self.context = ks[0] - 1
        self.needs_cache = self.context > 0
        self.slot = -1

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        if self.context == 0:
            return self._conv_forward(x, self.weight, self.bias)
        prev = cache[self.slot]
        if prev is None:
            prev = zero_frames(x, self.context)
        x = torch.cat([prev, x], dim=2)
        cache[self.slot] = x[:, :, -self.context :].clone()
        return self._conv_forward(x, self.weight, self.bias)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv3x3x3 -> norm -> SiLU -> causal conv3x3x3, plus a shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.residual = indexed(
            {
                0: RMSNorm(in_dim, images=False),
                2: CausalConv3d(in_dim, out_dim, 3),
                3: RMSNorm(out_dim, images=False),
                6: CausalConv3d(out_dim, out_dim, 3),
            }
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        r = self.residual
        h = r[2](r[0](x, silu=True), cache)
        h = r[6](r[3](h, silu=True), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        f = self.to_qkv(self.norm(frames_to_batch(x)))  # [B*T, 3C, H, W]
        f = f.permute(0, 2, 3, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = f.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        o = o.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        return batch_to_frames(self.proj(o), b) + x


def interleave_time(y: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: frame 2t+j takes channels j*C:(j+1)*C of frame t."""
    b, _, t, h, w = y.shape
    fmt = torch.channels_last_3d if y.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format
    out = torch.empty((b, dim, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
    out.view(b, dim, t, 2, h, w).copy_(y.view(b, 2, dim, t, h, w).permute(0, 2, 3, 1, 4, 5))
    return out


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with x2 temporal up/down sampling.

    ``mode`` is one of ``upsample2d``, ``upsample3d``, ``downsample2d``, ``downsample3d``.

    Temporal upsampling (decoder): the first frame of the stream passes through unchanged (one
    frame); every later frame goes through a causal (3,1,1) convolution with 2C outputs that
    become two frames. The convolution sees only frames 1, 2, ... with zeros before frame 1.

    Temporal downsampling (encoder): the first frame passes through; then a stride-2 (3,1,1)
    convolution without padding runs over the whole stream, windows (0,1,2), (2,3,4), ...
    Each chunk after the first must bring an even number of frames at this level.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.dim, self.mode = dim, mode
        self.up = mode.startswith("up")
        self.temporal = mode.endswith("3d")
        if self.up:
            self.resample = indexed({1: nn.Conv2d(dim, dim // 2, 3, padding=1)})
        else:
            self.resample = indexed({1: nn.Conv2d(dim, dim, 3, stride=2)})
        if self.temporal and self.up:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif self.temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        # The downsampling time conv keeps its own one-frame cache.
        self.needs_cache = self.temporal and not self.up
        self.slot = -1

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = frames_to_batch(x)
        if self.up:
            f = F.interpolate(f, scale_factor=2.0, mode="nearest-exact")
        else:
            f = F.pad(f, (0, 1, 0, 1))
        return batch_to_frames(self.resample[1](f), b)

    def _time_up(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        slot = self.time_conv.slot
        head = None
        if cache[slot] is None:  # stream start: frame 0 is not upsampled in time
            head, x = x[:, :, :1], x[:, :, 1:]
            cache[slot] = zero_frames(head, self.time_conv.context)
        if x.shape[2] == 0:
            return head
        y = interleave_time(self.time_conv(x, cache), self.dim)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        prev = cache[self.slot]
        cache[self.slot] = x[:, :, -1:].clone()
        if prev is None:  # stream start: frame 0 passes, then windows (0,1,2), (2,3,4), ...
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return self.time_conv(torch.cat([prev, x], dim=2))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.up:
            if self.temporal:
                x = self._time_up(x, cache)
            return self._spatial(x)
        x = self._spatial(x)
        return self._time_down(x, cache) if self.temporal else x


def assign_cache_slots(module: nn.Module) -> int:
    """Give every sub-module that keeps a temporal cache its own slot; returns the slot count."""
    n = 0
    for m in module.modules():
        if getattr(m, "needs_cache", False):
            m.slot = n
            n += 1
    return n
