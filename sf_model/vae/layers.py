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

# Activations are kept channels-last (NDHWC): the channel norms then reduce over contiguous
# memory, frames<->batch reshapes are free views, and cuDNN needs no layout transposes.
CHANNELS_LAST = torch.channels_last_3d


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
    """``n`` zero frames shaped like ``x``'s frames, channels-last."""
    b, c, _, h, w = x.shape
    return torch.empty((b, c, n, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST).zero_()


def last_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """A channels-last COPY of the last ``n`` frames (a copy, so the cache never pins ``x``)."""
    tail = x[:, :, -n:]
    return torch.empty_like(tail, memory_format=CHANNELS_LAST).copy_(tail)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: ``x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`` (no bias).

    ``images=False`` stores gamma as [C, 1, 1, 1] (for 5-D video tensors), ``images=True`` as
    [C, 1, 1] (for 4-D frame tensors); the shapes are part of the checkpoint format.

    Computed as ``F.rms_norm`` over the channel axis moved last (x * rsqrt(mean(x^2) + eps) with
    eps = 1e-24 / C, the same function up to rounding; statistics in float32 for bf16/fp16
    inputs). The result is channels-last in memory. Under torch.compile it fuses with the SiLU
    and the following concatenation.
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
        if self.context > 0:
            prev = cache[self.slot]
            if prev is None:
                prev = zero_frames(x, self.context)
            x = torch.cat([prev, x], dim=2)
            cache[self.slot] = last_frames(x, self.context)
        # a no-op when x is already channels-last (the normal case on CUDA)
        return self._conv_forward(x.contiguous(memory_format=CHANNELS_LAST), self.weight, self.bias)


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
    out = torch.empty((b, dim, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)
    out.view(b, dim, t, 2, h, w).copy_(y.view(b, 2, dim, t, h, w).permute(0, 2, 3, 1, 4, 5))
    return out


# Nearest-neighbour x2 upsampling followed by a 3x3 convolution (padding 1) equals, for each
# output phase (a, b) in {0,1}^2, a 2x2 convolution of the LOW-resolution input: the 3x3 taps
# that land on the same source pixel are summed. Row taps of phase 0 read rows (i-1, i) with
# weights (w0, w1+w2), phase 1 reads rows (i, i+1) with weights (w0+w1, w2); columns alike.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(interpolate(x, 2x, nearest), weight, bias, padding=1)`` without building the
    upsampled tensor: one 2x2 convolution with 4x the output channels (one block per phase),
    then an interleave. 16/36 of the multiply-adds; the same function up to rounding."""
    n, _, h, w = x.shape
    co = weight.shape[0]
    taps = _PHASE_TAPS.to(device=weight.device, dtype=torch.float32)
    # k[a, b, o, i, r, s] = sum_{y, z} taps[a, r, y] * weight[o, i, y, z] * taps[b, s, z]
    k = torch.einsum("ary,oiyz,bsz->aboirs", taps, weight.float(), taps).reshape(4 * co, -1, 2, 2)
    k = k.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    b4 = None if bias is None else bias.repeat(4)
    y = F.conv2d(x, k, b4, padding=1)  # [n, (a, b, co), h+1, w+1]; row p reads input rows p-1, p
    y = y.contiguous(memory_format=torch.channels_last)
    # out[n, c, 2i+a, 2j+b] = y[n, (a, b, c), i+a, j+b], read through one strided view of y
    sn, sh, sw = y.stride(0), y.stride(2), y.stride(3)
    src = y.as_strided((n, h, 2, w, 2, co), (sn, sh, sh + 2 * co, sw, sw + co, 1))
    out = torch.empty((n, co, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, co).copy_(src)
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
        f = frames_to_batch(x).contiguous(memory_format=torch.channels_last)
        conv = self.resample[1]
        if self.up:
            return batch_to_frames(upsample2x_conv3x3(f, conv.weight, conv.bias), b)
        return batch_to_frames(conv(F.pad(f, (0, 1, 0, 1)).contiguous(memory_format=torch.channels_last)), b)

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
        cache[self.slot] = last_frames(x, 1)
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
