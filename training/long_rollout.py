"""Long self-rollouts of Self-Forcing++ (Cui et al. 2025): the student rolls out N >> T latent frames through
the rolling KV cache it uses at inference, and a window of K frames of that rollout is what the short-horizon
teacher and the critic look at.

- ``Window``: frames [start, start + K) of a rollout of ``total`` = N frames;
- ``window_starts`` / ``draw_window``: i ~ U{0..N-K} (every frame, ``align="frame"``) or uniform over the chunk
  boundaries among them (``align="chunk"``, the default: the window holds whole chunks), drawn on rank 0
  from the run's seed and broadcast, like the exit step of ``training.dmd``;
- ``rollout_window``: the rollout itself, through the sampler's own ``denoise_chunk``/``commit_chunk`` and a
  ``KVCache`` of the inference policy (``StreamOptions.window`` ring + ``sink``). Only the chunks up to the
  window's end are generated (the rollout is causal: later frames cannot change the window). Chunks that end
  before the window run entirely under ``torch.no_grad`` (no graph, no activation memory); chunks that
  overlap it record gradient at their exit-step forward only (``grad_at_exit``). The cache only ever stores
  detached K/V, so a window chunk's gradient reaches its own exit forward and nothing earlier: earlier chunks
  act only through the (constant) cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..sf_model.cache import KVCache
from ..sf_model.sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk
from ..sf_model.schedule import Step
from ..sf_model.window import cache_slots
from .engine import Runtime, broadcast_int, generator

ALIGNS = ("chunk", "frame")


@dataclass(frozen=True)
class Window:
    """Frames [start, start + frames) of a rollout of ``total`` latent frames."""

    start: int
    frames: int
    total: int

    def __post_init__(self):
        if self.frames < 1 or self.total < self.frames:
            raise ValueError(f"a window of {self.frames} frames does not fit a rollout of {self.total} frames")
        if not 0 <= self.start <= self.total - self.frames:
            raise ValueError(f"window start {self.start} outside 0..{self.total - self.frames}")

    @property
    def end(self) -> int:
        return self.start + self.frames


def window_starts(total: int, frames: int, frames_per_block: int, align: str = "chunk") -> list[int]:
    """The starts a window of ``frames`` may take in a rollout of ``total`` frames: 0..total-frames, or with
    ``align="chunk"`` the multiples of ``frames_per_block`` among them."""
    if align not in ALIGNS:
        raise ValueError(f"window alignment must be one of {ALIGNS}, got {align!r}")
    if total < frames:
        raise ValueError(f"a window of {frames} frames does not fit a rollout of {total} frames")
    step = frames_per_block if align == "chunk" else 1
    return list(range(0, total - frames + 1, step))


def draw_window(total: int, frames: int, frames_per_block: int, align: str, rt: Runtime, *key) -> Window:
    """A uniform window start, drawn from ``key`` on rank 0 and broadcast to every rank."""
    starts = window_starts(total, frames, frames_per_block, align)
    pick = int(torch.randint(0, len(starts), (), generator=generator(*key))) if rt.is_main else 0
    return Window(starts[broadcast_int(pick, rt)], frames, total)


def window_chunks(window: Window, frames_per_block: int) -> list[tuple[int, int, bool]]:
    """(start frame, frames, inside the window) of every chunk the rollout generates: those that start before
    the window's end; "inside" = overlaps the window."""
    return [(s, n, s + n > window.start) for s, n in chunk_plan(0, window.total, frames_per_block) if s < window.end]


def rollout_long(model, text, window: Window, *, batch: int, latent_shape: Sequence[int], steps: Sequence[Step],
                 opts: StreamOptions, exit_index: int, prefix_exit: int,
                 noise_for: Callable[[int, int, int], Sequence[torch.Tensor]], grad: bool,
                 cache_dtype: torch.dtype, cache: KVCache | None = None) -> torch.Tensor:
    """The self-rollout up to the window's end, [B, C, E, H, W] (E = the end of the last chunk that overlaps the
    window), through the rolling cache of ``opts``; frames before the window's first chunk carry no graph.

    ``model``: a CausalWanModel or an ``engine.Wrapped``; ``text``: its ``encode_text`` output;
    ``latent_shape``: (C, H, W); ``exit_index``: the denoising step the window's chunks stop at (their output
    is that step's x0 prediction); ``prefix_exit``: the same for the chunks before the window (the last step
    = what inference does); ``noise_for(chunk, frames, count)`` -> ``count`` noise tensors [B, C, frames, H, W]
    (chunk = the chunk's index in the rollout, as the sampler's per-chunk noise); ``grad``: record gradient at
    the window chunks' exit forwards. ``cache``: an empty cache to use (else one of the policy's size).
    """
    c, h, w = latent_shape
    for name, e in (("exit_index", exit_index), ("prefix_exit", prefix_exit)):
        if not 0 <= e < len(steps):
            raise ValueError(f"{name} {e} outside the {len(steps)} denoising steps")
    fpb = opts.frames_per_block
    if window.total % fpb:
        raise ValueError(f"rollout length {window.total} is not a multiple of frames_per_block {fpb}")
    chunks = window_chunks(window, fpb)
    end = chunks[-1][0] + chunks[-1][1]
    if cache is None:
        cfg = model.config
        ph, pw = cfg.patch_size[1:]
        ring, sink = cache_slots(opts.window, opts.sink, end)
        cache = KVCache(cfg.num_layers, batch, (h // ph) * (w // pw), cfg.num_heads, cfg.head_dim, window=ring,
                        sink=sink, dtype=cache_dtype, device=model.device)
    outs = []
    for ci, (start, n, inside) in enumerate(chunks):
        e = exit_index if inside else prefix_exit
        noise = noise_for(ci, n, e + 1)
        if inside:
            x0 = denoise_chunk(model, text, cache, start, noise, steps, opts, exit_index=e, grad_at_exit=grad)
        else:
            with torch.no_grad():
                x0 = denoise_chunk(model, text, cache, start, noise, steps, opts, exit_index=e)
        outs.append(x0)
        if ci < len(chunks) - 1:
            commit_chunk(model, text, cache, start, x0, opts)
    return torch.cat(outs, dim=2)


def rollout_window(model, text, window: Window, **kwargs) -> torch.Tensor:
    """The window's frames [B, C, K, H, W] of ``rollout_long`` (same arguments)."""
    return rollout_long(model, text, window, **kwargs)[:, :, window.start:window.end]
