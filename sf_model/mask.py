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


# -- any frame layout (teacher forcing, degraded-history training) -------------------------------------
def teacher_forcing_visibility(num_frames: int, frames_per_block: int, window: int | None = None,
                               sink: int = 0) -> torch.Tensor:
    """Bool [2F, 2F] over the sequence [history frames 0..F-1 | noisy frames 0..F-1].

    The history part is block-causal among itself (what the KV cache holds after each chunk's clean pass);
    noisy chunk i sees the history chunks before it and itself -- never the history of its own chunk or
    later, nor any other noisy chunk. Noisy frame p goes at the RoPE position of history frame p (see
    ``teacher_forcing_positions``), so noisy chunk i sees exactly what chunk i sees against a cache of the
    earlier chunks. With ``window``/``sink`` a noisy chunk ending at frame ``end`` sees history frames
    [end - window, start) and [0, sink) only, as a rolling cache of ``window`` frames (its own included).
    The history need not be clean: Resampling Forcing puts degraded history frames in the same slots.
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    f = num_frames
    hist = frame_visibility(f, frames_per_block, window, sink)
    ends = block_ends(f, frames_per_block)
    starts = (torch.arange(f) // frames_per_block) * frames_per_block
    k = torch.arange(f)[None, :]
    sees_hist = k < starts[:, None]
    if window is not None:
        sees_hist = sees_hist & ((k >= ends[:, None] - window) | (k < sink))
    same_chunk = starts[:, None] == starts[None, :]
    top = torch.cat([hist, torch.zeros(f, f, dtype=torch.bool)], dim=1)
    bottom = torch.cat([sees_hist, same_chunk], dim=1)
    return torch.cat([top, bottom], dim=0)


def teacher_forcing_positions(num_frames: int) -> list[int]:
    """Temporal RoPE positions of [history | noisy]: each noisy frame shares its history twin's position."""
    return list(range(num_frames)) * 2


_VIS_MASKS: dict = {}


def visibility_mask(visibility: torch.Tensor, frame_tokens: int, device: torch.device, use_flex: bool):
    """The mask for ``masked_attention`` of any frame visibility [F_q, F_k] (bool: may frame q see frame k):
    a dense token mask, or a FlexAttention BlockMask on CUDA. Cached per pattern (training builds the same
    mask every step)."""
    vis = torch.as_tensor(visibility, dtype=torch.bool).cpu()
    if vis.ndim != 2 or vis.shape[0] != vis.shape[1]:
        raise ValueError(f"a frame visibility must be square [frames, frames], got shape {tuple(vis.shape)}")
    if not bool(vis.any(dim=1).all()):
        raise ValueError("every frame must see at least one frame (a query row with no key gives NaN)")
    key = (tuple(vis.shape), bytes(vis.flatten().to(torch.uint8).tolist()), int(frame_tokens), str(device),
           bool(use_flex))
    mask = _VIS_MASKS.get(key)
    if mask is None:
        if use_flex:
            from torch.nn.attention.flex_attention import create_block_mask

            table = vis.to(device)
            length = vis.shape[0] * frame_tokens

            def mask_mod(b, h, q_idx, kv_idx):
                return table[q_idx // frame_tokens, kv_idx // frame_tokens]

            mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
        else:
            mask = vis.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1).to(device)
        if len(_VIS_MASKS) >= 8:
            _VIS_MASKS.pop(next(iter(_VIS_MASKS)))
        _VIS_MASKS[key] = mask
    return mask
