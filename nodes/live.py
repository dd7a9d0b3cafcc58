"""'Self Forcing Live Frames': its spec, and each decoded chunk sent to the client as a websocket event
(plain logic, no ComfyUI import).

The sampler nodes, when they decode as they go, send one JSON message per chunk on ComfyUI's ``/ws``:

    {"type": "self_forcing.frames", "data": {
        "version": 1, "prompt_id": "...", "node": "5",
        "chunk": 0, "chunks": 3,                # this chunk's index and the run's chunk count
        "start_frame": 0, "frame_count": 9,     # the chunk's frames in the node's IMAGE output (per batch item)
        "total_frames": 21,                     # frames of the IMAGE output once the run is done
        "frame_indices": [0, 1, ...],           # which frames are included (every n-th, counted over the video)
        "batch_index": 0,                       # frames are from this batch item
        "width": 64, "height": 32,              # size of the included images (after max_size)
        "format": "jpeg", "mime": "image/jpeg",
        "images": ["<base64>", ...],            # one complete JPEG/PNG file per frame index
        "last": false}}

A standard-library client only needs ``json`` and ``base64`` to save the images (see
``examples/live_frames_client.py``). Encoding runs on one background thread, in order, so the
generator does not wait for it; ``LiveFrameSender.close`` waits until every event is handed over.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .schema import CAT_SAMPLING, LIVE_TYPE, InputSpec, NodeSpec, OutputSpec, check_inputs

EVENT = "self_forcing.frames"
EVENT_VERSION = 1
FORMATS = ("jpeg", "png")
MIME = {"jpeg": "image/jpeg", "png": "image/png"}
LIVE_NAME = "Self Forcing Live Frames"

LIVE = NodeSpec(
    node_id="SelfForcingLiveFrames",
    display_name=LIVE_NAME,
    category=CAT_SAMPLING,
    description="How the sampler sends decoded frames to the client while it runs (when its 'vae' input is "
                "connected): on/off, every n-th frame, image size and format. Connect to the sampler's or extend "
                "node's live_frames input.",
    inputs=(
        InputSpec("send", "BOOLEAN", "Send each decoded chunk's frames to the client that queued the prompt "
                  "(websocket event 'self_forcing.frames'). Off: decode as it goes without sending frames (the "
                  "progress preview still shows the newest frame).", default=True),
        InputSpec("every_nth", "INT", "Send only frames whose index in the video is a multiple of this (1 = "
                  "every frame, 4 = one frame per latent frame).", default=1, min=1, max=64),
        InputSpec("max_size", "INT", "Longest side of the sent images in pixels; larger frames are scaled "
                  "down, never up. 0 = full size.", default=512, min=0, max=4096, step=8),
        InputSpec("format", "COMBO", "jpeg: small, lossy. png: lossless, several times larger.",
                  default="jpeg", options=FORMATS),
        InputSpec("quality", "INT", "JPEG quality (ignored for png).", default=85, min=1, max=100),
    ),
    outputs=(OutputSpec(LIVE_TYPE, "live_frames", "Live frame settings for the sampler / extend node."),),
    search_aliases=("live preview", "stream frames", "websocket frames"),
)


@dataclass(frozen=True)
class LiveFrameOptions:
    """What the 'Self Forcing Live Frames' node outputs (defaults apply when it is not connected)."""

    send: bool = True
    every_nth: int = 1      # send frames whose index in the video is a multiple of this
    max_size: int = 512     # longest side of the sent images; 0 = full size (never upscaled)
    format: str = "jpeg"
    quality: int = 85       # JPEG quality 1-100 (PNG is lossless)

    def check(self) -> "LiveFrameOptions":
        """These settings against the node's input ranges and formats (raises ValueError)."""
        ok = check_inputs(LIVE, every_nth=self.every_nth, max_size=self.max_size, format=self.format,
                          quality=self.quality)
        if ok is not True:
            raise ValueError(f"live frames: {ok}")
        return self


