"""The KV-cache policy of a streaming run: one fixed cache, or a rolling window with an attention sink.

``CachePolicy`` is the one place the cache rules live; the nodes, the CLI and the trainer build it and
hand it to ``StreamOptions.from_policy`` (``sf_model.sampler``):

- fixed (``window=None``): the cache holds the whole video. Exact for what the model was trained on, but
  memory grows with the length and absolute RoPE positions must stay inside the model's table.
- rolling (``window=W``, ``sink=S``): the cache keeps the first S latent frames forever plus the last W
  latent frames, the current chunk included. Only distances up to the window are ever seen between window
  frames, so positions may run past the RoPE table (``extend_positions``): any length, bounded memory.
- window semantics: our ``window`` does NOT count the sink; the official code's ``local_attn_size`` does (its
  cache holds ``local_attn_size`` frames, the ``sink_size`` sink frames among them). The same attention needs
  ``window = local_attn_size - sink_size`` (``from_official``; ``to_official`` back). Passing the official value
  as ``window`` attends to ``sink`` more frames than the official run (outputs differ by ~2e-2). Every official
  value read (checkpoint metadata ``local_attn_size``/``sink_size``, the CLI's ``--local-attn-size``) goes
  through ``from_official``.
- positions (``positions``): 'absolute' (the official sampler: every frame keeps the RoPE position of its index,
  so the distance from the sink to the current chunk grows without bound) or 'rebased' (the sink is seen right
  before the window: the attention sees the sink at positions 0..S-1 and the window at S..S+W-1 whatever the
  frame index, so no distance exceeds S + W; ``sf_model.positions``). Without a sink both are the same.
- history routing (``routing_topk=k``): each chunk attends only to the k cached history frames whose
  mean-pooled keys match it best, plus the sink and itself (with either cache).

``default_policy`` is what a run uses when the caller asks for nothing (the CLI's ``--window auto``, the
sampler nodes without a Long-Video Options node): the fixed cache while the video fits the length the
checkpoint was trained on, else a rolling window of that length with the checkpoint's sink.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Mapping

# The official Self Forcing checkpoint was trained on 21 latent frames (81 video frames) with one fixed
# cache and no sink; checkpoints that store no training length are assumed to be like it.
WAN_TRAIN_FRAMES = 21
POSITION_MODES = ("absolute", "rebased")


def from_official(local_attn_size: int, sink_size: int = 0) -> tuple[int | None, int]:
    """(window, sink) of ours for the official code's ``local_attn_size`` / ``sink_size``.

    The official cache holds ``local_attn_size`` latent frames *including* its ``sink_size`` sink frames (and
    ``local_attn_size = -1`` means one cache for the whole video), while our ``window`` counts only the frames after
    the sink: ``window = local_attn_size - sink_size`` (``None`` for -1, with no sink: a fixed cache never evicts).
    LongLive's ``local_attn_size: 12, sink_size: 3`` is ``window=9, sink=3``.
    """
    size, sink = whole_frames("local_attn_size", local_attn_size), whole_frames("sink_size", sink_size)
    if sink < 0:
        raise ValueError(f"sink_size must be >= 0, got {sink}")
    if size == -1:
        return None, 0
    if size <= sink:
        raise ValueError(f"local_attn_size {size} must be larger than sink_size {sink} (it counts the sink frames: "
                         f"the window after the sink is local_attn_size - sink_size = {size - sink} frames), or -1 for "
                         "a cache of the whole video")
    return size - sink, sink


def to_official(window: int | None, sink: int = 0) -> int:
    """The official ``local_attn_size`` of our ``window``/``sink`` (-1 for a fixed cache): ``window + sink``."""
    return -1 if window is None else int(window) + int(sink)


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


def check_positions(positions: str) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {positions!r}")


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
    positions: str = "absolute"       # 'absolute' (official) or 'rebased' (POSITION_MODES)

    def __post_init__(self):
        whole_frames("sink", self.sink)  # before a fixed cache drops it: a NaN sink is refused, not ignored
        if self.routing_topk is not None:
            whole_frames("routing_topk", self.routing_topk)
        if self.routing_topk == 0:
            object.__setattr__(self, "routing_topk", None)
        if self.window is None and self.sink:  # a fixed cache never evicts: a sink means nothing there
            object.__setattr__(self, "sink", 0)
        check_cache(self.frames_per_block, self.window, self.sink, self.routing_topk)
        check_positions(self.positions)

    @classmethod
    def fixed(cls, frames_per_block: int = 3, routing_topk: int | None = None) -> "CachePolicy":
        return cls(frames_per_block, None, 0, routing_topk)

    @classmethod
    def rolling(cls, frames_per_block: int, window: int, sink: int = 0,
                routing_topk: int | None = None, positions: str = "absolute") -> "CachePolicy":
        return cls(frames_per_block, window, sink, routing_topk, positions)

    @classmethod
    def official(cls, frames_per_block: int, local_attn_size: int, sink_size: int = 0,
                 routing_topk: int | None = None, positions: str = "absolute") -> "CachePolicy":
        """The cache of the official code's ``local_attn_size``/``sink_size`` (``from_official``)."""
        window, sink = from_official(local_attn_size, sink_size)
        return cls(frames_per_block, window, sink, routing_topk, positions)

    @property
    def local_attn_size(self) -> int:
        """This cache in the official code's terms (``to_official``)."""
        return to_official(self.window, self.sink)

    def with_positions(self, positions: str) -> "CachePolicy":
        return self if positions == self.positions else replace(self, positions=positions)

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
        if self.is_rolling and self.sink:
            text += f" (official local_attn_size {self.local_attn_size})"
        text += f", routing top {self.routing_topk}" if self.routing_topk else ""
        return text + (", rebased positions" if self.positions == "rebased" and self.is_rolling and self.sink else "")


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
    """The attention sink the checkpoint was trained with (``sink``, or the official ``sink_size``; none stored =
    0, as the official). Both stored and different: a ValueError."""
    ours, official = meta.get("sink"), meta.get("sink_size")
    if ours is not None and official is not None and int(ours) != int(official):
        raise ValueError(f"the checkpoint's metadata says sink {ours} and sink_size {official}; they must agree")
    value = ours if ours is not None else official
    return int(value or 0)


