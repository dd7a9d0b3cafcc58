"""Where training data comes from: the toy world (procedural videos) or Wan (precomputed text embeddings).

A world gives, for global sample indices and a named stream (so stages draw independent samples):

- ``contexts(indices, device, stream)``: text states [B, text_len, text_dim] (float32);
- ``uncond(batch, device)``: the unconditional / negative context for classifier-free guidance;
- ``clips(indices, device, stream)``: clean model-space latents [B, C, F, H, W] (toy only: Wan training is
  data-free, the teacher is the released model);
- ``clip_shape``: (C, F, H, W) of a training clip.

The toy world renders bouncing shapes (``toyworld``), encodes prompts with the bundled ``ToyTextEncoder``
and videos with the fixed ``ToyCodec``; sample ``i`` of stream ``s`` is a pure function of (seed, s, i).
The Wan world reads text contexts lazily from a prompt store (``training/prompt_store.py``, encoded once from
a prompt list with umT5-XXL) or from the nodes' 'Save Text Embeddings' files, in an order shuffled per epoch
and stream (``PromptOrder``), with Wan's negative prompt as the unconditional context.
"""

from __future__ import annotations

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


class PromptOrder:
    """Which prompt a sample of a stream reads: the global sample index ``i`` is position ``i % n`` of epoch
    ``i // n``, whose order is a permutation keyed by (seed, stream, epoch). Every process of a run computes
    the same permutations, so the samples of one global batch are distinct prompts within an epoch; streams
    (the generator's "dmd", the critic's "dmd-critic", "ode_pairs") draw independent orders."""

    def __init__(self, count: int, seed: int, shuffle: bool = True, keep: int = 4):
        self.count, self.seed, self.shuffle, self.keep = int(count), int(seed), shuffle, keep
        self._perms: dict = {}

    def permutation(self, stream: str, epoch: int) -> torch.Tensor:
        key = (stream, int(epoch))
        if key not in self._perms:
            g = torch.Generator().manual_seed(key_seed(self.seed, "prompt-order", stream, int(epoch)))
            self._perms[key] = torch.randperm(self.count, generator=g)
            if len(self._perms) > self.keep:  # a few recent epochs of a few streams
                self._perms.pop(next(iter(self._perms)))
        return self._perms[key]

    def __call__(self, indices, stream: str) -> list[int]:
        if not self.shuffle:
            return [int(i) % self.count for i in indices]
        return [int(self.permutation(stream, int(i) // self.count)[int(i) % self.count]) for i in indices]


class WanWorld:
    """Wan2.1 prompts, data-free: text contexts from a prompt store (``world.prompt_store``, written by
    ``python -m self_forcing.training.encode_prompts``) or from a folder of the nodes' 'Save Text Embeddings'
    files (``world.prompts_dir``). Both are read lazily, a batch at a time, and padded per batch to
    ``model.text_len``. The unconditional context is ``world.negative`` (an embeddings file) when set, else
    the store's negative prompt (Wan's default, encoded with the store), else zeros."""

    kind = "wan"

    def __init__(self, cfg: TrainConfig, shuffle: bool = True):
        from .prompt_store import EmbeddingFiles, PromptStore

        wc, mc = cfg.world, cfg.model
        self.text_len, self.text_dim = mc.text_len, mc.text_dim
        if wc.prompt_store and wc.prompts_dir:
            raise ValueError("set world.prompt_store or world.prompts_dir, not both")
        if wc.prompt_store:
            self.source = PromptStore(wc.prompt_store)
        elif wc.prompts_dir:
            self.source = EmbeddingFiles(wc.prompts_dir)
        else:
            raise ValueError("the Wan world needs prompts: set world.prompt_store to a folder made by "
                             "`python -m self_forcing.training.encode_prompts` (or world.prompts_dir to 'Save "
                             "Text Embeddings' files)")
        where = wc.prompt_store or wc.prompts_dir
        if self.source.dim != self.text_dim:
            raise ValueError(f"{where}: embeddings of width {self.source.dim}, the model expects {self.text_dim} "
                             "(model.text_dim; Wan's umT5-XXL is 4096)")
        self.order = PromptOrder(len(self.source), cfg.run.seed, shuffle)
        if wc.negative:
            from ..sf_model.text_embeds import load_text_embeds

            neg = load_text_embeds(wc.negative)[0][0]
            if neg.shape[-1] != self.text_dim:
                raise ValueError(f"{wc.negative}: embeddings of width {neg.shape[-1]}, the model expects "
                                 f"{self.text_dim}")
        else:
            neg = self.source.negative()
        self.negative = torch.zeros(1, self.text_len, self.text_dim)
        if neg is not None:
            n = min(neg.shape[0], self.text_len)
            self.negative[0, :n] = neg[:n].float()
        self._negative_on: dict = {}
        self.clip_shape = (mc.in_dim, wc.frames, wc.latent_height, wc.latent_width)

    def __len__(self) -> int:
        return len(self.source)

    def prompt_ids(self, indices, stream: str) -> list[int]:
        """The store rows that the samples ``indices`` of ``stream`` read (shuffled per epoch)."""
        return self.order(indices, stream)

    def contexts(self, indices, device, stream: str) -> torch.Tensor:
        """[B, text_len, text_dim] float32 on ``device``; only these prompts are read from disk."""
        return self.source.batch(self.prompt_ids(indices, stream), self.text_len, device, torch.float32)

    def uncond(self, batch: int, device) -> torch.Tensor:
        key = str(device)
        if key not in self._negative_on:
            self._negative_on[key] = self.negative.to(device)
        return self._negative_on[key].expand(batch, -1, -1)

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
