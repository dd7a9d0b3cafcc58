"""Stage 3: Self Forcing with Distribution Matching Distillation.

Generator update (every ``critic_ratio`` steps)
    The student rolls out a whole clip block by block through a KV cache by calling the sampler's own
    ``denoise_chunk`` (with ``exit_index`` and ``grad_at_exit=True``) and ``commit_chunk``: steps before the
    exit run without gradient, the exit step's forward records gradient, and the block's clean K/V are
    written by a no-grad pass. The cache only ever stores detached K/V (``forward_chunk`` writes
    ``k.detach()``), so a block's gradient flows through its own exit-step forward only -- unlike the
    official code's in-place writes, which leak gradient into earlier blocks. One exit step per rollout
    (the same for every block), drawn from the run's seed and broadcast from rank 0.

    DMD gradient on the rolled-out video x: noise it to a random shifted level (clamped to
    [min_t, max_t]); grad = x0_fake - x0_real, with the real score = the frozen teacher under CFG
    (official form cond + g (cond - uncond)) and the fake score = the critic; normalised per sample by
    mean |x - x0_real|; loss = 0.5 * MSE(x, x - grad) in float64, whose gradient w.r.t. x is grad / N.

Critic update (every step)
    A fresh no-grad rollout; the critic learns the flow of the student's samples (flow-matching MSE).

Models (``training.roles``): the generator starts from ``models.generator_init``; the critic is its own
trainable model of the generator's architecture (``models.critic_init``); the real score is a separate frozen
model of any size (``models.real_score``, Wan2.1-T2V-14B in the paper), bf16 on CUDA. ``DmdTrainer.from_models``
takes models already built (the memory benchmark builds random ones on the GPU).

Rollouts longer than the loss window (``dmd.rollout_frames`` > ``world.frames``, the official
num_training_frames > 21): a random whole number of blocks per rollout, gradient only in the blocks of the
last ``world.frames`` frames, the losses on those frames with the first latent re-encoded as an image latent
(``training.loss_window``) and the window's first block left out of the DMD loss.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..sf_model.cache import KVCache
from ..sf_model.sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk
from ..sf_model.schedule import Step, add_noise, make_steps, shift_sigma
from .config import TrainConfig
from .engine import (Runtime, Trainable, accumulate, broadcast_int, generator, run_loop, sample_indices,
                     seeded_randn)
from .distributed import shard_frozen
from .loss_window import LossWindow, ToyReencoder, VaeReencoder, draw_rollout_frames, loss_window
from .models import load_dit, save_dit
from .ode_init import sampling_meta
from .roles import (check_generator_architecture, check_real_score, checkpoint_architecture, describe,
                    frozen_dtype, load_frozen, same_architecture)

STAGE = "dmd"


# -- rollout through the sampler ---------------------------------------------------------------------
def rollout(model, text, *, batch: int, clip_shape: Sequence[int], steps: Sequence[Step], opts: StreamOptions,
            exit_index: int, noise_for: Callable[[int, int, int], list[torch.Tensor]], grad: bool,
            cache_dtype: torch.dtype, cache: KVCache | None = None, grad_from: int = 0) -> torch.Tensor:
    """Generate a clip [B, C, F, H, W] block by block with the sampler's ``denoise_chunk``/``commit_chunk``.

    ``model``: a CausalWanModel or an ``engine.Wrapped``; ``text``: its ``encode_text`` output (carrying
    gradient when the text path should train); ``noise_for(block, frames, count)`` -> ``count`` noise
    tensors [B, C, frames, H, W]; ``grad``: record gradient at each block's exit step -- of the blocks that
    start at frame ``grad_from`` or later (the official trainer's last-21-frames rule: earlier blocks exit at
    the same step without gradient).
    """
    c, f, h, w = clip_shape
    cfg = model.config
    ph, pw = cfg.patch_size[1:]
    if not 0 <= exit_index < len(steps):
        raise ValueError(f"exit_index {exit_index} outside the {len(steps)} denoising steps")
    if cache is None:
        cache = KVCache(cfg.num_layers, batch, (h // ph) * (w // pw), cfg.num_heads, cfg.head_dim, window=f,
                        dtype=cache_dtype, device=model.device)
    plan = chunk_plan(0, f, opts.frames_per_block)
    outs = []
    for bi, (start, n) in enumerate(plan):
        noise = noise_for(bi, n, exit_index + 1)
        x0 = denoise_chunk(model, text, cache, start, noise, steps, opts, exit_index=exit_index,
                           grad_at_exit=grad and start >= grad_from)
        outs.append(x0)
        if bi < len(plan) - 1:
            commit_chunk(model, text, cache, start, x0, opts)
    return torch.cat(outs, dim=2)


# -- losses ------------------------------------------------------------------------------------------
def predict_x0(model, x_t: torch.Tensor, sigma: torch.Tensor, context) -> torch.Tensor:
    """Bidirectional x0 prediction at per-sample noise levels ``sigma`` [B]."""
    b, f = x_t.shape[0], x_t.shape[2]
    t = (sigma * 1000.0)[:, None].expand(b, f)
    flow = model(x_t, t, context).float()
    return x_t.float() - sigma[:, None, None, None, None] * flow


@torch.no_grad()
def dmd_gradient(video: torch.Tensor, fake_score, real_score, cond: torch.Tensor, uncond: torch.Tensor,
                 sigma: torch.Tensor, noise: torch.Tensor, guidance: float) -> tuple[torch.Tensor, dict]:
    """The normalised DMD gradient (fake - real) on ``video`` [B, C, F, H, W] (float32, no graph)."""
    x = video.detach().float()
    x_t = add_noise(x, noise, sigma[:, None, None, None, None])
    fake = predict_x0(fake_score, x_t, sigma, cond)
    both = predict_x0(real_score, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
    c, u = both.chunk(2)
    real = c + guidance * (c - u)
    grad = fake - real
    norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = torch.nan_to_num(grad / norm)
    return grad, {"dmd_grad_abs": grad.abs().mean(), "fake_real_gap": (fake - real).abs().mean()}


def dmd_loss(video: torch.Tensor, grad: torch.Tensor, loss_from: int = 0) -> torch.Tensor:
    """0.5 * MSE(x, x - grad) in float64 over the frames from ``loss_from`` on: d loss / d x = grad / numel
    there, 0 on the frames before (the official gradient mask)."""
    v = video[:, :, loss_from:].double()
    return 0.5 * F.mse_loss(v, (v - grad[:, :, loss_from:].double()).detach())


def critic_loss(critic, video: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score on the student's samples."""
    x = video.detach().float()
    b, f = x.shape[0], x.shape[2]
    x_t = add_noise(x, noise, sigma[:, None, None, None, None])
    flow = critic(x_t, (sigma * 1000.0)[:, None].expand(b, f), cond).float()
    return F.mse_loss(flow, noise - x)


