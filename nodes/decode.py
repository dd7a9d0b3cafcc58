"""Decode as you go: the sampler's chunks through our streaming Wan 2.1 VAE decoder (no ComfyUI import).

``run_decoded_stream`` drains ``sf_model.pipeline.stream_video`` (chunk sampler + streaming decode,
overlapped on a side CUDA stream) into the LATENT samples and an IMAGE batch, reports the newest
decoded frame as the progress preview and hands every chunk's frames to a ``LiveFrameSender``.

The VAE comes from ComfyUI's VAE object: ``VaeViews`` builds our ``WanVAE`` once per source object and
re-binds it to the source's current weights for each run (no copy when device and dtype match), then
lets go of them, so nothing pins memory ComfyUI believes it has freed.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Mapping

import torch

from ..sf_model.latent_format import LATENT_CHANNELS, pixel_frames
from ..sf_model.pipeline import stream_video
from ..sf_model.vae import (VAECheckpointError, WanVAE, WanVAEConfig, infer_vae_config, to_wan_layout,
                            vae_from_state_dict)
from .live import LiveFrameSender, to_uint8_frames


@dataclass
class StreamDecode:
    """How a run decodes as it goes.

    ``open_vae(device)``: a context manager giving a ``WanVAE`` on ``device`` for the run (ComfyUI: loads
    the core VAE and binds our views to it). ``reserve_bytes``: device memory the decode needs besides
    the sampler's (asked for before the run). ``sender``: live frames to the client, or None.
    """

    open_vae: Callable[[torch.device], ContextManager[WanVAE]]
    reserve_bytes: int = 0
    sender: LiveFrameSender | None = None


def _wan21_error(detail: str) -> ValueError:
    return ValueError(f"the VAE connected to the sampler is not a Wan 2.1 VAE ({detail}); connect VAELoader with "
                      "wan_2.1_vae.safetensors")


class VaeViews:
    """Our WanVAE over the weights of another VAE object (ComfyUI's), built once per source object."""

    def __init__(self):
        self._built: "weakref.WeakKeyDictionary[object, WanVAE]" = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._built)

    @contextmanager
    def bind(self, source, state_dict: Mapping[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> Iterator[WanVAE]:
        """``WanVAE`` on ``device``/``dtype`` holding ``state_dict``'s tensors (shared where they already
        are there in that dtype, copied otherwise) for the ``with`` block; afterwards it holds none."""
        vae = self._built.get(source)
        if vae is None:
            vae = self._build(state_dict, device, dtype)
            self._built[source] = vae
        else:
            sd = to_wan_layout(state_dict)
            vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True,
                                assign=True)
        try:
            yield vae
        finally:
            vae.to("meta")  # drop the weights: the source owns them

    @staticmethod
    def _build(state_dict, device, dtype) -> WanVAE:
        sd = to_wan_layout(state_dict)
        return vae_from_state_dict(sd, device=device, dtype=dtype, config=check_wan21_state_dict(sd))


def check_wan21_state_dict(state_dict: Mapping[str, torch.Tensor]) -> WanVAEConfig:
    """The VAE architecture of a state dict, or ValueError unless it is a Wan 2.1 VAE (16 channels, x4 x8 x8)."""
    try:
        config = infer_vae_config(to_wan_layout(state_dict))
    except VAECheckpointError as e:
        raise _wan21_error(str(e)) from None
    if config.z_dim != LATENT_CHANNELS or config.temporal_factor != 4 or config.spatial_factor != 8:
        raise _wan21_error(f"{config.z_dim} latent channels, x{config.temporal_factor} time, "
                           f"x{config.spatial_factor} space")
    return config


def image_frames(vae: WanVAE, latent_frames: int, continued: bool) -> int:
    """Pixel frames of ``latent_frames`` latents: 1 + 4(n-1) from the start, 4n when continuing a video."""
    temporal = vae.config.temporal_factor
    return latent_frames * temporal if continued else pixel_frames(latent_frames, temporal)


def write_frames(images: torch.Tensor, start: int, decoded: torch.Tensor) -> torch.Tensor:
    """Put decoded frames [B, 3, T, H, W] in [-1, 1] into IMAGE-layout ``images`` [B, N, H, W, 3] at
    ``start`` as core's VAEDecode does: clamp((x + 1) / 2, 0, 1). Returns the written slice."""
    part = images[:, start:start + decoded.shape[2]]
    part.copy_(decoded.permute(0, 2, 3, 4, 1)).add_(1.0).mul_(0.5).clamp_(0.0, 1.0)
    return part


def run_decoded_stream(model, vae: WanVAE, context, *, num_frames: int, height: int, width: int, seed: int, opts,
                       prefix: torch.Tensor | None, image_offset: int, on_step, check_cancel,
                       preview: Callable[[torch.Tensor], None] | None,
                       sender: LiveFrameSender | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_frames`` latent frames and decode them chunk by chunk.

    Returns (model-space latents [B, 16, F, h, w] float32 CPU, frames [B, image_offset + N, H, W, 3] float32
    CPU in [0, 1]); with a ``prefix`` the N new frames continue it (4 per latent frame). The new frames are
    written after ``image_offset`` frames left for the caller to fill (the decoded input of an extension);
    live events count frames from there too. ``preview`` gets the newest frame of batch item 0 as uint8
    [H, W, 3] after every chunk.
    """
    frames = image_frames(vae, num_frames, prefix is not None)
    scale = vae.config.spatial_factor
    images = None
    chunks = -(-num_frames // opts.frames_per_block)
    skip = 0 if prefix is None else pixel_frames(prefix.shape[2], vae.config.temporal_factor)
    latents = []
    gen = stream_video(model, vae, context, num_frames=num_frames, height=height, width=width, seed=seed,
                       options=opts, prefix=prefix, on_step=on_step, check_cancel=check_cancel, as_uint8=False)
    try:
        for chunk in gen:
            latents.append(chunk.latents.to("cpu", torch.float32))
            if images is None:  # [B, N, H, W, 3], filled chunk by chunk
                images = torch.empty(chunk.frames.shape[0], image_offset + frames, height * scale, width * scale, 3)
            start = image_offset + chunk.start_frame - skip
            part = write_frames(images, start, chunk.frames)
            del chunk
            if preview is not None:
                preview(to_uint8_frames(part[0, -1]))
            if sender is not None:
                sender.submit(chunk=len(latents) - 1, chunks=chunks, start_frame=start, frames=part[0],
                              total_frames=image_offset + frames)
        if sum(x.shape[2] for x in latents) != num_frames:
            raise RuntimeError("the stream ended early")
        return torch.cat(latents, dim=2), images
    finally:
        gen.close()
        del gen


def decode_latents(vae: WanVAE, raw: torch.Tensor, chunk: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw latents (CPU) -> IMAGE-layout frames [B, N, H, W, 3] float32 CPU (into ``out`` if given), decoded
    ``chunk`` latent frames at a time (what core's VAEDecode gives, without the whole video's activations)."""
    n = pixel_frames(raw.shape[2], vae.config.temporal_factor)
    scale = vae.config.spatial_factor
    shape = (raw.shape[0], n, raw.shape[3] * scale, raw.shape[4] * scale, 3)
    images = torch.empty(shape, dtype=torch.float32) if out is None else out
    if tuple(images.shape) != shape:
        raise ValueError(f"decode_latents: out has shape {tuple(images.shape)}, expected {shape}")
    decoder, pos = vae.stream_decoder(), 0
    with torch.no_grad():
        for s in range(0, raw.shape[2], chunk):
            decoded = decoder.push(raw[:, :, s:s + chunk].to(device=vae.device, dtype=vae.dtype))
            write_frames(images, pos, decoded.float().cpu())
            pos += decoded.shape[2]
    return images
