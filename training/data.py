"""Where training data comes from: the toy world (procedural videos) or Wan (precomputed text embeddings).

A world gives, for global sample indices and a named stream (so stages draw independent samples):

- ``contexts(indices, device, stream)``: text states [B, text_len, text_dim] (float32);
- ``uncond(batch, device)``: the unconditional / negative context for classifier-free guidance;
- ``clips(indices, device, stream)``: clean model-space latents [B, C, F, H, W] (toy only: Wan training is
  data-free, the teacher is the released model);
- ``clip_shape``: (C, F, H, W) of a training clip.

The toy world renders bouncing shapes (``toyworld``), encodes prompts with the bundled ``ToyTextEncoder``
and videos with the fixed ``ToyCodec``; sample ``i`` of stream ``s`` is a pure function of (seed, s, i).
The Wan world reads prompt embeddings saved by the nodes' 'Save Text Embeddings' (``*.safetensors`` in
``world.prompts_dir``; each file may hold several prompts) and the negative prompt's embeddings.
"""

from __future__ import annotations

import glob
import os
import random

import torch

from .config import TrainConfig
from .engine import key_seed


def toy_scene(seed: int, stream: str, index: int, max_objects: int | None = None):
    """(Scene, start frame) of sample ``index`` of a toy stream: a pure function of its arguments."""
    from ..toy.world import sample_scene

    s = key_seed(seed, "toy", stream, int(index))
    start = random.Random(s ^ 0x5EED).randint(0, 1000)
    return sample_scene(s, max_objects), start


