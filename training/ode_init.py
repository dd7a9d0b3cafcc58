"""Stage 2b: causal initialisation by ODE regression (CausVid / Self Forcing recipe).

The block-causal student (initialised from bidirectional weights of its own architecture: ``models.critic_init``,
the teacher's for the toy world) sees, per block, the teacher's trajectory
at a random one of its own step levels (``uniform_timestep=False``: one level per block) and regresses the
trajectory's clean end point: MSE(x - sigma * flow(x), x0_teacher). This teaches the few-step map without
ever conditioning on ground-truth context.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .engine import Runtime, Trainable, accumulate, generator, run_loop, sample_indices
from .models import load_dit, save_dit
from .ode_pairs import load_pairs

STAGE = "ode_init"


def block_levels(num_frames: int, frames_per_block: int, num_levels: int, *key) -> torch.Tensor:
    """A random level in [0, num_levels) per block, repeated over the block's frames -> [F] long."""
    blocks = -(-num_frames // frames_per_block)
    lv = torch.randint(0, num_levels, (blocks,), generator=generator(*key))
    return lv.repeat_interleave(frames_per_block)[:num_frames]


def regression_batch(traj: torch.Tensor, levels: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor):
    """traj [B, K+1, C, F, H, W], levels [B, F] -> (x [B,C,F,H,W], t [B,F], sigma [B,F], target x0)."""
    b, _, c, f, h, w = traj.shape
    gather = levels[:, None, None, :, None, None].expand(b, 1, c, f, h, w)
    x = torch.gather(traj, 1, gather)[:, 0]
    return x, timesteps[levels], sigmas[levels], traj[:, -1]


def ode_regression_loss(model, x, t, sigma, target, context, frames_per_block: int) -> torch.Tensor:
    flow = model(x, t, context, frames_per_block=frames_per_block).float()
    x0 = x.float() - sigma[:, None, :, None, None] * flow
    return F.mse_loss(x0, target.float())


def ode_init_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, "ode_init.safetensors")


def train_ode_init(cfg: TrainConfig, rt: Runtime, world, teacher_path: str, *,
                   stop_after: int | None = None) -> str:
    oc, fpb = cfg.ode_init, cfg.sampling.frames_per_block
    pairs = load_pairs(os.path.join(cfg.run.out_dir, "ode_pairs"))
    traj_all, pair_idx = pairs["trajectories"], pairs["indices"].tolist()
    if rt.device.type == "cuda":
        traj_all = traj_all.to(rt.device)  # float16; a few hundred MB for the toy
    sigmas, timesteps = pairs["sigmas"].to(rt.device), pairs["timesteps"].to(rt.device)
    k = len(sigmas)
    model, _ = load_dit(teacher_path, rt.device, trainable=True)
    tr = Trainable(STAGE, model, rt, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay,
                   grad_clip=oc.grad_clip, warmup=oc.warmup, ema_decay=oc.ema_decay, ema_start=oc.ema_start,
                   ema_warmup=oc.ema_warmup)
    seed = cfg.run.seed
    n = traj_all.shape[0]

    def step_fn(step: int) -> dict:
        def micro(m: int):
            idx = sample_indices(step, m, rt, oc.batch_size, oc.grad_accum)
            rows = [i % n for i in idx]
            traj = traj_all[rows].to(rt.device, torch.float32)
            f = traj.shape[3]
            levels = torch.stack([block_levels(f, fpb, k, seed, STAGE, i) for i in idx]).to(rt.device)
            x, t, sig, target = regression_batch(traj, levels, sigmas, timesteps)
            ctx = world.contexts([pair_idx[r] for r in rows], rt.device, stream="ode_pairs")
            loss = ode_regression_loss(tr.wrapped, x, t, sig, target, ctx, fpb)
            return loss, {"loss": loss.detach()}

        metrics = accumulate(rt, tr, oc.grad_accum, micro)
        metrics["grad_norm"] = tr.step()
        return metrics

    directory = os.path.join(cfg.run.out_dir, STAGE)
    end = run_loop(STAGE, oc.steps, step_fn, {"student": tr}, directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=oc.time_budget_s)
    path = ode_init_path(cfg)
    if end.completed and rt.is_main:
        save_dit(path, tr.ema_model(), cfg.model, "ode_init", {**sampling_meta(cfg), "steps_trained": end.steps})
    rt.barrier()
    return path


def sampling_meta(cfg: TrainConfig) -> dict:
    s = cfg.sampling
    return {"frames_per_block": s.frames_per_block, "steps": list(s.steps), "shift": s.shift, "warp": s.warp,
            "context_noise": s.context_noise}
