"""Stage ``grpo``: the optional GRPO stage of Self-Forcing++ (Cui et al. 2025, section 3.3) -- group-relative
policy optimisation for long-term temporal smoothness, on the toy world.

The few-step sampler is a stochastic policy: per chunk x_{t_0} = noise, x0_k = G_theta(x_{t_k}) and
x_{t_{k+1}} = (1 - s_{k+1}) x0_k + s_{k+1} eps_k (s = sigma), so every re-noising step is a Gaussian action
a = x_{t_{k+1}} ~ N(mu = (1 - s_{k+1}) G_theta(x_{t_k}), s_{k+1}^2 I); the last step (to x0) is deterministic.

- ``record_rollout``: G stochastic rollouts per prompt through the rolling KV cache of inference (the sampler's
  own ``denoise_chunk`` / ``commit_chunk``), recording per chunk and transition x_{t_k}, the action, t_k,
  s_{k+1} and the old log-probability (``gaussian_logp``: per-element mean of -(a - mu)^2 / (2 s^2)).
- ``toy_rewards``: r = -(motion_error + flicker_error + |object_count[t] - object_count[t-1]|), each term its mean
  over the frames where it is defined (``toy.metrics.video_metrics`` in prompt mode on the decoded video).
- ``group_advantages``: A = (r - mean_group) / (std_group + 1e-4).
- ``GrpoTrainer.update``: replay each rollout chunk by chunk with theta (cache rebuilt by committing the recorded
  clean chunks, no grad), loss_chunk = -mean_k min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(logp_theta -
  logp_old) (``clipped_objective``), backward per chunk, then ``Trainable.step``.

The stage writes ``<out_dir>/grpo.safetensors`` (EMA) and the bundle ``grpo_<kind>.safetensors`` next to the main
export, declaring the rolling cache of its rollouts (``train_frames`` = window, ``sink``) like ``sfpp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..sf_model.cache import KVCache
from ..sf_model.sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk
from ..sf_model.schedule import Step, add_noise, make_steps
from ..sf_model.window import cache_slots
from .config import TrainConfig
from .engine import Runtime, Trainable, run_loop, sample_indices, seeded_randn

STAGE = "grpo"


# -- the policy ------------------------------------------------------------------------------------------
def gaussian_logp(action: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Log-density of N(mean, sigma^2 I) per sample [B]: the per-element mean of -(a - mu)^2 / (2 sigma^2)
    (constants dropped, as Flow-GRPO: ratios of two such values stay well-conditioned)."""
    d = (action.float() - mean.float()).flatten(1)
    return -(d * d).mean(dim=1) / (2.0 * sigma * sigma)


@dataclass
class ChunkRecord:
    """One chunk of a recorded rollout: ``states`` x_{t_k} and ``actions`` x_{t_{k+1}} [S-1, B, C, F, H, W] of its
    S-1 stochastic transitions, ``logp_old`` [S-1, B], and its clean output ``x0`` [B, C, F, H, W]."""

    start: int
    states: torch.Tensor
    actions: torch.Tensor
    logp_old: torch.Tensor
    x0: torch.Tensor


@dataclass
class Rollout:
    chunks: list[ChunkRecord]
    steps: tuple[Step, ...]   # t_k = steps[k].timestep, s_{k+1} = steps[k + 1].sigma

    @property
    def latents(self) -> torch.Tensor:
        return torch.cat([c.x0 for c in self.chunks], dim=2)


