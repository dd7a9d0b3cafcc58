"""Prompt switching mid-stream (LongLive's interactive prompts): a prompt schedule, and what a switch does to
the KV cache.

A ``PromptSchedule`` is a list of ``PromptSwitch(start_frame, context, policy)``: from ``start_frame`` (a latent
frame of the stream, prefix included) on, chunks are generated under ``context``; the first entry starts at
frame 0. A chunk is denoised under one prompt, so a prompt takes over at the first chunk that starts at or after
its start frame. The stream goes on across a switch (same chunk plan, same per-chunk noise, chunks handed out
as they finish); only the cache is treated by the new entry's ``policy``:

- ``keep``: the cached K/V stay as they were computed (under the old prompt); the new prompt acts through
  cross-attention from the next chunk on. Cheapest; the old content lingers as long as it is in the window.
- ``recache``: LongLive's KV re-cache. The cached frames' K/V are recomputed under the new prompt from their
  clean latents before the next chunk: the cache is emptied and refilled by clean context passes over the sink
  frames, then over the window frames the next chunk will see, in chunks of ``frames_per_block`` (the sink from
  its first frame, the window in chunks ending at the switch), each pass attending to what was refilled before
  it -- the same K/V a fresh cache prefilled with those latents at their positions under the new prompt
  holds. Costs (sink + window) / frames_per_block forwards per switch; needs the clean latents of the cached
  frames, which ``LatentWindow`` keeps (the cache's slots, not the video: memory bounded).
- ``reset``: the cache is emptied; the next chunk starts a new segment as a new video would (its first frames
  at position 0 and, with a rolling cache, the new sink). The old content is gone at once, and so is the
  continuity with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

SWITCH_POLICIES = ("keep", "recache", "reset")
DEFAULT_SWITCH = "recache"


def check_policy(policy: str) -> str:
    if policy not in SWITCH_POLICIES:
        raise ValueError(f"a prompt switch's cache policy must be one of {', '.join(SWITCH_POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class PromptSwitch:
    start_frame: int   # latent frame of the stream (prefix included) from which this prompt applies
    context: Any       # text states [B, L, text_dim] or a prepared TextContext
    policy: str = DEFAULT_SWITCH  # what the switch to this prompt does to the cache (unused for the first)


class PromptSchedule:
    """Prompts by start frame; ``PromptSchedule.single(ctx)`` is one prompt for the whole stream.

    Entries must start at strictly increasing whole frames, the first at 0. ``sf_model.sampler.stream`` takes a
    schedule wherever it takes a context.
    """

    def __init__(self, entries: Sequence[PromptSwitch]):
        entries = tuple(entries)
        if not entries:
            raise ValueError("a prompt schedule needs at least one prompt")
        for e in entries:
            if isinstance(e.start_frame, bool) or not isinstance(e.start_frame, int) or e.start_frame < 0:
                raise ValueError(f"a prompt's start frame must be a whole latent frame >= 0, got {e.start_frame!r}")
            check_policy(e.policy)
        if entries[0].start_frame != 0:
            raise ValueError(f"the first prompt of a schedule must start at frame 0, got {entries[0].start_frame}")
        starts = [e.start_frame for e in entries]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"prompt start frames must be strictly increasing, got {starts}")
        self.entries = entries

    @classmethod
    def single(cls, context) -> "PromptSchedule":
        return cls([PromptSwitch(0, context)])

    @classmethod
    def of(cls, first, switches: Sequence[tuple], policy: str = DEFAULT_SWITCH) -> "PromptSchedule":
        """``first`` from frame 0, then ``(start_frame, context)`` or ``(start_frame, context, policy)`` pairs in any
        order (``policy`` for those that name none); an entry at frame 0 replaces ``first``."""
        items = sorted(((int(s[0]), s[1], s[2] if len(s) > 2 else policy) for s in switches), key=lambda t: t[0])
        entries = [PromptSwitch(0, first)]
        for start, ctx, pol in items:
            if start == 0:
                entries[0] = PromptSwitch(0, ctx)
            else:
                entries.append(PromptSwitch(start, ctx, pol))
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def index_at(self, frame: int) -> int:
        """The entry that applies at ``frame`` (the last one starting at or before it)."""
        k = 0
        for i, e in enumerate(self.entries):
            if e.start_frame <= frame:
                k = i
        return k

    @property
    def needs_latents(self) -> bool:
        """Whether a switch re-caches (the stream then keeps the clean latents of its cached frames)."""
        return any(e.policy == "recache" for e in self.entries[1:])

    def map_contexts(self, fn: Callable) -> "PromptSchedule":
        return PromptSchedule([PromptSwitch(e.start_frame, fn(e.context), e.policy) for e in self.entries])

    def to(self, device) -> "PromptSchedule":
        return self.map_contexts(lambda c: c.to(device) if isinstance(c, torch.Tensor) else c)

    def describe(self) -> str:
        return "; ".join(f"frame {e.start_frame}" + (f" ({e.policy})" if i else "") for i, e in enumerate(self.entries))


class LatentWindow:
    """The clean latents [B, C, H, W] of the frames a KV cache holds, in the cache's own slots (``cache.slot``):
    what a re-cache recomputes the K/V from. Its memory is the cache's capacity in latent frames."""

    def __init__(self, cache, batch: int, channels: int, height: int, width: int, device):
        self.cache = cache
        self.buf = torch.zeros(batch, channels, cache.capacity, height, width, dtype=torch.float32, device=device)

    def write(self, c_start: int, latents: torch.Tensor) -> None:
        for i in range(latents.shape[2]):
            self.buf[:, :, self.cache.slot(c_start + i)].copy_(latents[:, :, i])

    def read(self, c_start: int, c_end: int) -> torch.Tensor:
        """Latents of cache frames [c_start, c_end), [B, C, n, H, W] (a copy)."""
        return torch.stack([self.buf[:, :, self.cache.slot(c)] for c in range(c_start, c_end)], dim=2)


def recache_pieces(sink: int, n: int, next_frames: int, window: int | None, frames_per_block: int
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """What a re-cache before a chunk of ``next_frames`` at cache frame ``n`` recomputes:
    (sink pieces, window pieces, window start), pieces as (first cache frame, frames) in their old cache frames.

    The sink pieces cover [0, min(sink, n)) from frame 0; the window pieces cover the frames the next chunk sees
    past the sink, [max(sink, n + next_frames - window), n) (everything past the sink for a fixed cache), in
    chunks of ``frames_per_block`` ending at ``n`` (the first may be shorter)."""
    fpb = frames_per_block
    kept_sink = min(sink, n)
    sink_pieces = [(c, min(fpb, kept_sink - c)) for c in range(0, kept_sink, fpb)]
    lo = sink if window is None else max(sink, n + next_frames - window)
    window_pieces = []
    end = n
    while end > lo:
        start = max(lo, end - fpb)
        window_pieces.append((start, end - start))
        end = start
    return sink_pieces, window_pieces[::-1], lo
