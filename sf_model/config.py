"""Model configurations of the Wan2.1 DiT (1.3B, 14B, tiny test sizes) and inference from a state dict."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping

import torch

# What a config field may hold: (kind, lowest, highest) -- kind "int", "float" (finite, above its lowest),
# "bool" or "patch" (three ints). The ceilings are far above any Wan model and keep a damaged or hostile
# checkpoint's metadata from asking for absurd memory (a RoPE table of 1e12 frames) before anything is
# checked against the weights.
CONFIG_FIELDS: dict[str, tuple] = {
    "dim": ("int", 1, 1 << 16),
    "ffn_dim": ("int", 1, 1 << 18),
    "num_heads": ("int", 1, 1 << 10),
    "num_layers": ("int", 1, 1 << 10),
    "patch_size": ("patch", 1, 64),
    "in_dim": ("int", 1, 1 << 12),
    "out_dim": ("int", 1, 1 << 12),
    "text_dim": ("int", 1, 1 << 16),
    "text_len": ("int", 1, 1 << 16),
    "freq_dim": ("int", 2, 1 << 16),
    "qk_norm": ("bool", None, None),
    "cross_attn_norm": ("bool", None, None),
    "eps": ("float", 0.0, 1.0),
    "rope_theta": ("float", 0.0, 1e12),
    "rope_max_frames": ("int", 1, 1 << 16),
}


def check_field(name: str, value, kind: str, low=None, high=None):
    """``value`` checked against one table row (see ``CONFIG_FIELDS``); ValueError naming ``name`` if not."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if kind == "patch":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
            raise ValueError(f"{name} must be three integers (frames, height, width), got {value!r}")
        return tuple(check_field(f"{name}[{i}]", v, "int", low, high) for i, v in enumerate(value))
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        value = int(value)
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        value = float(value)
    above = value > low if kind == "float" else value >= low
    if not (above and value <= high):
        bounds = f"({low}, {high}]" if kind == "float" else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1 text-to-video DiT. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # Length of Wan's temporal RoPE table: absolute frame positions beyond it are refused unless
    # the caller extends positions explicitly (see CausalWanModel.rope).
    rope_max_frames: int = 1024

    def __post_init__(self):
        for name, (kind, low, high) in CONFIG_FIELDS.items():
            object.__setattr__(self, name, check_field(name, getattr(self, name), kind, low, high))
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even (cos and sin halves)")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per axis (t, h, w): 22/21/21 for head_dim 128, as Wan splits them."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WanConfig":
        """A config from a dict (checkpoint metadata): every field is checked against ``CONFIG_FIELDS``
        (ValueError naming the field)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"the model config must be a JSON object of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(map(str, d)) - names
        if unknown:
            raise ValueError(f"unknown WanConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)


WAN_1_3B = WanConfig()
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# Small sizes with Wan's structure, for tests and the toy world. head_dim 16 -> RoPE pairs 4/2/2.
TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32)


def size_name(config: WanConfig) -> str:
    """A human label for a config: '1.3B', '14B' or 'custom (dim 64, 2 layers)'."""
    core = lambda c: (c.dim, c.ffn_dim, c.num_heads, c.num_layers)  # noqa: E731
    if core(config) == core(WAN_1_3B):
        return "1.3B"
    if core(config) == core(WAN_14B):
        return "14B"
    return f"custom (dim {config.dim}, {config.num_layers} layers)"


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> WanConfig:
    """Infer the architecture from a Wan-named (bare) state dict.

    The head count is not visible in the weights (q/k norms span the full width); Wan uses
    head_dim 128, which is assumed unless ``num_heads`` is given.
    """
    def get(name):
        if name not in state_dict:
            raise KeyError(f"cannot infer the model config: key '{name}' is missing")
        return state_dict[name]

    pe = get("patch_embedding.weight")  # [dim, in_dim, pt, ph, pw]
    dim, in_dim = int(pe.shape[0]), int(pe.shape[1])
    patch = tuple(int(s) for s in pe.shape[2:])
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = max(layers) + 1 if layers else 0
    ffn_dim = int(get("blocks.0.ffn.0.weight").shape[0])
    text_dim = int(get("text_embedding.0.weight").shape[1])
    freq_dim = int(get("time_embedding.0.weight").shape[1])
    out_dim = int(get("head.head.weight").shape[0]) // (patch[0] * patch[1] * patch[2])
    if num_heads is None:
        if dim % 128:
            raise ValueError(
                f"dim {dim} is not a multiple of Wan's head_dim 128; pass num_heads explicitly "
                "or load a file that stores its config in the metadata")
        num_heads = dim // 128
    return WanConfig(
        dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, patch_size=patch,
        in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
        qk_norm="blocks.0.self_attn.norm_q.weight" in state_dict,
        cross_attn_norm="blocks.0.norm3.weight" in state_dict,
    )
