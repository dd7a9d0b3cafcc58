"""Per-chunk noise of the streaming sampler.

Noise is drawn on the CPU from a generator seeded per chunk (``chunk_seed``), so a seed gives the same
video on every device and every chunk is reproducible on its own. ``chunk_noise`` draws a chunk's
tensors at once; ``NoiseStream`` draws the same numbers lazily, one tensor when the sampler first needs
it, and on CUDA uploads them through a few pinned host buffers allocated once per stream and reused
round-robin: a fresh pinned allocation per chunk (what ``pin_memory()`` does when the host runs ahead
of the GPU) stalls the host until the GPU catches up, which starves the GPU at every chunk.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def chunk_seed(seed: int, chunk_index: int) -> int:
    """A 64-bit seed for one chunk, independent of every other chunk."""
    x = (int(seed) * _MIX + (chunk_index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) & _MASK64


def chunk_noise(seed: int, chunk_index: int, count: int, shape, device) -> list[torch.Tensor]:
    """``count`` standard-normal tensors for one chunk (initial noise, then one per re-noising)."""
    g = torch.Generator("cpu").manual_seed(chunk_seed(seed, chunk_index))
    out = [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(count)]
    return [n.to(device) for n in out]


class NoiseStream:
    """The noise of one stream, chunk by chunk: ``stream.chunk(ci, count, shape)`` is a sequence equal
    to ``chunk_noise(seed, ci, count, shape, device)``, each tensor drawn on first access.

    On CUDA the draws go through ``slots`` pinned buffers of ``max_numel`` floats; a slot is reused
    only after the copy out of it (``slots`` draws earlier) has run, which bounds how far the host
    may run ahead of the GPU (3 chunks with the default 4 steps) without ever allocating.
    """

    def __init__(self, seed: int, device, max_numel: int, slots: int = 15):
        self.seed, self.device = seed, torch.device(device)
        self.staged = self.device.type == "cuda"
        if self.staged:
            self.buffers = torch.empty((slots, max_numel), dtype=torch.float32, pin_memory=True)
            self.events: list = [None] * slots
        self.draws = 0

    def chunk(self, chunk_index: int, count: int, shape) -> "ChunkDraws":
        return ChunkDraws(self, torch.Generator("cpu").manual_seed(chunk_seed(self.seed, chunk_index)),
                          count, tuple(shape))

    def draw(self, generator: torch.Generator, shape: tuple) -> torch.Tensor:
        if not self.staged:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        slot = self.draws % len(self.events)
        self.draws += 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # its previous copy ran long ago unless the host is far ahead
        n = math.prod(shape)
        if n > self.buffers.shape[1]:
            raise ValueError(f"noise of shape {shape} exceeds the staging buffers ({self.buffers.shape[1]})")
        host = self.buffers[slot, :n].view(shape)
        torch.randn(shape, generator=generator, dtype=torch.float32, out=host)
        out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events[slot] = event
        return out


class ChunkDraws(Sequence):
    """One chunk's noise tensors, drawn in order on first access (same numbers as ``chunk_noise``)."""

    def __init__(self, source: NoiseStream, generator: torch.Generator, count: int, shape: tuple):
        self.source, self.generator, self.count, self.shape = source, generator, count, shape
        self.items: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        i %= self.count
        while len(self.items) <= i:
            self.items.append(self.source.draw(self.generator, self.shape))
        return self.items[i]