def new_cache(model, batch: int, latent_shape, opts: StreamOptions, frames: int, dtype) -> KVCache:
    cfg = model.config
    _, h, w = latent_shape
    ph, pw = cfg.patch_size[1:]
    ring, sink = cache_slots(opts.window, opts.sink, frames)
    return KVCache(cfg.num_layers, batch, (h // ph) * (w // pw), cfg.num_heads, cfg.head_dim, window=ring,
                   sink=sink, dtype=dtype, device=model.device)


def check_policy(steps: Sequence[Step], opts: StreamOptions) -> None:
    if opts.solver != "renoise":
        raise ValueError("GRPO needs the stochastic sampler (solver 'renoise'): the Euler solver has no noise")
    if len(steps) < 2:
        raise ValueError("GRPO needs at least 2 denoising steps (the stochastic transitions are between them)")


@torch.no_grad()
def record_rollout(model, text, *, frames: int, batch: int, latent_shape: Sequence[int], steps: Sequence[Step],
                   opts: StreamOptions, noise_for: Callable[[int, int, int], Sequence[torch.Tensor]],
                   cache_dtype: torch.dtype) -> Rollout:
    """A rollout of ``frames`` latent frames through the rolling cache of ``opts`` (as inference: every step,
    the sampler's own chunk functions), recording every stochastic transition. ``noise_for(chunk, frames,
    count)`` -> ``count`` noise tensors [B, C, frames, H, W] (the same as ``training.long_rollout``)."""
    check_policy(steps, opts)
    fpb = opts.frames_per_block
    if frames % fpb:
        raise ValueError(f"rollout length {frames} is not a multiple of frames_per_block {fpb}")
    cache = new_cache(model, batch, latent_shape, opts, frames, cache_dtype)
    plan = chunk_plan(0, frames, fpb)
    chunks = []
    for ci, (start, n) in enumerate(plan):
        noise = noise_for(ci, n, len(steps))
        preds: list[torch.Tensor] = []
        x0 = denoise_chunk(model, text, cache, start, noise, steps, opts, on_pass=lambda i, x: preds.append(x))
        states, actions, logps = [noise[0].float()], [], []
        for k in range(len(steps) - 1):  # the sampler's own re-noising: x_{t_{k+1}} = add_noise(x0_k, eps_k)
            s = steps[k + 1].sigma
            a = add_noise(preds[k].detach(), noise[k + 1], s)
            actions.append(a)
            logps.append(gaussian_logp(a, (1 - s) * preds[k], s))
            if k + 1 < len(steps) - 1:
                states.append(a)
        chunks.append(ChunkRecord(start, torch.stack(states), torch.stack(actions), torch.stack(logps), x0))
        if ci < len(plan) - 1:
            commit_chunk(model, text, cache, start, x0, opts)
    return Rollout(chunks, tuple(steps))


def transition_logps(model, text, cache: KVCache, chunk: ChunkRecord, steps: Sequence[Step], opts: StreamOptions,
                     grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(log-probabilities [S-1, B] of the chunk's recorded actions under ``model``, the means mu_k) -- each
    transition one forward of the sampler's ``denoise_chunk`` from the recorded x_{t_k} at step k."""
    logps, means = [], []
    for k in range(chunk.states.shape[0]):
        with torch.set_grad_enabled(grad):
            x0 = denoise_chunk(model, text, cache, chunk.start, [chunk.states[k]], [steps[k]], opts, exit_index=0,
                               grad_at_exit=grad)
            s = steps[k + 1].sigma
            mu = (1 - s) * x0
            logps.append(gaussian_logp(chunk.actions[k], mu, s))
        means.append(mu)
    return torch.stack(logps), means


def clipped_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """-mean over transitions and samples of min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp -
    logp_old); ``logp``/``logp_old`` [K, B], ``adv`` [B]."""
    rho = torch.exp(logp - logp_old.detach())
    a = adv.to(rho)[None]
    return -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a).mean()


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """A = (r - mean_group) / (std_group + 1e-4) over consecutive groups of ``group`` rewards [P * G]."""
    r = rewards.double().view(-1, group)
    a = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    return a.view(-1).float()


# -- the reward (toy world) -------------------------------------------------------------------------------
REWARD_TERMS = ("motion_error", "flicker_error", "count_change")


def _frame_mean(values: np.ndarray) -> np.ndarray:
    """Mean over frames [B, T] -> [B] of the defined (finite) values; 0 where none is."""
    ok = np.isfinite(values)
    return np.where(ok, values, 0.0).sum(axis=1) / np.maximum(ok.sum(axis=1), 1)


def reward_terms(videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """The terms of the smoothness reward of pixel videos [B, 3, T, H, W] in [-1, 1] generated from ``prompts``:
    the per-video frame means of motion_error, flicker_error and |object_count[t] - object_count[t-1]|."""
    from ..toy.metrics import video_metrics

    m = video_metrics(videos, list(prompts))
    count = m["object_count"]
    change = np.abs(np.diff(count, axis=1)) if count.shape[1] > 1 else np.full_like(count, np.nan)
    return {"motion_error": _frame_mean(m["motion_error"]), "flicker_error": _frame_mean(m["flicker_error"]),
            "count_change": _frame_mean(change)}


def toy_rewards(videos: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
    """r = -(motion_error + flicker_error + count_change) per video [B] (float64; higher = smoother)."""
    terms = reward_terms(videos, prompts)
    return -sum(terms[k] for k in REWARD_TERMS)


# -- the trainer ------------------------------------------------------------------------------------------
class GrpoTrainer:
    """The generator (``Trainable``: AdamW, clipping, EMA) and, with ``grpo.beta`` > 0, a frozen ``reference``
    (the start model). ``step(step)``: one rollout batch (``prompts_per_step`` prompts x ``group`` rollouts),
    rewards, advantages, ``inner_updates`` updates. ``start_meta``: the start file's metadata (its declared
    ``train_frames`` and ``sink`` are the rollouts' cache unless ``grpo.window`` / ``grpo.sink`` say otherwise)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, world, generator, reference=None, start_meta=None):
        if getattr(world, "kind", None) != "toy":
            raise ValueError("the grpo stage needs the toy world: its reward comes from the world's own rules "
                             "(toy.metrics); there is no reward model for Wan here")
        self.cfg, self.rt, self.world = cfg, rt, world
        gc = self.gc = cfg.grpo
        self.gen = Trainable("generator", generator.train().requires_grad_(True), rt, lr=gc.lr, betas=gc.betas,
                             weight_decay=gc.weight_decay, grad_clip=gc.grad_clip, warmup=gc.warmup,
                             ema_decay=gc.ema_decay, ema_start=gc.ema_start, ema_warmup=gc.ema_warmup)
        if rt.activation_checkpointing:  # the rolling cache is rewritten before backward: keep copied history
            generator.set_activation_checkpointing(True, history="copy")
        if gc.beta > 0 and reference is None:
            raise ValueError("grpo.beta > 0 needs a reference model")
        self.reference = reference if gc.beta > 0 else None
        c, f, h, w = world.clip_shape
        meta = start_meta or {}
        self.latent_shape = (c, h, w)
        self.window = gc.window or int(meta.get("train_frames") or f)
        self.sink = gc.sink if gc.sink >= 0 else int(meta.get("sink") or 0)
        self.frames = gc.horizon * f
        self.opts = cfg.sampling.stream_options(window=self.window, sink=self.sink)
        self.steps = make_steps(cfg.sampling.steps, cfg.sampling.shift, cfg.sampling.warp)
        check_policy(self.steps, self.opts)
        self.start_meta = meta

    @classmethod
    def from_paths(cls, cfg: TrainConfig, rt: Runtime, world, generator_path: str) -> "GrpoTrainer":
        from .models import load_dit
        from .roles import check_generator_architecture, load_frozen

        gen, meta = load_dit(generator_path, rt.device, trainable=True)
        check_generator_architecture(gen, cfg, "generator", generator_path)
        ref = load_frozen(generator_path, rt.device) if cfg.grpo.beta > 0 else None
        return cls(cfg, rt, world, gen, ref, meta)

    def parts(self) -> dict:
        return {"generator": self.gen}

    def noise_for(self, rows, step: int):
        """Noise keyed (run seed, stage, step, prompt, member, chunk, draw)."""
        c, h, w = self.latent_shape
        seed, dev = self.cfg.run.seed, self.rt.device

        def draw(chunk: int, frames: int, count: int) -> list[torch.Tensor]:
            return [torch.stack([seeded_randn((c, frames, h, w), seed, STAGE, "noise", step, p, m, chunk, s,
                                              device=dev) for p, m in rows]) for s in range(count)]
        return draw

    def rollout(self, step: int):
        """(rollout, text contexts [P*G, L, D], rewards [P*G] float64, advantages [P*G]) of one step."""
        gc, rt = self.gc, self.rt
        idx = sample_indices(step, 0, rt, gc.prompts_per_step, 1)
        prompts = self.world.prompts(idx, STAGE)
        cond = self.world.encode_prompts(prompts, rt.device).repeat_interleave(gc.group, dim=0)
        rows = [(p, m) for p in idx for m in range(gc.group)]
        with torch.no_grad(), self.gen.autocast():
            text = self.gen.model.encode_text(cond)
            ro = record_rollout(self.gen.model, text, frames=self.frames, batch=len(rows),
                                latent_shape=self.latent_shape, steps=self.steps, opts=self.opts,
                                noise_for=self.noise_for(rows, step), cache_dtype=rt.compute_dtype)
        videos = self.world.decode(ro.latents)
        rewards = toy_rewards(videos, [p for p in prompts for _ in range(gc.group)])
        adv = group_advantages(torch.as_tensor(rewards), gc.group).to(rt.device)
        return ro, cond, rewards, adv

    def update(self, ro: Rollout, cond: torch.Tensor, adv: torch.Tensor) -> dict:
        """One update: replay chunk by chunk, the clipped objective per transition, backward per chunk (the cache
        is rebuilt from the recorded clean chunks without gradient), then ``Trainable.step``."""
        import contextlib

        gc, rt, wrapped = self.gc, self.rt, self.gen.wrapped
        n, b = len(ro.chunks), cond.shape[0]
        with torch.no_grad(), self.gen.autocast():
            text = wrapped.encode_text(cond)
            ref_text = self.reference.encode_text(cond) if self.reference is not None else None
        cache = new_cache(self.gen.model, b, self.latent_shape, self.opts, self.frames, rt.compute_dtype)
        ref_cache = (new_cache(self.reference, b, self.latent_shape, self.opts, self.frames, rt.compute_dtype)
                     if self.reference is not None else None)
        sums = {"loss": 0.0, "ratio": 0.0, "clipped": 0.0, "kl": 0.0}
        for ci, ch in enumerate(ro.chunks):
            with (contextlib.nullcontext() if ci == n - 1 else wrapped.no_sync()):
                with self.gen.autocast():
                    logp, means = transition_logps(wrapped, wrapped.encode_text(cond), cache, ch, ro.steps,
                                                   self.opts, grad=True)
                    loss = clipped_objective(logp, ch.logp_old, adv, gc.clip_eps)
                    if ref_cache is not None:
                        with torch.no_grad():
                            _, ref_means = transition_logps(self.reference, ref_text, ref_cache, ch, ro.steps,
                                                            self.opts, grad=False)
                        kl = torch.stack([((mu.float() - r.float()) ** 2).mean() / (2 * ro.steps[k + 1].sigma ** 2)
                                          for k, (mu, r) in enumerate(zip(means, ref_means))]).mean()
                        loss = loss + gc.beta * kl
                        sums["kl"] = sums["kl"] + kl.detach() / n
                (loss / n).backward()
            rho = torch.exp(logp.detach() - ch.logp_old)
            sums["loss"] = sums["loss"] + loss.detach() / n
            sums["ratio"] = sums["ratio"] + rho.mean() / n
            sums["clipped"] = sums["clipped"] + ((rho - 1).abs() > gc.clip_eps).float().mean() / n
            if ci < n - 1:
                with torch.no_grad(), self.gen.autocast():
                    commit_chunk(wrapped, text, cache, ch.start, ch.x0, self.opts)
                    if ref_cache is not None:
                        commit_chunk(self.reference, ref_text, ref_cache, ch.start, ch.x0, self.opts)
        sums["grad_norm"] = self.gen.step()
        return sums

    def step(self, step: int) -> dict:
        ro, cond, rewards, adv = self.rollout(step)
        metrics = {}
        for _ in range(self.gc.inner_updates):
            metrics = self.update(ro, cond, adv)
        metrics.update(reward=float(np.mean(rewards)), reward_std=float(np.std(rewards)))
        return metrics


# -- the stage ---------------------------------------------------------------------------------------------
def grpo_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, "grpo.safetensors")


def grpo_export_path(cfg: TrainConfig) -> str:
    from .export import default_export_path

    folder = os.path.dirname(os.path.abspath(default_export_path(cfg)))
    return os.path.join(folder, f"grpo_{cfg.world.kind}.safetensors")


def generator_source(cfg: TrainConfig) -> str:
    """``grpo.generator_path``, else the sfpp stage's output when present, else the dmd stage's."""
    from .dmd import self_forcing_path
    from .sfpp import sfpp_path

    if cfg.grpo.generator_path:
        if not os.path.isfile(cfg.grpo.generator_path):
            raise ValueError(f"grpo.generator_path {cfg.grpo.generator_path} does not exist")
        return cfg.grpo.generator_path
    for path in (sfpp_path(cfg), self_forcing_path(cfg)):
        if os.path.isfile(path):
            return path
    raise ValueError(f"neither {sfpp_path(cfg)} nor {self_forcing_path(cfg)} exists: GRPO continues a Self-Forcing++ "
                     "(or Self Forcing) model; run the 'sfpp' or 'dmd' stage first or set grpo.generator_path")


def train_grpo(cfg: TrainConfig, rt: Runtime, world, *, stop_after: int | None = None) -> dict[str, str]:
    """Train (resuming ``<out_dir>/grpo/checkpoint/``); when done write ``grpo.safetensors`` and the bundle.
    Returns {"grpo": output, "export_grpo": bundle}, or {} when this call stopped early (``stop_after``)."""
    from .export import export_model
    from .models import save_dit
    from .ode_init import sampling_meta

    if getattr(world, "kind", None) != "toy":
        raise ValueError("the grpo stage needs the toy world: its reward comes from the world's own rules "
                         "(toy.metrics); there is no reward model for Wan here")
    gc = cfg.grpo
    start = generator_source(cfg)
    trainer = GrpoTrainer.from_paths(cfg, rt, world, start)
    directory = os.path.join(cfg.run.out_dir, STAGE)
    end = run_loop(STAGE, gc.steps, trainer.step, trainer.parts(), directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=gc.time_budget_s)
    if not end.completed:
        rt.barrier()
        return {}
    path, bundle = grpo_path(cfg), grpo_export_path(cfg)
    if rt.is_main:
        k, s = trainer.window, trainer.sink
        meta = {"train_frames": k, "window": k, "sink": s,
                "grpo": {"start": start, "start_steps_trained": trainer.start_meta.get("steps_trained"),
                         "steps": end.steps, "updates": end.steps * gc.inner_updates, "group": gc.group,
                         "prompts_per_step": gc.prompts_per_step, "horizon": gc.horizon,
                         "rollout_frames": trainer.frames, "window": k, "sink": s, "clip_eps": gc.clip_eps,
                         "beta": gc.beta, "reward": "-(motion_error + flicker_error + count_change)"}}
        save_dit(path, trainer.gen.ema_model(), cfg.model, STAGE,
                 {**sampling_meta(cfg), **meta, "steps_trained": end.steps})
        export_model(cfg, world, path, bundle, role=STAGE, publish=False,
                     extra_meta={**meta, "drift": None, "compute": meta["grpo"]})
    rt.barrier()
    return {"grpo": path, "export_grpo": bundle}