# -- randomness ------------------------------------------------------------------------------------
def score_sigmas(indices, dc, *key) -> torch.Tensor:
    """Per-sample score noise levels: u ~ U(0, 1), shifted, clamped to [min_t, max_t]."""
    u = torch.stack([torch.rand((), generator=generator(*key, i)) for i in indices])
    return shift_sigma(u, dc.score_shift).clamp(dc.min_t, dc.max_t)


def draw_exit(num_steps: int, rt: Runtime, *key) -> int:
    """The rollout's exit step: drawn from the run's seed on rank 0 and broadcast to every rank."""
    value = int(torch.randint(0, num_steps, (), generator=generator(*key))) if rt.is_main else 0
    return broadcast_int(value, rt)


# -- the stage ---------------------------------------------------------------------------------------
def self_forcing_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, "self_forcing.safetensors")


class DmdTrainer:
    """Holds the generator, critic and real score; ``step(step)`` is one iteration of the official loop.

    ``generator`` and ``critic``: trainable models of ``cfg.model``'s architecture (float32 master weights);
    ``real_score``: a frozen bidirectional model of any size that reads the same latents and text (bf16 on
    CUDA). Build from the role paths with ``from_paths`` or from models in memory with ``from_models``.
    """

    def __init__(self, cfg: TrainConfig, rt: Runtime, world, generator: torch.nn.Module, critic: torch.nn.Module,
                 real_score: torch.nn.Module, reencoder=None):
        self.real = check_roles(cfg, rt, generator, critic, real_score)
        self.cfg, self.rt, self.world = cfg, rt, world
        dc = self.dc = cfg.dmd
        common = dict(betas=dc.betas, weight_decay=dc.weight_decay, grad_clip=dc.grad_clip, warmup=dc.warmup)
        if cfg.lora.enabled:  # adapters on the generator's linears, base frozen (training.lora)
            from .lora import apply_lora

            apply_lora(generator, cfg.lora, seed=cfg.run.seed)
        self.gen = Trainable("generator", generator, rt, lr=dc.lr, ema_decay=dc.ema_decay, ema_start=dc.ema_start,
                               ema_warmup=dc.ema_warmup, **common)
        self.critic = Trainable("critic", critic, rt, lr=dc.lr_critic, **common)
        self.opts = cfg.sampling.stream_options()
        self.steps = make_steps(cfg.sampling.steps, cfg.sampling.shift, cfg.sampling.warp)
        self.clip_shape = tuple(world.clip_shape)
        self.window = self.clip_shape[1]  # the frames the scores see (world.frames)
        self.max_frames = max(dc.rollout_frames, self.window)
        self.reencoder = reencoder
        if self.max_frames > self.window and dc.reencode_first and reencoder is None:
            self.reencoder = make_reencoder(cfg, world, rt.device)

    @classmethod
    def from_models(cls, cfg: TrainConfig, rt: Runtime, world, generator, critic, real_score,
                    reencoder=None) -> "DmdTrainer":
        """A trainer over models already built (e.g. random weights made on the GPU by a benchmark)."""
        return cls(cfg, rt, world, generator, critic, real_score, reencoder)

    @classmethod
    def from_paths(cls, cfg: TrainConfig, rt: Runtime, world, generator_init: str, critic_init: str,
                   real_score: str) -> "DmdTrainer":
        """Load the three roles: generator and critic trainable in float32, the real score frozen
        (``roles.load_frozen``: bf16 on CUDA) with its own architecture."""
        for role, path in (("critic", critic_init), ("generator", generator_init)):  # before loading anything
            arch = checkpoint_architecture(path)
            if not same_architecture(arch, cfg.model):
                raise ValueError(f"the {role} would start from {path}, which is {describe(arch)}; the {role} "
                                 f"is trained and needs the generator's architecture ([model]: "
                                 f"{describe(cfg.model)})" + (", e.g. models.critic_init = Wan2.1-T2V-1.3B"
                                                              if role == "critic" else ""))
        real = load_frozen(real_score, rt.device)
        check_real_score(real, cfg, real_score)
        critic, _ = load_dit(critic_init, rt.device, trainable=True)
        check_generator_architecture(critic, cfg, "critic", critic_init)
        gen, _ = load_dit(generator_init, rt.device, trainable=True)
        check_generator_architecture(gen, cfg, "generator", generator_init)
        return cls(cfg, rt, world, gen, critic, real)

    def parts(self) -> dict:
        return {"generator": self.gen, "critic": self.critic}

    def _noise_for(self, indices, *key):
        c, _, h, w = self.clip_shape
        dev = self.rt.device

        def noise_for(block: int, frames: int, count: int) -> list[torch.Tensor]:
            return [torch.stack([seeded_randn((c, frames, h, w), *key, i, block, s, device=dev) for i in indices])
                    for s in range(count)]
        return noise_for

    def rollout_frames(self, *key) -> int:
        """Frames of one rollout: the window, or (long rollouts) a whole number of blocks drawn uniformly in
        [window, rollout_frames] on rank 0 and broadcast."""
        if self.max_frames == self.window:
            return self.window
        value = draw_rollout_frames(self.window, self.max_frames, self.cfg.sampling.frames_per_block,
                                    generator(*key)) if self.rt.is_main else 0
        return broadcast_int(value, self.rt)

    def _rollout(self, model, text, indices, exit_index: int, grad: bool, frames: int, *key) -> LossWindow:
        """Roll out ``frames`` frames (gradient only in the last window) and cut the scores' window."""
        c, _, h, w = self.clip_shape
        start = frames - self.window
        video = rollout(model, text, batch=len(indices), clip_shape=(c, frames, h, w), steps=self.steps,
                        opts=self.opts, exit_index=exit_index, noise_for=self._noise_for(indices, *key),
                        grad=grad, cache_dtype=self.rt.compute_dtype, grad_from=start)
        return loss_window(video, start, self.window,
                           reencode_first=self.reencoder if self.dc.reencode_first else None,
                           masked_frames=self.cfg.sampling.frames_per_block)

    def generator_step(self, step: int) -> dict:
        dc, rt, seed = self.dc, self.rt, self.cfg.run.seed
        exit_index = draw_exit(len(self.steps), rt, seed, STAGE, "gen-exit", step)
        frames = self.rollout_frames(seed, STAGE, "gen-frames", step)

        def micro(m: int):
            idx = sample_indices(step, m, rt, dc.batch_size, dc.grad_accum)
            cond = self.world.contexts(idx, rt.device, stream="dmd")
            uncond = self.world.uncond(len(idx), rt.device)
            text = self.gen.wrapped.encode_text(cond)
            win = self._rollout(self.gen.wrapped, text, idx, exit_index, True, frames, seed, STAGE, "gen-noise",
                                step)
            sigma = score_sigmas(idx, dc, seed, STAGE, "gen-t", step).to(rt.device)
            noise = torch.stack([seeded_randn(win.video.shape[1:], seed, STAGE, "gen-score", step, i,
                                              device=rt.device) for i in idx])
            grad, info = dmd_gradient(win.video, self.critic.model, self.real, cond, uncond, sigma, noise,
                                      dc.guidance)
            loss = dmd_loss(win.video, grad, win.loss_from)
            return loss, {"generator_loss": loss.detach(), **info}

        metrics = accumulate(rt, self.gen, dc.grad_accum, micro)
        metrics["generator_grad_norm"] = self.gen.step()
        metrics["exit_index"] = exit_index
        if self.max_frames > self.window:
            metrics["rollout_frames"] = frames
        return metrics

    def critic_step(self, step: int) -> dict:
        dc, rt, seed = self.dc, self.rt, self.cfg.run.seed
        exit_index = draw_exit(len(self.steps), rt, seed, STAGE, "critic-exit", step)
        frames = self.rollout_frames(seed, STAGE, "critic-frames", step)

        def micro(m: int):
            idx = sample_indices(step, m, rt, dc.batch_size, dc.grad_accum)
            cond = self.world.contexts(idx, rt.device, stream="dmd-critic")
            with torch.no_grad():
                text = self.gen.model.encode_text(cond)
                win = self._rollout(self.gen.model, text, idx, exit_index, False, frames, seed, STAGE,
                                    "critic-noise", step)
            sigma = score_sigmas(idx, dc, seed, STAGE, "critic-t", step).to(rt.device)
            noise = torch.stack([seeded_randn(win.video.shape[1:], seed, STAGE, "critic-score", step, i,
                                              device=rt.device) for i in idx])
            loss = critic_loss(self.critic.wrapped, win.video, cond, sigma, noise)
            return loss, {"critic_loss": loss.detach()}

        metrics = accumulate(rt, self.critic, dc.grad_accum, micro)
        metrics["critic_grad_norm"] = self.critic.step()
        return metrics

    def step(self, step: int) -> dict:
        return alternate(step, self.dc.critic_ratio, self.generator_step, self.critic_step)


