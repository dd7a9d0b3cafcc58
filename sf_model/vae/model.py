"""The Wan2.1 video VAE (16 latent channels, x4 time, x8 space) with streaming encode/decode.

Public API:
    WanVAEConfig, WAN21_VAE, TINY_VAE
    WanVAE(config).encode(video) -> raw latent mean;  .decode(latents) -> video in [-1, 1]
    WanVAE.stream_decoder() -> StreamDecoder (push latent chunks, get their pixel frames)
    WanVAE.stream_encoder() -> StreamEncoder (push 1+4k frames, then 4k at a time)

Frame arithmetic (temporal factor f = 4 for Wan2.1): the first latent frame decodes to one
pixel frame and every later latent frame to f pixel frames; encoding maps 1 + f*k pixel frames
to 1 + k latent frames. Latents are RAW (no Wan mean/std normalisation).

All temporal operations are causal, so a chunked run equals a one-pass run. The per-layer
causal state lives in the stream objects as a plain list of tensors; the modules hold none.
Each call processes all frames of a chunk in one call per layer. ``vae.decoder.compile()``
(torch.compile) speeds decoding up; benchmarks/bench_vae.py measures it (figures in
benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .. import latent_format as frames_rule
from .layers import (
    AttentionBlock,
    Cache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    assign_cache_slots,
    indexed,
)


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan2.1-style VAE. Defaults are the released Wan2.1 VAE."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        if self.dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
            raise ValueError(f"invalid VAE config {self}: dim, z_dim, num_res_blocks and dim_mult must be positive")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs len(dim_mult)-1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temporal_downsample)}"
            )
        if any((self.dim * m) % 2 for m in self.dim_mult):
            raise ValueError(f"dim*dim_mult must be even (the decoder halves channels when upsampling): {self}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dim_mult"], d["temporal_downsample"] = list(self.dim_mult), list(self.temporal_downsample)
        return d


WAN21_VAE = WanVAEConfig()
# Small enough for fast CPU tests (~0.2M parameters) yet with every block type of the real model.
TINY_VAE = WanVAEConfig(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


class Encoder3d(nn.Module):
    """Pixels [B,3,T,H,W] -> 2*z_dim channels (mean and log-variance before ``conv1``)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + cfg.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = indexed({0: RMSNorm(top, images=False), 2: CausalConv3d(top, cfg.z_dim * 2, 3)})
        self.num_slots = assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return self.head[2](self.head[0](x, silu=True), cache)


