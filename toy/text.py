"""A tiny text encoder for toy-world prompts, standing in for Wan's umT5 context.

Words -> embedding table + learned position embedding (+ optional pre-norm transformer layers and a final
LayerNorm) ->
[B, max_len, text_dim], with the rows after each prompt's last token exactly zero (as Wan pads umT5
context). Initialisation is a pure function of ``seed`` and leaves the global RNG untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .render import upload
from .world import BACKGROUND_COLOURS, SHAPE_COLOURS, SHAPES

PAD = "<pad>"
# Index 0 is padding; the rest are every word a toy prompt can hold, in a fixed order.
VOCAB: tuple[str, ...] = (
    PAD, "a", "and", "bouncing", "on", "background",
    *SHAPE_COLOURS, *BACKGROUND_COLOURS, *SHAPES,
)
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
# Longest toy prompt: 3 objects (3 words each) + 2 "and" + "bouncing on a <colour> background" = 16.
DEFAULT_MAX_LEN = 16


def tokenize_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt; commas and full stops are dropped."""
    return prompt.lower().replace(",", " ").replace(".", " ").split()


class _Block(nn.Module):
    """Pre-norm self-attention + GELU MLP, with a key padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.num_heads, D // self.num_heads).unbind(2)
        keep = mask[:, None, None, :]  # [B, 1, 1, L]: attend only to real tokens
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ToyTextEncoder(nn.Module):
    """Encode toy prompts to [B, max_len, text_dim] context with exactly-zero padding rows."""

    def __init__(self, text_dim: int = 32, max_len: int = DEFAULT_MAX_LEN, num_layers: int = 1,
                 num_heads: int = 4, seed: int = 0, final_norm: bool = True, width: int | None = None):
        super().__init__()
        inner = text_dim if width is None else int(width)
        if text_dim < 1 or max_len < 1 or num_layers < 0 or inner < 1:
            raise ValueError(f"need text_dim >= 1, max_len >= 1, num_layers >= 0, width >= 1; got {text_dim}, "
                             f"{max_len}, {num_layers}, {width}")
        if num_layers and inner % num_heads:
            raise ValueError(f"the encoder width {inner} must be divisible by num_heads {num_heads}")
        self.text_dim, self.max_len, self.num_layers, self.num_heads, self.seed = (
            text_dim, max_len, num_layers, num_heads, seed)
        self.width = None if width is None else inner
        self.final_norm = bool(final_norm)
        # The layers run at ``width`` (default text_dim); a fixed projection widens them to text_dim, so a
        # 4096-wide (umT5-shaped) context costs a few MB instead of a 4096-wide transformer layer (~540 MB).
        self.token_embedding = nn.Embedding(len(VOCAB), inner)
        self.position_embedding = nn.Parameter(torch.empty(max_len, inner))
        self.blocks = nn.ModuleList(_Block(inner, num_heads) for _ in range(num_layers))
        self.out = nn.Linear(inner, text_dim, bias=False) if self.width is not None else nn.Identity()
        self.norm = nn.LayerNorm(text_dim, elementwise_affine=False) if self.final_norm else nn.Identity()
        self.reset_parameters(seed)

    @property
    def vocab(self) -> tuple[str, ...]:
        return VOCAB

    def config(self) -> dict:
        """Constructor arguments; ``ToyTextEncoder(**enc.config())`` rebuilds the same architecture."""
        out = {"text_dim": self.text_dim, "max_len": self.max_len, "num_layers": self.num_layers,
               "num_heads": self.num_heads, "seed": self.seed, "final_norm": self.final_norm}
        if self.width is not None:
            out["width"] = self.width
        return out

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` with a private generator (global RNG untouched)."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in self.named_parameters():
            if name.startswith("token_embedding"):
                val = torch.randn(p.shape, generator=g)
            elif name == "position_embedding":
                val = torch.randn(p.shape, generator=g) * 0.5
            elif name.endswith("bias"):
                val = torch.zeros(p.shape)
            elif p.dim() == 1:  # LayerNorm weights
                val = torch.ones(p.shape)
            else:
                val = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            p.copy_(val.to(p.dtype))

    def tokenize(self, prompts: list[str], device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_len] (0 = padding) and a bool mask of real tokens."""
        if isinstance(prompts, str):
            raise ValueError("encode/tokenize take a list of prompts, not one string: wrap it as [prompt]")
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = tokenize_words(prompt)
            if not words:
                raise ValueError(f"prompt {b} is empty; toy prompts look like "
                                 "'a red circle bouncing on a black background'")
            if len(words) > self.max_len:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than max_len {self.max_len}; "
                                 "build the encoder with a larger max_len")
            for i, w in enumerate(words):
                if w not in WORD_TO_ID or w == PAD:
                    raise ValueError(f"unknown word {w!r} in prompt {prompt!r}; "
                                     f"the toy vocabulary is: {', '.join(VOCAB[1:])}")
                ids[b, i] = WORD_TO_ID[w]
        ids = upload(ids, device) if device is not None else ids  # no host sync on CUDA
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(self.out(x))
        return x * mask[..., None].to(x.dtype)  # padding rows exactly zero

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """[B, max_len, text_dim] context on ``device`` (default: the encoder's device)."""
        own = self.token_embedding.weight.device
        device = own if device is None else torch.device(device)
        if device != own and not (device.type == own.type and device.index is None):
            raise ValueError(f"the encoder is on {own} but encode was asked for {device}; "
                             f"move it first with encoder.to({str(device)!r})")
        ids, mask = self.tokenize(prompts, own)
        return self(ids, mask)