class ToyWorld:
    kind = "toy"

    def __init__(self, cfg: TrainConfig, text_encoder, codec):
        self.cfg = cfg
        self.seed = cfg.run.seed
        self.size, self.frames = cfg.world.size, cfg.world.frames
        self.text_encoder, self.codec = text_encoder, codec
        self.max_objects = cfg.world.max_objects
        probe = torch.zeros(1, 3, 1, self.size, self.size)
        c, _, h, w = self.codec.encode(probe).shape[1:]
        if c != cfg.model.in_dim:
            raise ValueError(f"the toy codec makes {c} latent channels but model.in_dim is {cfg.model.in_dim}")
        self.clip_shape = (c, self.frames, h, w)

    # -- scenes ----------------------------------------------------------------------------------
    def scene(self, index: int, stream: str):
        return toy_scene(self.seed, stream, index, self.max_objects)

    def prompts(self, indices, stream: str) -> list[str]:
        return [self.scene(i, stream)[0].prompt for i in indices]

    # -- tensors ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], device) -> torch.Tensor:
        with torch.no_grad():
            return self.text_encoder.encode(list(prompts)).float().to(device)

    def contexts(self, indices, device, stream: str) -> torch.Tensor:
        return self.encode_prompts(self.prompts(indices, stream), device)

    def uncond(self, batch: int, device) -> torch.Tensor:
        """The empty prompt: all-zero context rows (how the toy encoder pads)."""
        return torch.zeros(batch, self.cfg.model.text_len, self.cfg.model.text_dim, device=device)

    def codec_on(self, device):
        """The codec with its buffers on ``device`` (one copy per device)."""
        return codec_on(self.codec, device)

    @torch.no_grad()
    def clips(self, indices, device, stream: str) -> torch.Tensor:
        from ..toy.world import render_batch

        items = [self.scene(i, stream) for i in indices]
        video = render_batch([s for s, _ in items], [t for _, t in items], self.frames, self.size, device=device)
        return self.codec_on(video.device).encode(video).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixel video [B, 3, T, H, W] in [-1, 1] (float32, on the latents' device)."""
        return self.codec_on(latents.device).decode(latents.float()).float().clamp(-1, 1)

    def videos(self, indices, device, stream: str, num_frames: int | None = None) -> torch.Tensor:
        """Ground-truth pixel videos [B, 3, T, H, W] in [-1, 1] of the same samples (for evaluation)."""
        from ..toy.world import render_batch

        items = [self.scene(i, stream) for i in indices]
        return render_batch([s for s, _ in items], [t for _, t in items], num_frames or self.frames, self.size,
                            device=device)


_CODEC_COPIES: dict = {}


def codec_on(codec, device):
    """``codec`` itself when it already lives on ``device``, else a cached copy moved there."""
    import copy

    device = torch.device(device)
    buffers = list(codec.buffers()) + list(codec.parameters())
    here = buffers[0].device if buffers else torch.device("cpu")
    if here == device or (here.type == device.type and device.index is None):
        return codec
    key = (id(codec), str(device))
    if key not in _CODEC_COPIES:
        _CODEC_COPIES[key] = copy.deepcopy(codec).to(device)
    return _CODEC_COPIES[key]


class WanWorld:
    kind = "wan"

    def __init__(self, cfg: TrainConfig):
        from ..sf_model.text_embeds import load_text_embeds

        wc, mc = cfg.world, cfg.model
        self.text_len, self.text_dim = mc.text_len, mc.text_dim
        if not wc.prompts_dir or not os.path.isdir(wc.prompts_dir):
            raise ValueError(f"world.prompts_dir {wc.prompts_dir!r} is not a folder; save prompt embeddings there "
                             "with the 'Save Text Embeddings' node (one prompt or a batch per file)")
        files = sorted(glob.glob(os.path.join(wc.prompts_dir, "**", "*.safetensors"), recursive=True))
        rows = []
        for path in files:
            t, _ = load_text_embeds(path)
            rows += [self._fit(r[None], path) for r in t]
        if not rows:
            raise ValueError(f"no text embeddings (*.safetensors) found in {wc.prompts_dir}")
        self.rows = rows
        if wc.negative:
            neg, _ = load_text_embeds(wc.negative)
            self.negative = self._fit(neg[:1], wc.negative)
        else:
            self.negative = torch.zeros(1, self.text_len, self.text_dim)
        self.clip_shape = (mc.in_dim, wc.frames, wc.latent_height, wc.latent_width)

    def _fit(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if t.shape[-1] != self.text_dim:
            raise ValueError(f"{path}: embeddings of width {t.shape[-1]}, the model expects {self.text_dim}")
        t = t[:, :self.text_len].float()
        pad = self.text_len - t.shape[1]
        return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t

    def contexts(self, indices, device, stream: str) -> torch.Tensor:
        return torch.cat([self.rows[int(i) % len(self.rows)] for i in indices]).to(device)

    def uncond(self, batch: int, device) -> torch.Tensor:
        return self.negative.expand(batch, -1, -1).to(device)

    def clips(self, indices, device, stream: str) -> torch.Tensor:
        raise ValueError("the Wan world is data-free: the teacher is the released Wan2.1 model "
                         "(set world.teacher_path) and no video clips are needed")


class RandomWorld:
    """Random but sample-keyed data of a given shape: item i of a stream is the same whoever draws it (any
    process, any batch split). For smoke tests, memory/speed benchmarks and the distributed-equivalence
    checks, where what the model learns does not matter."""

    kind = "toy"

    def __init__(self, clip_shape=(16, 6, 4, 4), text_len: int = 4, text_dim: int = 16, clip_scale: float = 0.5,
                 clip_mean: float = 0.0):
        self.clip_shape = tuple(clip_shape)
        self.text_len, self.text_dim = text_len, text_dim
        self.clip_scale, self.clip_mean = clip_scale, clip_mean

    @staticmethod
    def _randn(shape, *key) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(*key)))

    def contexts(self, indices, device, stream: str) -> torch.Tensor:
        return torch.stack([self._randn((self.text_len, self.text_dim), "ctx", stream, i) for i in indices]).to(device)

    def uncond(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, self.text_len, self.text_dim, device=device)

    def clips(self, indices, device, stream: str) -> torch.Tensor:
        return torch.stack([self._randn(self.clip_shape, "clip", stream, i) * self.clip_scale + self.clip_mean
                            for i in indices]).to(device)


def make_world(cfg: TrainConfig, device=None):
    """The world of a config (toy: builds the toy text encoder and codec from ``toy_parts``)."""
    if cfg.world.kind == "wan":
        return WanWorld(cfg)
    from ..toy.bundle import build_toy_parts

    text_seed = cfg.world.text_seed if cfg.world.text_seed is not None else cfg.run.seed
    text_encoder, codec = build_toy_parts(cfg.model.text_dim, cfg.model.text_len, text_seed)
    return ToyWorld(cfg, text_encoder, codec)
