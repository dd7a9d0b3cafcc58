"""The KV-cache policy of a streaming run: one fixed cache, or a rolling window with an attention sink.

``CachePolicy`` is the one place the cache rules live; the nodes, the CLI and the trainer build it and
hand it to ``StreamOptions.from_policy`` (``sf_model.sampler``):

- fixed (``window=None``): the cache holds the whole video. Exact for what the model was trained on, but
  memory grows with the length and absolute RoPE positions must stay inside the model's table.
- rolling (``window=W``, ``sink=S``): the cache keeps the first S latent frames forever plus the last W
  latent frames, the current chunk included (``local_attn_size`` / ``sink_size`` of the official code).
  Only distances up to the window are ever seen, so positions may run past the RoPE table
  (``extend_positions``): any length, bounded memory.
- history routing (``routing_topk=k``): each chunk attends only to the k cached history frames whose
  mean-pooled keys match it best, plus the sink and itself (with either cache).

``default_policy`` is what a run uses when the caller asks for nothing (the CLI's ``--window auto``, the
sampler nodes without a Long-Video Options node): the fixed cache while the video fits the length the
checkpoint was trained on, else a rolling window of that length with the checkpoint's sink.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping

# The official Self Forcing checkpoint was trained on 21 latent frames (81 video frames) with one fixed
# cache and no sink; checkpoints that store no training length are assumed to be like it.
WAN_TRAIN_FRAMES = 21


def window_error(window: int | None, frames_per_block: int) -> str | None:
    """A rolling window must hold at least one chunk; None when it does (or the cache is fixed)."""
    if window is None or window >= frames_per_block:
        return None
    return (f"the rolling window ({window} latent frames) must hold at least one block (frames_per_block = "
            f"{frames_per_block}); raise the window to {frames_per_block} or more")


def routing_error(window: int | None, routing_topk: int | None) -> str | None:
    """Routing must pick fewer frames than a rolling window holds; None when it does (or is off)."""
    if window is None or not routing_topk or routing_topk < window:
        return None
    return (f"routing_topk {routing_topk} is not smaller than the window {window}: routing would keep every "
            f"frame; use a routing_topk below {window}, or 0 to switch routing off")


def whole_frames(name: str, value) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (floats -- NaN included --, strings and bools are
    refused: a frame count is a whole number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number of latent frames, got {value!r} ({type(value).__name__})")
    return int(value)


def check_cache(frames_per_block: int, window: int | None, sink: int, routing_topk: int | None) -> None:
    """Raise ValueError (with a fix-it text) unless these cache settings can run."""
    whole_frames("frames_per_block", frames_per_block)
    whole_frames("sink", sink)
    if window is not None:
        whole_frames("the rolling window", window)
    if routing_topk is not None:
        whole_frames("routing_topk", routing_topk)
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    if window is not None and window < 1:
        raise ValueError(f"the rolling window must be >= 1 latent frame, got {window}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if routing_topk is not None and routing_topk < 1:
        raise ValueError(f"routing_topk must be >= 1 (or None to disable), got {routing_topk}")
    err = window_error(window, frames_per_block) or routing_error(window, routing_topk)
    if err:
        raise ValueError(err)


@dataclass(frozen=True)
class CachePolicy:
    """Fixed cache (``window=None``) or rolling window of ``window`` latent frames plus ``sink``; optional
    history routing (``routing_topk``; 0 or None = off). The constructor validates."""

    frames_per_block: int = 3
    window: int | None = None
    sink: int = 0
    routing_topk: int | None = None

    def __post_init__(self):
        whole_frames("sink", self.sink)  # before a fixed cache drops it: a NaN sink is refused, not ignored
        if self.routing_topk is not None:
            whole_frames("routing_topk", self.routing_topk)
        if self.routing_topk == 0:
            object.__setattr__(self, "routing_topk", None)
        if self.window is None and self.sink:  # a fixed cache never evicts: a sink means nothing there
            object.__setattr__(self, "sink", 0)
        check_cache(self.frames_per_block, self.window, self.sink, self.routing_topk)

    @classmethod
    def fixed(cls, frames_per_block: int = 3, routing_topk: int | None = None) -> "CachePolicy":
        return cls(frames_per_block, None, 0, routing_topk)

    @classmethod
    def rolling(cls, frames_per_block: int, window: int, sink: int = 0,
                routing_topk: int | None = None) -> "CachePolicy":
        return cls(frames_per_block, window, sink, routing_topk)

    @property
    def is_rolling(self) -> bool:
        return self.window is not None

    @property
    def extend_positions(self) -> bool:
        """Rolling: only distances up to the window are seen, so positions may pass the RoPE table."""
        return self.is_rolling

    def cache_frames(self, total_frames: int) -> int:
        """Latent frame slots the cache of a run of ``total_frames`` (prefix included) allocates."""
        return sum(cache_slots(self.window, self.sink, total_frames))

    def fixed_cache_error(self, total_frames: int, rope_max_frames: int) -> str | None:
        """A fixed cache must keep every absolute position inside the model's RoPE table."""
        if self.is_rolling or total_frames <= rope_max_frames:
            return None
        return (f"{total_frames} latent frames do not fit a fixed cache (the model has {rope_max_frames} RoPE "
                "positions); use a rolling window for videos this long")

    def describe(self) -> str:
        text = f"rolling window {self.window}" + (f" + sink {self.sink}" if self.sink else "") \
            if self.is_rolling else "full cache"
        return text + (f", routing top {self.routing_topk}" if self.routing_topk else "")


