"""Block-causal attention masks for the full-sequence (training / teacher) view of the causal model.

Frames are grouped into blocks of ``frames_per_block``: attention is bidirectional inside a block and
causal across blocks. With a rolling ``window`` (in latent frames, the current block included) a query
block ending at frame ``end`` sees frames [end - window, end); with a ``sink`` of S frames it also sees
frames [0, S). This is exactly what the KV cache gives the incremental path (see ``sf_model.cache``).
"""

from __future__ import annotations

import torch


def block_ends(num_frames: int, frames_per_block: int | None) -> torch.Tensor:
    """For each frame, the (exclusive) end frame of its block."""
    if frames_per_block is None or frames_per_block >= num_frames:
        return torch.full((num_frames,), num_frames, dtype=torch.long)
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    f = torch.arange(num_frames)
    return torch.clamp((f // frames_per_block + 1) * frames_per_block, max=num_frames)


def frame_visibility(num_frames: int, frames_per_block: int | None, window: int | None = None,
                     sink: int = 0) -> torch.Tensor:
    """Bool [F_query, F_key]: may a token of frame q attend to a token of frame k."""
    ends = block_ends(num_frames, frames_per_block)[:, None]
    k = torch.arange(num_frames)[None, :]
    vis = k < ends
    if window is not None:
        vis = vis & ((k >= ends - window) | (k < sink))
    return vis


def token_mask(num_frames: int, frame_tokens: int, frames_per_block: int | None,
               window: int | None = None, sink: int = 0, device=None) -> torch.Tensor:
    """Dense bool mask [L, L] over tokens (frame-major order) for SDPA."""
    vis = frame_visibility(num_frames, frames_per_block, window, sink)
    vis = vis.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
    return vis.to(device) if device is not None else vis


def flex_block_mask(num_frames: int, frame_tokens: int, frames_per_block: int | None,
                    window: int | None, sink: int, device: torch.device):
    """The same mask as a FlexAttention BlockMask (CUDA), without materialising L x L."""
    from torch.nn.attention.flex_attention import create_block_mask

    vis = frame_visibility(num_frames, frames_per_block, window, sink).to(device)
    length = num_frames * frame_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        return vis[q_idx // frame_tokens, kv_idx // frame_tokens]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


def build_mask(num_frames: int, frame_tokens: int, frames_per_block: int | None, window: int | None,
               sink: int, device: torch.device, use_flex: bool):
    """The mask for ``masked_attention``; None when every token may see every token."""
    if window is None and (frames_per_block is None or frames_per_block >= num_frames):
        return None
    if use_flex:
        return flex_block_mask(num_frames, frame_tokens, frames_per_block, window, sink, device)
    return token_mask(num_frames, frame_tokens, frames_per_block, window, sink, device)
