"""KV caches for chunk by chunk (incremental) sampling.

One ``KVCache`` holds, for every layer, preallocated self-attention keys (stored after RoPE, so they
carry their absolute positions) and values. Frames live in slots:

- the first ``sink`` frames of the video occupy fixed sink slots and are never evicted;
- every later frame p goes to ring slot ``sink + (p - sink) % window``.

A forward over the chunk [start, start + F) writes its K/V into its own slots and attends to every
valid slot. Because RoPE is already applied, key order does not matter for attention, so the ring never
shifts memory: the valid slots always form the prefix [0, n_valid) and the chunk sees exactly the sink
frames plus the last ``window`` frames (its own included). Re-running the same chunk (the denoising
passes and the clean context pass) overwrites the same slots. The *fixed* policy (the released Self
Forcing checkpoint: a cache for the whole video) is the case ``window = video length, sink = 0``.
Memory is bounded by ``sink + window`` frames whatever the video length, and the sampler never asks for
more slots than its run has frames (``sf_model.window.cache_slots``; a ring of 0 frames is a cache of sink
slots only). All bookkeeping is in Python ints: no device-to-host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    """Where one forward's chunk goes: contiguous runs of (slot, offset in chunk, frames)."""

    start_frame: int
    frames: int
    runs: tuple[tuple[int, int, int], ...]
    valid_frames: int  # attend to slots [0, valid_frames)


class KVCache:
    def __init__(self, num_layers: int, batch: int, frame_tokens: int, num_heads: int, head_dim: int,
                 *, window: int, sink: int = 0, dtype: torch.dtype, device: torch.device,
                 key_means: bool = False):
        if window < 0 or window + sink < 1:
            raise ValueError(f"cache window must be >= 1 latent frame (or 0 next to a sink), got {window}")
        if sink < 0:
            raise ValueError(f"sink must be >= 0 frames, got {sink}")
        self.num_layers, self.batch, self.frame_tokens = num_layers, batch, frame_tokens
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window, self.sink = window, sink
        self.capacity = window + sink
        shape = (num_layers, batch, self.capacity * frame_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Mean key of every frame slot, for history routing (top-k frames by mean-pooled keys).
        self.key_mean = (torch.zeros(num_layers, batch, self.capacity, num_heads, head_dim,
                                     dtype=torch.float32, device=device) if key_means else None)
        self.frames_written = 0
        self.plan: CachePlan | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        if not self.window:
            raise ValueError(f"frame {frame} is past the {self.sink} sink slots of a cache without a ring")
        return self.sink + (frame - self.sink) % self.window

    def begin(self, start_frame: int, frames: int) -> CachePlan:
        """Plan the write of chunk [start_frame, start_frame + frames) before a forward."""
        ring = start_frame + frames - max(start_frame, self.sink)  # the chunk's frames past the sink
        if ring > self.window:
            raise ValueError(f"a chunk of {frames} frames does not fit a cache window of {self.window} "
                             "frames; use a window of at least frames_per_block")
        if start_frame > self.frames_written:
            raise ValueError(f"chunk starts at frame {start_frame} but the cache holds only "
                             f"{self.frames_written} frames: chunks must be written in order")
        if start_frame + frames < self.frames_written:
            raise ValueError(f"chunk [{start_frame}, {start_frame + frames}) is older than the newest "
                             f"cached frame {self.frames_written - 1}; only the newest chunk can be re-run")
        runs: list[list[int]] = []
        for i in range(frames):
            s = self.slot(start_frame + i)
            if runs and runs[-1][0] + runs[-1][2] == s:
                runs[-1][2] += 1
            else:
                runs.append([s, i, 1])
        end = start_frame + frames
        valid = end if end <= self.sink else self.sink + min(self.window, end - self.sink)
        self.plan = CachePlan(start_frame, frames, tuple(tuple(r) for r in runs), valid)
        self.frames_written = max(self.frames_written, end)
        return self.plan

    # -- per-layer work ----------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the chunk's keys/values [B, F*frame_tokens, H, D] into its slots."""
        ft = self.frame_tokens
        kc, vc = self.k[layer], self.v[layer]
        for slot, off, n in self.plan.runs:
            kc[:, slot * ft:(slot + n) * ft].copy_(k[:, off * ft:(off + n) * ft])
            vc[:, slot * ft:(slot + n) * ft].copy_(v[:, off * ft:(off + n) * ft])
        if self.key_mean is not None:
            means = k.unflatten(1, (-1, ft)).float().mean(2)  # [B, F, H, D]
            for slot, off, n in self.plan.runs:
                self.key_mean[layer, :, slot:slot + n].copy_(means[:, off:off + n])

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every valid slot, [B, n_valid*frame_tokens, H, D] views."""
        n = self.plan.valid_frames * self.frame_tokens
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def valid_with_current(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``valid`` but the current chunk's slots hold the given tensors (which may carry gradient,
        while the cache itself only ever stores detached values). Same key order as ``valid``."""
        ft, end = self.frame_tokens, self.plan.valid_frames
        kc, vc = self.k[layer], self.v[layer]
        ks, vs, pos = [], [], 0
        for slot, off, n in sorted(self.plan.runs):
            if slot > pos:
                ks.append(kc[:, pos * ft:slot * ft])
                vs.append(vc[:, pos * ft:slot * ft])
            ks.append(k[:, off * ft:(off + n) * ft])
            vs.append(v[:, off * ft:(off + n) * ft])
            pos = slot + n
        if pos < end:
            ks.append(kc[:, pos * ft:end * ft])
            vs.append(vc[:, pos * ft:end * ft])
        return torch.cat(ks, 1), torch.cat(vs, 1)

    # -- lifetime ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame without reallocating (the next chunk must start at frame 0)."""
        self.frames_written = 0
        self.plan = None

    def nbytes(self) -> int:
        extra = self.key_mean.numel() * self.key_mean.element_size() if self.key_mean is not None else 0
        return self.k.numel() * self.k.element_size() * 2 + extra

    def release(self) -> None:
        """Drop the buffers (the object is unusable afterwards)."""
        self.k = self.v = self.key_mean = None
        self.plan = None


class TextContext:
    """Cross-attention keys/values of one prompt for every layer, computed once and reused."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]