def check_roles(cfg: TrainConfig, rt: Runtime, generator: torch.nn.Module, critic: torch.nn.Module,
                real_score: torch.nn.Module) -> torch.nn.Module:
    """The checks every DMD-style trainer (``DmdTrainer``, ``sfpp.SfppTrainer``) makes of its three models;
    returns the real score frozen and, under FSDP over several processes, sharded block by block in its own
    dtype (1/world each)."""
    if critic is real_score or critic is generator:
        raise ValueError("the critic must be a model of its own (not the real score or the generator)")
    check_generator_architecture(generator, cfg, "generator")
    check_generator_architecture(critic, cfg, "critic")
    check_real_score(real_score, cfg)
    return shard_frozen(real_score.eval().requires_grad_(False), rt)


def alternate(step: int, critic_ratio: int, generator_step: Callable[[int], dict],
              critic_step: Callable[[int], dict]) -> dict:
    """One iteration of a DMD loop (``DmdTrainer``, ``sfpp.SfppTrainer``): the generator's update first on every
    ``critic_ratio``-th step, then the critic's update on every step; their metrics merged."""
    metrics = dict(generator_step(step)) if step % critic_ratio == 0 else {}
    metrics.update(critic_step(step))
    return metrics


def make_reencoder(cfg: TrainConfig, world, device: torch.device):
    """What plays the VAE for re-encoding a window's first latent: the toy world's codec, or the Wan2.1 VAE of
    ``models.vae`` (bf16 on CUDA)."""
    codec = getattr(world, "codec", None)
    if codec is not None:
        from .data import codec_on

        return ToyReencoder(codec_on(codec, device))
    if not cfg.models.vae:
        raise ValueError(f"dmd.rollout_frames = {cfg.dmd.rollout_frames} > world.frames = {cfg.world.frames} "
                         "re-encodes the loss window's first latent through the VAE: set models.vae to the Wan2.1 "
                         "VAE (wan_2.1_vae.safetensors), or dmd.reencode_first = false")
    from ..sf_model.vae.checkpoint import load_vae

    return VaeReencoder(load_vae(cfg.models.vae, device=device, dtype=frozen_dtype(device)))


def train_dmd(cfg: TrainConfig, rt: Runtime, world, generator_init: str, critic_init: str, real_score: str, *,
              stop_after: int | None = None) -> str:
    trainer = DmdTrainer.from_paths(cfg, rt, world, generator_init, critic_init, real_score)
    directory = os.path.join(cfg.run.out_dir, STAGE)
    end = run_loop(STAGE, cfg.dmd.steps, trainer.step, trainer.parts(), directory, rt,
                   log_every=cfg.run.log_every, checkpoint_every=cfg.run.checkpoint_every,
                   progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=cfg.dmd.time_budget_s)
    path = self_forcing_path(cfg)
    if end.completed and rt.is_main:
        model = trainer.gen.ema_model()
        if cfg.lora.enabled:  # the adapters as a ComfyUI LoRA file, and the merged model as the stage output
            from .lora import lora_path, save_and_merge

            model = save_and_merge(model, lora_path(cfg), {"base": os.path.basename(generator_init),
                                                           "steps_trained": end.steps})
        save_dit(path, model, cfg.model, "self_forcing", {**sampling_meta(cfg), "steps_trained": end.steps})
    rt.barrier()
    return path
