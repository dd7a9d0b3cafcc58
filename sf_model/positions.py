"""Where a stream's frames sit in its KV cache, and at which temporal RoPE positions the attention sees them.

Cached keys carry their RoPE rotation (``sf_model.cache``), and attention only sees position *differences*
(``q_m . k_n`` depends on ``m - n``). So a frame's position can be changed after it was cached by rotating its
key by the position delta (RoPE rotations compose: rotating the key of position p by d gives the key of p + d,
``Rope3D.temporal_shift``), and every frame but the sink's can keep the rotation it was written with.

Position modes (``StreamOptions.positions``):

- ``absolute`` (the official sampler): every frame keeps the position of its frame index. Between window frames
  the distances stay below the window, but the sink frames stay at 0..S-1 while the current chunk moves on, so
  the sink-to-chunk distance grows without bound (a 10 000-frame stream sees distances of 10 000, never seen in
  training).
- ``rebased``: the attention sees the sink at positions 0..S-1 and the window right after it, at S..S+W-1, for
  every chunk (the rule of LongLive's frame sink and Rolling Forcing's re-RoPE'd sink): the largest distance is
  S + W - 1, inside the trained range whenever S + W <= the training clip (the official checkpoint: 21). The
  window frames keep their absolute rotation (their distances to the chunk are the same under both rules) and
  the sink's keys are re-rotated before each chunk by ``delta = window_start - S``, from a copy of the sink's
  keys as written (rotation 0), so rounding never accumulates. Before the window first slides past the sink
  (``chunk_end <= S + W``) delta is 0: rebased and absolute are the same computation. Without a sink they are
  always the same.

Why re-rotate the sink rather than keep un-rotated keys and rotate at attention time (LongLive's infinity
model): the cache, the model and the fused/graph-replayed forwards stay as they are, only S frames of keys per
layer are copied (once) and rotated (once per chunk, while the window slides), and memory stays flat: a copy
of the sink's keys, no table that grows with the frame index (the temporal RoPE table slides,
``Rope3D.temporal``).

The same mechanism keeps absolute positions exact after a KV re-cache (``sf_model.prompt_schedule``): the
re-cache packs the kept window frames right after the sink (cache frames S, S+1, ...), which moves them and
every later chunk ``shift`` positions down; the sink is then rotated by ``-shift`` so every distance is the
original one. A reset starts a new segment: its first frame is cache frame 0 (position 0) and its first frames
form the new sink.
"""

from __future__ import annotations

import torch

from .rope import apply_rope


class StreamPositions:
    """The frame -> cache-frame map of one stream and the rotation of its cached sink keys.

    ``cache_frame(frame)`` is the frame index the cache and RoPE see (``frame - origin - shift``); ``before(c,
    n)`` must run before every forward over cache frames [c, c + n) and ``after_commit(c, n)`` after every clean
    context pass. ``active`` False (no sink, or neither rebased positions nor re-caching): both do nothing, the
    map is the identity, and the stream is exactly the plain sampler.
    """

    def __init__(self, model, cache, *, window: int | None, mode: str, active: bool):
        self.cache, self.rope = cache, model.rope
        self.window, self.mode = window, mode
        self.sink = cache.sink
        self.active = bool(active and self.sink)
        self.origin = 0       # the frame that is cache frame 0 (moved by a reset)
        self.shift = 0        # frames a re-cache removed between the sink and the window
        self.sink_keys: torch.Tensor | None = None  # [layers, B, S*tokens, H, D], rotation 0
        self.applied = 0      # the rotation the cache's sink slots hold now

    def cache_frame(self, frame: int) -> int:
        return frame - self.origin - self.shift

    def sink_delta(self, c_start: int, frames: int) -> int:
        """The rotation the sink needs for a forward over cache frames [c_start, c_start + frames)."""
        s = self.sink
        if not self.active or c_start < s:  # chunks writing sink frames see them where they are
            return 0
        if self.mode == "rebased":
            return 0 if self.window is None else max(s, c_start + frames - self.window) - s
        return -self.shift

    def before(self, c_start: int, frames: int) -> None:
        delta = self.sink_delta(c_start, frames)
        if delta == self.applied:
            return
        if self.sink_keys is None:
            raise RuntimeError("the sink must be written before it can be moved")
        n = self.sink * self.cache.frame_tokens
        cos, sin = self.rope.temporal_shift(delta, self.cache.k.device)
        for layer in range(self.cache.num_layers):  # one layer at a time: no second copy of the whole sink
            self.cache.k[layer, :, :n].copy_(apply_rope(self.sink_keys[layer], cos, sin))
        self.applied = delta

    def after_commit(self, c_start: int, frames: int) -> None:
        """Keep a copy of the sink's keys as written (rotation 0) once a clean pass wrote sink frames."""
        if self.active and c_start < self.sink:
            self.sink_keys = self.cache.k[:, :, :self.sink * self.cache.frame_tokens].clone()

    def reset(self, frame: int) -> None:
        """A new segment from ``frame``: an empty cache whose frame 0 is ``frame``."""
        self.origin, self.shift = frame, 0
        self.sink_keys, self.applied = None, 0

    def repack(self, removed: int) -> None:
        """The cache was emptied and is refilled with its sink and, ``removed`` frames earlier, its window."""
        self.shift += removed
        self.sink_keys, self.applied = None, 0
