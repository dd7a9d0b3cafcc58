"""Activation checkpointing for the causal Wan DiT: recompute each block in backward.

``CausalWanModel.set_activation_checkpointing(True)`` makes every block's gradient-recording forward run
under ``torch.utils.checkpoint`` (non-reentrant): the block keeps only its inputs, and backward runs it
again. This holds for the full-sequence ``forward`` (critic, teacher forcing) and for the KV-cached
``forward_chunk`` (the Self Forcing generator).

A cached block must not read the cache when it is recomputed: in a rollout, later chunks are written
to the cache (and the same chunk re-run for its clean context) before backward. So with checkpointing,
a gradient-recording ``forward_chunk`` hands every block its *history* -- the K/V of every valid slot
but the chunk's own, detached -- as explicit inputs (a ``ChunkAttention``, gathered before the block
runs); the block returns its own new K/V and the cache write happens outside the checkpointed function.

History inputs come in two modes:

- ``"view"`` (default): views of the cache buffers, no extra memory. Valid as long as those slots are
  not rewritten before backward (true for a rollout through a cache that holds the whole clip). A
  ``KVCache.stamp`` taken at the forward is checked again when the block is recomputed: if a history slot
  was rewritten (a later chunk wrapping around a rolling window, a reset and reuse, or any in-place
  change of the buffers), backward raises instead of computing a wrong gradient.
- ``"copy"``: detached copies of the history (memory: one chunk's history per layer until backward);
  always correct, whatever happens to the cache afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .cache import KVCache, assemble
from .routing import routed_attention

HISTORY_MODES = ("view", "copy")


class HistoryRewritten(RuntimeError):
    """A checkpointed block's history slots were rewritten between its forward and its recompute."""


def run_checkpointed(fn, *args):
    """``fn(*args)`` recomputed in backward (non-reentrant checkpoint, which restores the autocast state)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)  # blocks draw no random numbers


@dataclass(frozen=True, eq=False)
class ChunkAttention:
    """Self-attention of one layer's chunk against explicit, detached history K/V (no cache access).

    Called as ``attend(q, k, v)`` by ``Block``; ``k``/``v`` are the chunk's own keys/values (with gradient).
    ``routing`` holds the snapshot ``routed_attention`` reads (a cache-like namespace of one layer) and
    top-k when history routing is on. ``guard`` = (cache, stamp) in view mode.
    """

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    order: tuple
    frame_tokens: int
    backend: str
    routing: tuple | None = None
    guard: tuple | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.guard is not None and self.guard[0].changed_since(self.guard[1]):
            raise HistoryRewritten(
                "the KV cache slots a checkpointed block attends to were rewritten between its forward and "
                "backward (a rolling window wrapped around, the cache was reset and reused, or its buffers "
                "were changed in place); use model.set_activation_checkpointing(True, history='copy')")
        if self.routing is not None:  # the snapshot's current slots hold this chunk's k/v (not yet written)
            snap, topk = self.routing
            full = SimpleNamespace(**{**vars(snap), "k": splice(snap.k, k, snap.plan.runs, self.frame_tokens),
                                      "v": splice(snap.v, v, snap.plan.runs, self.frame_tokens)})
            return routed_attention(q, k, v, full, 0, topk)
        kc = assemble(self.k, k, self.order, self.frame_tokens)
        vc = assemble(self.v, v, self.order, self.frame_tokens)
        return attention(q, kc, vc, self.backend)


def splice(buf: torch.Tensor, current: torch.Tensor, runs, frame_tokens: int) -> torch.Tensor:
    """A one-layer buffer [1, B, cap*ft, H, D] with the current chunk's slots taken from ``current``."""
    ft, parts, pos = frame_tokens, [], 0
    for slot, off, n in sorted(runs):
        if slot > pos:
            parts.append(buf[0, :, pos * ft:slot * ft])
        parts.append(current[:, off * ft:(off + n) * ft].to(buf.dtype))
        pos = slot + n
    if pos * ft < buf.shape[2]:
        parts.append(buf[0, :, pos * ft:])
    return torch.cat(parts, 1)[None]


def check_mode(mode: str) -> str:
    if mode not in HISTORY_MODES:
        raise ValueError(f"history mode must be one of {', '.join(HISTORY_MODES)}, got {mode!r}")
    return mode


def history_stamp(cache: KVCache, mode: str) -> tuple | None:
    """The stamp view-mode history of the cache's current plan is checked against (None: copy instead,
    also for caches made under ``torch.inference_mode``, whose changes cannot be seen). Take it once
    per chunk forward, after ``cache.begin``: it covers every layer."""
    return cache.stamp() if check_mode(mode) == "view" and cache.trackable() else None


def gather_history(cache: KVCache, layer: int, backend: str, stamp: tuple | None, *,
                   routing_topk: int | None = None) -> ChunkAttention:
    """Layer ``layer``'s history for the cache's current plan as a ``ChunkAttention``: views guarded by
    ``stamp`` (from ``history_stamp``), or detached copies when ``stamp`` is None.
    ``routing_topk``: attend like ``routed_attention`` (sink + top-k history frames + the chunk)."""
    copy = stamp is None
    guard = None if copy else (cache, stamp)

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if copy else t.detach()

    if routing_topk is not None:
        snapshot = SimpleNamespace(plan=cache.plan, frame_tokens=cache.frame_tokens, sink=cache.sink,
                                   capacity=cache.capacity, k=own(cache.k[layer:layer + 1]),
                                   v=own(cache.v[layer:layer + 1]),
                                   key_mean=own(cache.key_mean[layer:layer + 1]))
        return ChunkAttention((), (), (), cache.frame_tokens, backend, (snapshot, routing_topk), guard)
    hk, hv, order = cache.history(layer)
    return ChunkAttention(tuple(own(t) for t in hk), tuple(own(t) for t in hv), order, cache.frame_tokens,
                          backend, None, guard)