def checkpoint_window(meta: Mapping) -> int | None:
    """The sliding window (ours: frames after the sink) the checkpoint was trained with, or None.

    Read from ``window`` (our exports) or the official ``local_attn_size`` (through ``from_official`` with the
    checkpoint's sink; -1 = no window). Both stored: they must describe the same window (a ValueError otherwise,
    naming both, since one of them was written with the other's meaning)."""
    ours, official = meta.get("window"), meta.get("local_attn_size")
    mapped = None if official is None else from_official(int(official), checkpoint_sink(meta))[0]
    if ours is not None and official is not None and mapped != int(ours):
        raise ValueError(f"the checkpoint's metadata says window {ours} and local_attn_size {official} with sink "
                         f"{checkpoint_sink(meta)}; local_attn_size counts the sink (window = local_attn_size - sink "
                         f"= {mapped}), so they disagree")
    return int(ours) if ours is not None else mapped


def checkpoint_frames_per_block(meta: Mapping) -> int:
    return int(meta.get("frames_per_block", 3))


def trained_attention(meta: Mapping, cache: CachePolicy) -> CachePolicy:
    """``cache`` as a checkpoint's training asks: history routing with its ``routing_topk`` unless ``cache``
    routes itself, and never a wider attention than its sliding ``window`` (a fixed cache then becomes a rolling
    window of that size with the checkpoint's sink). Routing that would keep every frame of the window is
    dropped (it equals no routing). Checkpoints that store neither get ``cache`` unchanged."""
    topk = cache.routing_topk if cache.routing_topk is not None else meta.get("routing_topk")
    window, sink, trained = cache.window, cache.sink, checkpoint_window(meta)
    if trained is not None and (window is None or int(trained) < window):
        window, sink = max(int(trained), cache.frames_per_block), sink if cache.is_rolling else checkpoint_sink(meta)
    if topk is not None and routing_error(window, int(topk)):
        topk = None
    if (window, sink, topk) == (cache.window, cache.sink, cache.routing_topk):
        return cache
    return CachePolicy(cache.frames_per_block, window, sink, None if topk is None else int(topk), cache.positions)


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