def cache_slots(window: int | None, sink: int, total_frames: int) -> tuple[int, int]:
    """(ring window, sink) of the KV cache a run of ``total_frames`` latent frames (prefix included) allocates:
    never more slots than the run has frames, with the same attention as the requested ``window``/``sink``.

    A fixed cache (``window=None``) is a ring as long as the video. A rolling window whose ring would never
    wrap (``window + sink >= total_frames``) keeps every frame in the slot of its index either way, so it is
    cut to the frames that exist (the sink keeps its meaning for routing; a ring of 0 frames when the sink
    alone covers the video).
    """
    if total_frames < 1:
        raise ValueError(f"a run needs at least 1 latent frame, got {total_frames}")
    if window is None:
        return total_frames, 0
    sink = min(sink, total_frames)
    return min(window, total_frames - sink), sink


# -- what a checkpoint says about itself ----------------------------------------------------------------
def trained_frames(meta: Mapping) -> int:
    """Latent frames of the clips the checkpoint was trained on: ``train_frames``, a toy bundle's
    ``toy.train_frames``, else the official 21."""
    value = meta.get("train_frames")
    if value is None:
        value = (meta.get("toy") or {}).get("train_frames")
    return int(value) if value is not None else WAN_TRAIN_FRAMES


def checkpoint_sink(meta: Mapping) -> int:
    """The attention sink the checkpoint was trained with (``sink``; none stored = 0, as the official)."""
    return int(meta.get("sink", 0) or 0)


def checkpoint_frames_per_block(meta: Mapping) -> int:
    return int(meta.get("frames_per_block", 3))


def trained_attention(meta: Mapping, cache: CachePolicy) -> CachePolicy:
    """``cache`` as a checkpoint's training asks: history routing with its ``routing_topk`` unless ``cache``
    routes itself, and never a wider attention than its sliding ``window`` (a fixed cache then becomes a rolling
    window of that size with the checkpoint's sink). Routing that would keep every frame of the window is
    dropped (it equals no routing). Checkpoints that store neither get ``cache`` unchanged."""
    topk = cache.routing_topk if cache.routing_topk is not None else meta.get("routing_topk")
    window, sink, trained = cache.window, cache.sink, meta.get("window")
    if trained is not None and (window is None or int(trained) < window):
        window, sink = max(int(trained), cache.frames_per_block), sink if cache.is_rolling else checkpoint_sink(meta)
    if topk is not None and routing_error(window, int(topk)):
        topk = None
    if (window, sink, topk) == (cache.window, cache.sink, cache.routing_topk):
        return cache
    return CachePolicy(cache.frames_per_block, window, sink, None if topk is None else int(topk))


def default_policy(meta: Mapping, total_frames: int, *, frames_per_block: int | None = None,
                   rope_max_frames: int | None = None) -> CachePolicy:
    """The cache a run gets when none is asked for: fixed while ``total_frames`` (latent frames, prefix
    included) fit the trained length (and the RoPE table), else a rolling window of the trained length
    with the checkpoint's sink. ``frames_per_block`` defaults to the checkpoint's."""
    fpb = frames_per_block if frames_per_block is not None else checkpoint_frames_per_block(meta)
    trained = trained_frames(meta)
    limit = trained if rope_max_frames is None else min(trained, rope_max_frames)
    if total_frames <= limit:
        return CachePolicy.fixed(fpb)
    return CachePolicy.rolling(fpb, max(trained, fpb), checkpoint_sink(meta))
