"""History routing (Resampling Forcing): every query token attends to the top-k history frames whose
mean-pooled keys match it best, plus the frames it always sees.

For a query token q and a history frame j with keys K_j, the score is ``q . mean(K_j)`` (per head,
parameter-free); the token attends to its ``topk`` best-scoring *candidate* frames and to its *always*
frames -- its own chunk and the sink frames. Candidates are the other frames it could see without routing
(the earlier frames inside its window); when there are no more than ``topk`` of them it sees them all, so
routing changes nothing until the history is longer than ``topk``. Selection is per layer, per head and
per query token, and carries no gradient (``topk`` indices); the attention over the selected frames does.

One rule, two layouts:

- ``routed_attention``: one chunk against a ``KVCache`` (sampling, self-resampling, rollouts). Scores
  come from the cache's per-frame key means (``KVCache(key_means=True)``); the keys are every cache slot
  (fixed shapes), masked to the valid slots the token may see.
- ``routed_attend``: the full-sequence forward under any frame visibility (``CausalWanModel.forward(...,
  routing_topk=)``; teacher forcing's and Resampling Forcing's [history | noisy] sequence). A query frame's
  always frames are those it sees that also see it (its own chunk) plus the sink frames; its candidates are
  the rest of what it sees. Frame keys are the mean keys of the sequence's own frames, which for the
  [history | noisy] layout are exactly what a KV cache of that history holds, so both layouts agree
  (``tests/test_routing.py``).

The mask is a dense boolean [B, H, Lq, Lk] for SDPA on the CPU (and for small problems on CUDA), or a
FlexAttention ``BlockMask`` built directly from the block table (no L x L evaluation) when a dense mask on
CUDA would pass ``FLEX_MIN_BYTES``: kv blocks that no query of a 128-query block selected are skipped.
Everything stays on the device (``topk``, ``scatter``): no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import masked_attention

FLEX_BLOCK = 128
FLEX_MIN_BYTES = 64 << 20  # dense masks larger than this go to FlexAttention on CUDA


# -- the selection rule -----------------------------------------------------------------------------------
def frame_means(k: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """Mean key of every frame: k [B, F*frame_tokens, H, D] -> [B, F, H, D] float32 (no gradient)."""
    return k.detach().unflatten(1, (-1, frame_tokens)).float().mean(2)


def select_frames(q: torch.Tensor, frame_keys: torch.Tensor, candidates: torch.Tensor, topk: int) -> torch.Tensor:
    """Bool [B, H, Lq, F]: the top-``topk`` candidate frames of every query token by ``q . frame key``.

    q [B, Lq, H, D]; frame_keys [B, F, H, D]; candidates bool [Lq, F] (or broadcastable to [B, H, Lq, F]).
    A token with no more than ``topk`` candidates gets all of them."""
    scores = torch.einsum("blhd,bfhd->bhlf", q.detach().float(), frame_keys.detach().float())
    scores = scores.masked_fill(~candidates, float("-inf"))
    idx = scores.topk(min(int(topk), scores.shape[-1]), dim=-1).indices
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    return chosen & candidates


# -- masks --------------------------------------------------------------------------------------------------
def use_flex_for(allowed: torch.Tensor, frame_tokens: int) -> bool:
    """FlexAttention for this routing problem: on CUDA when the dense mask would be large."""
    b, h, lq, f = allowed.shape
    return allowed.device.type == "cuda" and b * h * lq * f * frame_tokens > FLEX_MIN_BYTES


def dense_mask(allowed: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """Token mask [B, H, Lq, F*frame_tokens] of per-token allowed frames [B, H, Lq, F]."""
    return allowed.repeat_interleave(frame_tokens, dim=-1)


def flex_mask(allowed: torch.Tensor, frame_tokens: int):
    """The same mask as a FlexAttention ``BlockMask``, built from its block table (no dense L x L mask).

    A kv block takes part for a 128-query block when any of its queries allows a frame overlapping it; the
    element mask inside such blocks reads ``allowed`` (padded so that padded indices read False)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, lq, f = allowed.shape
    lk = f * frame_tokens
    qb, kb = -(-lq // FLEX_BLOCK), -(-lk // FLEX_BLOCK)
    frames_padded = -(-(kb * FLEX_BLOCK) // frame_tokens)
    table = F.pad(allowed, (0, frames_padded - f, 0, qb * FLEX_BLOCK - lq))  # [B, H, QB*128, F']
    any_query = table.unflatten(2, (qb, FLEX_BLOCK)).any(3)[..., :f]  # [B, H, QB, F]
    starts = torch.arange(f, device=allowed.device) * frame_tokens
    block = torch.arange(kb, device=allowed.device) * FLEX_BLOCK
    overlap = (starts[:, None] < block[None, :] + FLEX_BLOCK) & (starts[:, None] + frame_tokens > block[None, :])
    blocks = (any_query.float() @ overlap.float()) > 0  # [B, H, QB, KB]
    num = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b_, h_, q_idx, kv_idx):
        return table[b_, h_, q_idx, kv_idx // frame_tokens]

    return BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(lq, lk))


def routed_mask(allowed: torch.Tensor, frame_tokens: int, use_flex: bool | None = None):
    """The attention mask of per-token allowed frames [B, H, Lq, F]: dense bool or a FlexAttention BlockMask
    (``use_flex`` None: ``use_flex_for``)."""
    if use_flex is None:
        use_flex = use_flex_for(allowed, frame_tokens)
    return flex_mask(allowed, frame_tokens) if use_flex else dense_mask(allowed, frame_tokens)


# -- full-sequence layout ----------------------------------------------------------------------------------
def split_visibility(visibility: torch.Tensor, sink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(always, candidates) bool [F, F] of a frame visibility: always = the frames a query frame sees that
    also see it (its own chunk) and the sink frames [0, sink) it sees; candidates = the rest it sees."""
    vis = torch.as_tensor(visibility, dtype=torch.bool).cpu()
    if vis.ndim != 2 or vis.shape[0] != vis.shape[1]:
        raise ValueError(f"a frame visibility must be square [frames, frames], got shape {tuple(vis.shape)}")
    sink_cols = (torch.arange(vis.shape[1]) < int(sink))[None, :]
    always = vis & (vis.T | sink_cols)
    return always, vis & ~always


def routed_attend(visibility: torch.Tensor, frame_tokens: int, topk: int, sink: int = 0, device=None,
                  use_flex: bool | None = None):
    """``attend_for_layer(i) -> attend(q, k, v)`` of the full-sequence forward with history routing under the
    frame ``visibility`` [F, F] (q/k/v [B, F*frame_tokens, H, D], frames in sequence order)."""
    if visibility is None:
        raise ValueError("history routing of a full-sequence forward needs a frame visibility")
    if topk is None or int(topk) < 1:
        raise ValueError(f"routing_topk must be >= 1, got {topk}")
    rows_always, rows_candidates = _token_rows(visibility, frame_tokens, sink, device)

    def attend(q, k, v):
        chosen = select_frames(q, frame_means(k, frame_tokens), rows_candidates.to(q.device), topk)
        allowed = chosen | rows_always.to(q.device)
        return masked_attention(q, k, v, routed_mask(allowed, frame_tokens, use_flex))

    return lambda _i: attend


_ROWS: dict = {}


def _token_rows(visibility, frame_tokens: int, sink: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(always, candidates) per query token [L, F] on ``device``, cached per pattern (training builds the same
    tables every step: no host-to-device copy per step)."""
    vis = torch.as_tensor(visibility, dtype=torch.bool).cpu()
    key = (tuple(vis.shape), bytes(vis.flatten().to(torch.uint8).tolist()), int(frame_tokens), int(sink), str(device))
    rows = _ROWS.get(key)
    if rows is None:
        always, candidates = split_visibility(vis, sink)
        rows = (always.repeat_interleave(frame_tokens, 0).to(device),
                candidates.repeat_interleave(frame_tokens, 0).to(device))
        if len(_ROWS) >= 8:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = rows
    return rows


# -- one chunk against a KV cache ----------------------------------------------------------------------------
def history_frames(cache) -> int:
    """How many cached frames are neither sink frames nor the current chunk."""
    plan = cache.plan
    sink_valid = min(cache.sink, plan.valid_frames)
    return plan.valid_frames - sink_valid - plan.frames


def _with_current(buf: torch.Tensor, cur: torch.Tensor, runs, frame_tokens: int) -> torch.Tensor:
    """Every slot of ``buf`` [B, cap*ft, H, D] with the current chunk's slots taken from ``cur`` (which may
    carry gradient; the cache holds detached copies, and a checkpointed block's snapshot of the cache was taken
    before the chunk was written)."""
    if not cur.requires_grad and not torch.is_grad_enabled():
        return buf  # a gradient-free forward: the cache already holds these values
    ft, parts, pos = frame_tokens, [], 0
    for slot, off, n in sorted(runs):
        if slot > pos:
            parts.append(buf[:, pos * ft:slot * ft])
        parts.append(cur[:, off * ft:(off + n) * ft])
        pos = slot + n
    if pos * ft < buf.shape[1]:
        parts.append(buf[:, pos * ft:])
    return torch.cat(parts, 1)


def slot_roles(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(always, candidates) bool [capacity] of the cache's current plan: always = valid sink slots and the
    current chunk's slots; candidates = the other valid slots (the routable history)."""
    plan = cache.plan
    slots = torch.arange(cache.capacity, device=cache.k.device)  # device ops on Python ints: no host copy
    current = torch.zeros_like(slots, dtype=torch.bool)
    for slot, _, n in plan.runs:
        current |= (slots >= slot) & (slots < slot + n)
    valid = slots < plan.valid_frames
    always = valid & ((slots < min(cache.sink, plan.valid_frames)) | current)
    return always, valid & ~always


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int,
                     topk: int, use_flex: bool | None = None) -> torch.Tensor:
    """Attention of the current chunk (q/k/v [B, L, H, D], already written to the cache) over its sink
    frames, its own chunk and, per query token, the top-k history frames. Returns [B, L, H, D].

    ``cache`` is a ``KVCache`` (or anything with its ``plan``, ``frame_tokens``, ``sink``, ``capacity``,
    ``k``, ``v``, ``key_mean``: ``sf_model.recompute`` passes a one-layer snapshot)."""
    ft = cache.frame_tokens
    always, candidates = slot_roles(cache)
    chosen = select_frames(q, cache.key_mean[layer], candidates[None, :], topk)
    allowed = chosen | always
    keys = _with_current(cache.k[layer], k, cache.plan.runs, ft)
    vals = _with_current(cache.v[layer], v, cache.plan.runs, ft)
    return masked_attention(q, keys, vals, routed_mask(allowed, ft, use_flex))
