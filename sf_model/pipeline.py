"""Streaming video: the chunk sampler and the streaming VAE decoder, overlapped on the GPU.

``stream_video`` yields pixel frames chunk by chunk. On CUDA each chunk's decode is queued on a side
stream (of high priority) as soon as the sampler hands the chunk out, so it runs while the generator
already works on the next chunk; decoded frames are copied to pinned host memory on that side stream,
and a chunk is handed to the caller once the next chunk's work is queued, when its frames are (or are
about to be) ready -- the caller's wait then never stalls the generator's queue. The first chunk is
handed out as soon as it is decoded (nothing else is queued yet, so waiting costs the GPU nothing).
On the CPU each chunk is decoded in line and handed out at once.

Frame counts follow Wan: the first latent frame decodes to 1 pixel frame, every later one to 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .latent_format import to_raw
from .sampler import StepEvent, StreamOptions, stream


@dataclass
class FrameChunk:
    index: int
    start_frame: int          # first pixel frame of the chunk in the whole video
    frames: torch.Tensor      # [B, T, H, W, 3] uint8 on the CPU (or float [-1, 1] with as_uint8=False)
    latents: torch.Tensor = field(repr=False)  # [B, 16, F, h, w] model-space latents of the chunk
    ready: "torch.cuda.Event | None" = field(default=None, repr=False)

    def wait(self) -> "FrameChunk":
        """Block until the frames are on the host (a no-op on the CPU)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 (on the same device)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def stream_video(model, vae, context, *, num_frames: int, height: int, width: int, seed: int = 0,
                 options: StreamOptions | None = None, prefix: torch.Tensor | None = None,
                 on_step: Callable[[StepEvent], None] | None = None,
                 check_cancel: Callable[[], None] | None = None, as_uint8: bool = True,
                 overlap: bool = True, include_prefix: bool = False) -> Iterator[FrameChunk]:
    """Generate ``num_frames`` latent frames and yield their decoded pixels chunk by chunk.

    ``vae``: a ``WanVAE`` (raw latents; the conversion from model space is done here). With a
    ``prefix``, the decoder is first run over the prefix so the new frames continue it seamlessly;
    its pixels are yielded first (as chunk index -1) when ``include_prefix`` is set.
    """
    decoder = vae.stream_decoder()
    cuda = overlap and model.device.type == "cuda" and vae.device.type == "cuda"
    # A high-priority stream: the GPU schedules a decode's kernels ahead of the generator's queued
    # ones, so a chunk's pixels are ready soon after its latents instead of one chunk later.
    side = torch.cuda.Stream(device=model.device, priority=-1) if cuda else None
    pixel = 0
    if prefix is not None:
        with torch.no_grad():
            out = decoder.push(to_raw(prefix).to(vae.dtype))
        pixel = out.shape[2]
        if include_prefix:
            yield FrameChunk(-1, 0, frames_to_uint8(out).cpu() if as_uint8 else out.float().cpu(), prefix)

    def launch(chunk):
        nonlocal pixel
        if side is None:
            with torch.no_grad():
                out = decoder.push(to_raw(chunk.latents).to(vae.dtype))
                out = frames_to_uint8(out).cpu() if as_uint8 else out.float().cpu()
            fc = FrameChunk(chunk.index, pixel, out, chunk.latents)
        else:
            side.wait_stream(torch.cuda.current_stream(model.device))
            with torch.cuda.stream(side), torch.no_grad():
                lat = chunk.latents
                lat.record_stream(side)
                out = decoder.push(to_raw(lat).to(vae.dtype))
                out = frames_to_uint8(out) if as_uint8 else out.float()
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            fc = FrameChunk(chunk.index, pixel, host, chunk.latents, ready)
        pixel += fc.frames.shape[1] if as_uint8 else fc.frames.shape[2]
        return fc

    pending, handed_first = None, False
    try:
        for chunk in stream(model, context, num_frames=num_frames, height=height, width=width, seed=seed,
                            options=options, prefix=prefix, on_step=on_step, check_cancel=check_cancel):
            current = launch(chunk)
            if side is None:  # decoded in line: nothing to overlap, hand it out at once
                yield current
                continue
            if pending is None and not handed_first:
                # The first chunk goes out as soon as it is decoded (first-pixel latency); the GPU
                # has nothing else queued meanwhile, so waiting here costs it no time.
                handed_first = True
                yield current.wait()
                continue
            if pending is not None:
                yield pending.wait()
            pending = current
        if pending is not None:
            yield pending.wait()
    finally:
        decoder.reset()
        if side is not None:
            side.synchronize()