class Decoder3d(nn.Module):
    """z_dim channels -> pixels [B,3,T',H*8,W*8]."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1],) + mult[::-1]]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsampling stage halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = indexed({0: RMSNorm(dims[-1], images=False), 2: CausalConv3d(dims[-1], 3, 3)})
        self.num_slots = assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head[2](self.head[0](x, silu=True), cache)


def _check_tensor(name: str, x: torch.Tensor, channels: int, vae: "WanVAE") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [B, {channels}, T, H, W]; got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != vae.device:
        raise ValueError(f"{name} is on {x.device} but the VAE is on {vae.device}; move one of them first")
    if x.shape[2] == 0:
        raise ValueError(f"{name} has no frames")
    return x.to(vae.dtype)


class StreamDecoder:
    """Decodes latents chunk by chunk; all chunks together equal one whole-video decode.

    ``push(latents[B, z, n, h, w])`` returns the pixel frames of exactly those latent frames
    (1 + 4(n-1) for the first chunk, 4n afterwards); chunks may have any length. The causal
    state is ``self.cache``, a list with one tensor (or None before the stream starts) per
    causal layer; ``reset()`` starts a new video.
    """

    def __init__(self, vae: "WanVAE", clamp: bool = True):
        self.vae, self.clamp = vae, clamp
        self.reset()

    def reset(self) -> None:
        self.cache: Cache = [None] * self.vae.decoder.num_slots
        self.latent_frames = 0  # latent frames pushed so far
        self._shape: Optional[tuple] = None

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        z = _check_tensor("latents", latents, self.vae.config.z_dim, self.vae)
        shape = (z.shape[0], z.shape[3], z.shape[4])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"this stream decodes batch/height/width {self._shape}, got {shape}; call reset() for a new video"
            )
        cache = list(self.cache)  # commit the new state only if the chunk succeeds
        out = self.vae._decode_chunk(z, cache)
        self.cache, self._shape = cache, shape
        self.latent_frames += z.shape[2]
        return out.clamp_(-1.0, 1.0) if self.clamp else out


class StreamEncoder:
    """Encodes pixel frames chunk by chunk: first 1 + 4k frames, then multiples of 4.

    ``push(video[B, 3, T, H, W])`` returns the raw latent means of those frames (1 + k latent
    frames for the first chunk, T/4 afterwards). ``reset()`` starts a new video.
    """

    def __init__(self, vae: "WanVAE"):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self.cache: Cache = [None] * self.vae.encoder.num_slots
        self.pixel_frames = 0
        self._shape: Optional[tuple] = None

    @torch.no_grad()
    def push(self, video: torch.Tensor) -> torch.Tensor:
        x = _check_tensor("video", video, 3, self.vae)
        f, s = self.vae.config.temporal_factor, self.vae.config.spatial_factor
        t = x.shape[2]
        first = self.pixel_frames == 0
        if first and (t - 1) % f:
            raise ValueError(f"the first chunk must have 1 + {f}*k frames, got {t}")
        if not first and t % f:
            raise ValueError(f"chunks after the first must have a multiple of {f} frames, got {t}")
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"height and width must be multiples of {s}, got {x.shape[3]}x{x.shape[4]}")
        shape = (x.shape[0], x.shape[3], x.shape[4])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"this stream encodes batch/height/width {self._shape}, got {shape}; call reset() for a new video"
            )
        cache = list(self.cache)  # commit the new state only if the chunk succeeds
        out = self.vae._encode_chunk(x, cache)
        self.cache, self._shape = cache, shape
        self.pixel_frames += t
        return out


class WanVAE(nn.Module):
    """Wan2.1 VAE. Parameter names are the original Wan ones (``encoder.*``, ``conv1``,
    ``conv2``, ``decoder.*``), so the released checkpoint loads with ``load_state_dict``.

    Encode/decode run without gradients, in the VAE's parameter dtype on its device (inputs are
    cast to that dtype; a device mismatch is an error). ``cudnn_benchmark`` (default on) lets cuDNN
    time its convolution algorithms once per input shape, during this VAE's calls only.
    """

    def __init__(self, config: WanVAEConfig = WAN21_VAE, cudnn_benchmark: bool = True):
        super().__init__()
        self.config = config
        self.cudnn_benchmark = cudnn_benchmark
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # ---- frame arithmetic -------------------------------------------------------------------
    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latent frames (1 + 4(n-1) for Wan2.1)."""
        return frames_rule.pixel_frames(latent_frames, self.config.temporal_factor)

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames encoded from ``pixel_frames`` frames (1 + (T-1)//4; extra frames are dropped)."""
        return frames_rule.latent_frames(pixel_frames, self.config.temporal_factor)

    # ---- one chunk (no validation; cache is updated in place) --------------------------------
    # Activations run channels-last (NDHWC): the norms reduce over contiguous channels and
    # cuDNN's tensor-core convolutions need no layout transposes. Outputs are made contiguous.
    def _decode_chunk(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        z = z.contiguous(memory_format=torch.channels_last_3d)
        with _cudnn_benchmark(self.cudnn_benchmark and z.is_cuda):
            return self.decoder(self.conv2(z), cache).contiguous()

    def _encode_chunk(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with _cudnn_benchmark(self.cudnn_benchmark and x.is_cuda):
            h = self.conv1(self.encoder(x, cache))
        return h[:, : self.config.z_dim].contiguous()

    # ---- public API ---------------------------------------------------------------------------
    def stream_decoder(self, clamp: bool = True) -> StreamDecoder:
        return StreamDecoder(self, clamp=clamp)

    def stream_encoder(self) -> StreamEncoder:
        return StreamEncoder(self)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, chunk: Optional[int] = None, clamp: bool = True) -> torch.Tensor:
        """Raw latents [B, z, n, h, w] -> video [B, 3, 1+4(n-1), 8h, 8w] in [-1, 1] (if ``clamp``).

        ``chunk``: latent frames per internal step (None: all frames in one pass per layer).
        The result does not depend on it; smaller chunks need less memory.
        """
        _check_tensor("latents", latents, self.config.z_dim, self)
        outs = self._push_all(self.stream_decoder(clamp=clamp), latents, _sizes(latents.shape[2], chunk))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk: Optional[int] = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> raw latent mean [B, z, 1+(T-1)//4, H/8, W/8].

        Frames beyond the last full group of 4 are ignored (as in Wan). ``chunk``: latent frames
        per internal step (None: all in one pass); the result does not depend on it.
        """
        _check_tensor("video", video, 3, self)
        f = self.config.temporal_factor
        n = self.latent_frames(video.shape[2])
        video = video[:, :, : self.pixel_frames(n)]
        sizes = [1 + f * (k - 1) if i == 0 else f * k for i, k in enumerate(_sizes(n, chunk))]
        outs = self._push_all(self.stream_encoder(), video, sizes)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    @staticmethod
    def _push_all(stream, x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
        outs, start = [], 0
        for size in sizes:
            outs.append(stream.push(x[:, :, start : start + size]))
            start += size
        return outs

    def to_channels_last(self) -> "WanVAE":
        """Store conv weights channels-last (NDHWC / NHWC) like the activations, which saves a
        small weight re-layout per convolution call on CUDA. Results are unchanged."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """cuDNN algorithm timing switched on for the duration of one call (then restored)."""
    if not enabled or torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


def _sizes(total: int, chunk: Optional[int]) -> List[int]:
    if chunk is None:
        return [total]
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of latent frames, got {chunk}")
    return [min(chunk, total - s) for s in range(0, total, chunk)]
