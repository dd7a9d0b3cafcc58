"""Minimal toy text encoder and codec used when ``training.toy_text`` / ``training.codec`` are absent.

- ``LocalToyText``: each word of the toy vocabulary has a fixed random vector (seeded), plus a fixed
  random vector per position; unknown words share one vector; padded with zeros to ``text_len``.
- ``LocalToyCodec``: fixed invertible pixel-unshuffle codec: 2x2 space-to-depth (12 values), an orthonormal
  12 -> 16 channel map and a fixed affine normalisation; ``decode(encode(x)) == x``; 64x64 video ->
  16 x 32 x 32 latents, no temporal compression.

Both keep their tables as buffers so they bundle into a checkpoint's ``extras``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = ("a", "and", "bouncing", "on", "background", "circle", "square", "triangle", "red", "green", "blue",
         "yellow", "magenta", "cyan", "white", "black", "gray", "navy", "brown", "<unk>")


class LocalToyText(nn.Module):
    def __init__(self, text_dim: int = 4096, text_len: int = 16, seed: int = 0):
        super().__init__()
        self.text_dim, self.text_len = int(text_dim), int(text_len)
        g = torch.Generator().manual_seed(int(seed) + 17)
        self.register_buffer("words", torch.randn(len(VOCAB), self.text_dim, generator=g))
        self.register_buffer("positions", 0.5 * torch.randn(self.text_len, self.text_dim, generator=g))
        self.index = {w: i for i, w in enumerate(VOCAB)}

    def forward(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.text_dim, device=self.words.device)
        for b, p in enumerate(prompts):
            ids = [self.index.get(w, self.index["<unk>"]) for w in p.lower().replace(",", " ").split()]
            ids = ids[:self.text_len]
            if ids:
                out[b, :len(ids)] = self.words[ids] + self.positions[:len(ids)]
        return out


class LocalToyCodec(nn.Module):
    def __init__(self, channels: int = 16, factor: int = 2, seed: int = 0):
        super().__init__()
        self.factor = int(factor)
        n = 3 * self.factor ** 2
        if channels < n:
            raise ValueError(f"the codec needs at least {n} latent channels to be invertible, got {channels}")
        q, _ = torch.linalg.qr(torch.randn(channels, n, generator=torch.Generator().manual_seed(int(seed) + 29)))
        self.register_buffer("basis", q)  # [channels, n], orthonormal columns
        self.register_buffer("shift", torch.tensor(-0.5))
        self.register_buffer("scale", torch.tensor(3.0))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> [B, C, T, H/f, W/f]."""
        b, c, t, h, w = video.shape
        x = video.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = F.pixel_unshuffle(x, self.factor)
        x = (x - self.shift) * self.scale
        z = torch.einsum("kn,bnhw->bkhw", self.basis.to(x.device), x)
        return z.reshape(b, t, -1, h // self.factor, w // self.factor).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] -> [B, 3, T, h*f, w*f] (not clamped)."""
        b, k, t, h, w = latents.shape
        z = latents.float().permute(0, 2, 1, 3, 4).reshape(b * t, k, h, w)
        x = torch.einsum("kn,bkhw->bnhw", self.basis.to(z.device), z) / self.scale + self.shift
        x = F.pixel_shuffle(x, self.factor)
        return x.reshape(b, t, 3, h * self.factor, w * self.factor).permute(0, 2, 1, 3, 4)
