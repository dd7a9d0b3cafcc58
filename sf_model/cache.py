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

For activation checkpointing (``sf_model.recompute``) a gradient-recording chunk forward takes each
layer's *history* (every valid slot but the chunk's own, ``history``) as explicit inputs, and a
``stamp`` of those slots lets the recompute in backward refuse to run on history that was rewritten in
between (a planned write into the slot, or an in-place change of the buffers by anyone else).
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
    quantized = False  # stores the compute dtype (``sf_model.speed.kv_fp8.Fp8KVCache``: e4m3 + scales)

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
        # For stamps (activation checkpointing): planned writes per slot, and in-place changes of the
        # buffers that did not come from ``write`` (noticed by the tensors' version counters once tracked).
        self._slot_writes = [0] * self.capacity
        self._tracking = False
        self._seen_versions: tuple = ()
        self._foreign_changes = 0

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
        for slot, _, n in runs:
            for s in range(slot, slot + n):
                self._slot_writes[s] += 1
        return self.plan

    # -- per-layer work ----------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the chunk's keys/values [B, F*frame_tokens, H, D] into its slots."""
        ft = self.frame_tokens
        if self._tracking:
            self._notice_foreign_changes()
        kc, vc = self.k[layer], self.v[layer]
        for slot, off, n in self.plan.runs:
            kc[:, slot * ft:(slot + n) * ft].copy_(k[:, off * ft:(off + n) * ft])
            vc[:, slot * ft:(slot + n) * ft].copy_(v[:, off * ft:(off + n) * ft])
        if self.key_mean is not None:
            means = k.unflatten(1, (-1, ft)).float().mean(2)  # [B, F, H, D]
            for slot, off, n in self.plan.runs:
                self.key_mean[layer, :, slot:slot + n].copy_(means[:, off:off + n])
        if self._tracking:
            self._seen_versions = self._versions()

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every valid slot, [B, n_valid*frame_tokens, H, D] views."""
        n = self.plan.valid_frames * self.frame_tokens
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def valid_with_current(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``valid`` but the current chunk's slots hold the given tensors (which may carry gradient,
        while the cache itself only ever stores detached values). Same key order as ``valid``."""
        hk, hv, order = self.history(layer)
        return assemble(hk, k, order, self.frame_tokens), assemble(hv, v, order, self.frame_tokens)

    def history(self, layer: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple]:
        """The valid slots of ``layer`` other than the current chunk's, as views of the buffers:
        (key pieces, value pieces, order). ``order`` lists, in slot order, ``(i, -1, 0)`` for history
        piece i and ``(-1, offset, frames)`` for the current chunk's frames; ``assemble`` puts them together."""
        ft = self.frame_tokens
        kc, vc = self.k[layer], self.v[layer]
        spans, order = self.history_spans()
        return (tuple(kc[:, lo * ft:hi * ft] for lo, hi in spans), tuple(vc[:, lo * ft:hi * ft] for lo, hi in spans),
                order)

    def history_spans(self) -> tuple[tuple[tuple[int, int], ...], tuple]:
        """The slot ranges [lo, hi) of ``history``'s pieces and its ``order``."""
        end = self.plan.valid_frames
        spans, order, pos = [], [], 0
        for slot, off, n in sorted(self.plan.runs):
            if slot > pos:
                order.append((len(spans), -1, 0))
                spans.append((pos, slot))
            order.append((-1, off, n))
            pos = slot + n
        if pos < end:
            order.append((len(spans), -1, 0))
            spans.append((pos, end))
        return tuple(spans), tuple(order)

    def history_slots(self) -> tuple[int, ...]:
        """The slots ``history`` reads for the current plan."""
        mine = {s for slot, _, n in self.plan.runs for s in range(slot, slot + n)}
        return tuple(s for s in range(self.plan.valid_frames) if s not in mine)

    # -- stamps (activation checkpointing) -----------------------------------------------------
    def _versions(self) -> tuple:
        bufs = (self.k, self.v) if self.key_mean is None else (self.k, self.v, self.key_mean)
        return tuple(b._version for b in bufs)

    def _notice_foreign_changes(self) -> None:
        now = self._versions()
        if now != self._seen_versions:
            self._foreign_changes += 1
            self._seen_versions = now

    def trackable(self) -> bool:
        """Whether stamps can see in-place changes (not for tensors made under ``torch.inference_mode``,
        which have no version counter)."""
        return not self.k.is_inference()

    def stamp(self) -> tuple:
        """A token for the current contents of the history slots of the current plan (all layers);
        ``changed_since(token)`` tells whether any of them may have been rewritten since."""
        if not self._tracking:
            self._tracking = True
            self._seen_versions = self._versions()
        self._notice_foreign_changes()
        slots = self.history_slots()
        return self._foreign_changes, slots, tuple(self._slot_writes[s] for s in slots)

    def changed_since(self, token: tuple) -> bool:
        foreign, slots, writes = token
        self._notice_foreign_changes()
        return foreign != self._foreign_changes or writes != tuple(self._slot_writes[s] for s in slots)

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


def assemble(pieces: tuple[torch.Tensor, ...], current: torch.Tensor, order: tuple, frame_tokens: int) -> torch.Tensor:
    """Keys (or values) of every valid slot in slot order from ``KVCache.history`` pieces and the current
    chunk's tensor [B, F*frame_tokens, H, D] (one concatenation; the current part may carry gradient)."""
    ft = frame_tokens
    parts = [pieces[i] if i >= 0 else current[:, off * ft:(off + n) * ft] for i, off, n in order]
    return torch.cat(parts, 1)


class TextContext:
    """Cross-attention keys/values of one prompt for every layer, computed once and reused."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]
