"""Stage 1 (toy only): flow-matching training of the bidirectional teacher.

x_t = (1 - sigma) x0 + sigma noise with sigma = shift(u), u ~ U(0, 1) per sample (the same for every
frame: the teacher is Wan's bidirectional model); the model predicts the flow noise - x0 (MSE). With
probability ``cfg_dropout`` a sample gets the empty prompt, so the teacher supports classifier-free
guidance. For Wan the teacher is the released Wan2.1 weights and this stage is skipped.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..sf_model.schedule import add_noise, shift_sigma
from ..toy.render import upload
from .config import TrainConfig
from .engine import Runtime, Trainable, accumulate, generator, run_loop, sample_indices, seeded_randn
from .models import build_model, load_dit, save_dit

STAGE = "teacher"


def flow_matching_loss(model, x0: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor, frames_per_block: int | None = None) -> torch.Tensor:
    """MSE between the predicted and the true flow at noise levels ``sigma`` [B] (or [B, F])."""
    b, _, f = x0.shape[:3]
    sig = sigma[:, None].expand(b, f) if sigma.ndim == 1 else sigma
    x_t = add_noise(x0, noise, sig[:, None, :, None, None])
    pred = model(x_t, sig * 1000.0, context, frames_per_block=frames_per_block)
    return F.mse_loss(pred.float(), (noise - x0).float())


def teacher_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, "teacher.safetensors")


def train_teacher(cfg: TrainConfig, rt: Runtime, world, *, stop_after: int | None = None) -> str:
    """Train (or resume) the teacher, from random weights or ``teacher.init_path``; writes
    ``<out_dir>/teacher.safetensors`` (EMA weights)."""
    tc = cfg.teacher
    if world.kind != "toy":
        raise ValueError("the teacher stage trains the toy teacher only; for Wan set world.teacher_path to the "
                         "released Wan2.1 weights and run the later stages")
    if tc.init_path:  # go on from a teacher trained before (e.g. in an earlier device call): a fresh optimiser
        model, _ = load_dit(tc.init_path, rt.device, trainable=True)
        if model.config.to_dict() != cfg.model.to_dict():
            raise ValueError(f"teacher.init_path {tc.init_path} is not a model of [model] ({model.config} vs "
                             f"{cfg.model})")
    else:
        model = build_model(cfg.model, cfg.run.seed, rt.device)
    tr = Trainable(STAGE, model, rt, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay,
                   grad_clip=tc.grad_clip, warmup=tc.warmup, ema_decay=tc.ema_decay, ema_start=tc.ema_start,
                   ema_warmup=tc.ema_warmup)
    seed = cfg.run.seed

    def step_fn(step: int) -> dict:
        def micro(m: int):
            idx = sample_indices(step, m, rt, tc.batch_size, tc.grad_accum)
            x0 = world.clips(idx, rt.device, stream=STAGE)
            ctx = world.contexts(idx, rt.device, stream=STAGE)
            drop = upload(torch.tensor([float(torch.rand((), generator=generator(seed, STAGE, "drop", i)))
                                        < tc.cfg_dropout for i in idx]), rt.device)
            ctx = torch.where(drop[:, None, None], world.uncond(len(idx), rt.device), ctx)
            u = upload(torch.stack([torch.rand((), generator=generator(seed, STAGE, "t", i)) for i in idx]), rt.device)
            sigma = shift_sigma(u, tc.shift)
            noise = torch.stack([seeded_randn(x0.shape[1:], seed, STAGE, "noise", i, device=rt.device) for i in idx])
            loss = flow_matching_loss(tr.wrapped, x0, ctx, sigma, noise)
            return loss, {"loss": loss.detach()}

        metrics = accumulate(rt, tr, tc.grad_accum, micro)
        metrics["grad_norm"] = tr.step()
        metrics["lr"] = tr.scheduler.get_last_lr()[0]
        return metrics

    directory = os.path.join(cfg.run.out_dir, STAGE)
    end = run_loop(STAGE, tc.steps, step_fn, {"teacher": tr}, directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=tc.time_budget_s)
    path = teacher_path(cfg)
    if end.completed and rt.is_main:
        save_dit(path, tr.ema_model(), cfg.model, "teacher", {"bidirectional": True, "steps_trained": end.steps})
    rt.barrier()
    return path
