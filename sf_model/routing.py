"""History routing: attend to the top-k most relevant cached frames (Resampling Forcing).

Every cached frame is summarised by its mean key (kept by ``KVCache`` when built with
``key_means=True``). For each head, the current chunk's mean query scores the history frames; the chunk
then attends to the sink frames, the top-k history frames and itself. Selection happens on the device
(``topk`` + ``gather``), so shapes stay static and nothing syncs with the host.
"""

from __future__ import annotations

import torch

from .attention import attention_bhld
from .cache import KVCache


def history_frames(cache: KVCache) -> int:
    """How many cached frames are neither sink frames nor the current block."""
    plan = cache.plan
    sink_valid = min(cache.sink, plan.valid_frames)
    current = plan.frames
    return plan.valid_frames - sink_valid - current


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                     topk: int) -> torch.Tensor:
    """Attention of the current chunk (q/k/v [B, L, H, D], already written to the cache) over
    [sink | top-k history frames | current chunk]. Returns [B, L, H, D]."""
    plan = cache.plan
    ft, device = cache.frame_tokens, q.device
    b, _, h, d = q.shape
    sink_valid = min(cache.sink, plan.valid_frames)

    slots = torch.arange(cache.capacity, device=device)
    candidate = (slots < plan.valid_frames) & (slots >= sink_valid)
    for slot, _, n in plan.runs:  # exclude the current chunk's own slots
        candidate &= (slots < slot) | (slots >= slot + n)

    q_mean = q.float().mean(1)  # [B, H, D]
    scores = torch.einsum("bhd,bshd->bhs", q_mean, cache.key_mean[layer])
    scores = scores.masked_fill(~candidate[None, None, :], float("-inf"))
    idx = scores.topk(topk, dim=-1).indices  # [B, H, topk]

    def select(buf: torch.Tensor) -> torch.Tensor:
        frames = buf.unflatten(1, (cache.capacity, ft)).permute(0, 3, 1, 2, 4)  # [B, H, cap, ft, D]
        index = idx[..., None, None].expand(b, h, topk, ft, d)
        return torch.gather(frames, 2, index).reshape(b, h, topk * ft, d)

    keys = [select(cache.k[layer]), k.transpose(1, 2)]
    vals = [select(cache.v[layer]), v.transpose(1, 2)]
    if sink_valid:
        n = sink_valid * ft
        keys.insert(0, cache.k[layer, :, :n].transpose(1, 2))
        vals.insert(0, cache.v[layer, :, :n].transpose(1, 2))
    out = attention_bhld(q.transpose(1, 2), torch.cat(keys, 2), torch.cat(vals, 2))
    return out.transpose(1, 2)