def selected_frames(start: int, count: int, every_nth: int) -> list[int]:
    """Indices (in the whole video) of the frames of ``[start, start + count)`` that are multiples of n."""
    first = -(-start // every_nth) * every_nth
    return list(range(first, start + count, every_nth))


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """IMAGE-style floats [T, H, W, 3] in [0, 1] (or uint8 as is) -> uint8 [T, H, W, 3]."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def fit_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most ``max_size`` (0 = unchanged)."""
    longest = max(width, height)
    if max_size <= 0 or longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(frame: torch.Tensor, options: LiveFrameOptions) -> tuple[bytes, int, int]:
    """uint8 [H, W, 3] -> (JPEG/PNG file bytes, width, height) after downscaling to ``max_size``."""
    from PIL import Image

    image = Image.fromarray(frame.contiguous().numpy())
    size = fit_size(image.width, image.height, options.max_size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if options.format == "jpeg":
        image.save(buf, format="JPEG", quality=options.quality)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), image.width, image.height


def encode_frames_event(*, prompt_id: str | None, node: str | None, chunk: int, chunks: int, start_frame: int,
                        frames: torch.Tensor, total_frames: int, options: LiveFrameOptions,
                        batch_index: int = 0) -> dict:
    """The event data for one decoded chunk. ``frames``: [T, H, W, 3] (IMAGE floats or uint8), frame
    ``start_frame`` of the video first."""
    count = frames.shape[0]
    indices = selected_frames(start_frame, count, options.every_nth)
    picked = to_uint8_frames(frames[[i - start_frame for i in indices]]) if indices else None
    images, width, height = [], None, None
    for k in range(len(indices)):
        data, width, height = encode_image(picked[k], options)
        images.append(base64.b64encode(data).decode("ascii"))
    if width is None:
        width, height = fit_size(frames.shape[2], frames.shape[1], options.max_size)
    return {
        "version": EVENT_VERSION, "prompt_id": prompt_id, "node": node, "chunk": chunk, "chunks": chunks,
        "start_frame": start_frame, "frame_count": count, "total_frames": total_frames,
        "frame_indices": indices, "batch_index": batch_index, "width": width, "height": height,
        "format": options.format, "mime": MIME[options.format], "images": images, "last": chunk == chunks - 1,
    }


def decode_frames_event(data: dict) -> list[tuple[int, bytes]]:
    """(frame index, image file bytes) for every image of an event (what a client does with it)."""
    if data.get("version") != EVENT_VERSION:
        raise ValueError(f"unknown live frames event version {data.get('version')!r}")
    indices, images = data["frame_indices"], data["images"]
    if len(indices) != len(images):
        raise ValueError(f"event has {len(images)} images for {len(indices)} frame indices")
    return [(i, base64.b64decode(s)) for i, s in zip(indices, images)]


class LiveFrameSender:
    """Encodes and sends chunk events on one background thread (in submission order).

    ``send(data)`` hands one event's data to the transport (ComfyUI: ``PromptServer.send_sync``).
    ``close()`` waits for every pending event and re-raises the first encoding error;
    ``close(cancel=True)`` (interrupt, error) drops what has not started yet.
    """

    def __init__(self, send: Callable[[dict], None], options: LiveFrameOptions, *, prompt_id: str | None,
                 node: str | None, background: bool = True):
        self.send, self.options = send, options.check()
        self.prompt_id, self.node = prompt_id, node
        self.sent = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sf-live") if background else None
        self._pending: list[Future] = []

    def _work(self, **kw) -> None:
        self.send(encode_frames_event(prompt_id=self.prompt_id, node=self.node, options=self.options, **kw))
        self.sent += 1

    def submit(self, *, chunk: int, chunks: int, start_frame: int, frames: torch.Tensor, total_frames: int,
               batch_index: int = 0) -> None:
        """Queue one chunk. ``frames`` ([T, H, W, 3]) must not be modified afterwards."""
        kw = dict(chunk=chunk, chunks=chunks, start_frame=start_frame, frames=frames, total_frames=total_frames,
                  batch_index=batch_index)
        if self._pool is None:
            self._work(**kw)
            return
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._pool.submit(self._work, **kw))

    def close(self, cancel: bool = False) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        pool.shutdown(wait=True, cancel_futures=cancel)
        pending, self._pending = self._pending, []
        if not cancel:
            for f in pending:
                if f.exception() is not None:
                    raise f.exception()
