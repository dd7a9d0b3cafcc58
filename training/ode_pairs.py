"""Stage 2a: ODE pairs -- teacher trajectories sampled at the student's noise levels.

The teacher integrates its probability-flow ODE dx/dsigma = flow(x, sigma) with Euler steps and
classifier-free guidance (uncond + g (cond - uncond)) from pure noise to sigma 0. The sigma grid contains
the student's (warped) step sigmas exactly: each interval between two of them is split into ``substeps``
Euler steps (twice as many for the last interval, down to 0). Each pair stores the latents at every student
sigma and the final clean latents: ``[B, K + 1, C, F, H, W]`` with K = number of student steps (CausVid /
Self Forcing store the trajectory of a 48-step teacher at indices [0, 12, 24, 36, -1] the same way).

Files: ``<out_dir>/ode_pairs/rank<R>.pt`` (one shard per process) with the trajectories (float16), the
student sigmas/timesteps and the sample indices (so ``ode_init`` finds each pair's prompt again).
"""

from __future__ import annotations

import glob
import os
import time

import torch

from ..sf_model.schedule import make_steps
from .config import TrainConfig
from .engine import Runtime, atomic_torch_save, broadcast_int, seeded_randn

STAGE = "ode_pairs"


def sigma_grid(student_sigmas, substeps: int) -> tuple[list[float], list[int]]:
    """The Euler grid (descending to 0) and the grid index of each student sigma."""
    if substeps < 1:
        raise ValueError(f"ode_pairs.substeps must be >= 1, got {substeps}")
    knots = [float(s) for s in student_sigmas] + [0.0]
    grid, marks = [knots[0]], [0]
    for i in range(len(knots) - 1):
        n = substeps * (2 if i == len(knots) - 2 else 1)
        a, b = knots[i], knots[i + 1]
        grid += [a + (b - a) * (j + 1) / n for j in range(n)]
        if i + 1 < len(knots) - 1:
            marks.append(len(grid) - 1)
    return grid, marks


@torch.no_grad()
def guided_flow(teacher, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor,
                guidance: float) -> torch.Tensor:
    """uncond + g (cond - uncond) in one batched forward (g = 1: conditional only)."""
    b, f = x.shape[0], x.shape[2]
    t = torch.full((b, f), sigma * 1000.0, device=x.device)
    if guidance == 1.0:
        return teacher(x, t, cond).float()
    out = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).float()
    c, u = out.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def teacher_trajectory(teacher, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                       student_sigmas, substeps: int, guidance: float, autocast=None) -> torch.Tensor:
    """Integrate from ``noise`` (sigma 1) to 0; returns [B, K + 1, C, F, H, W] float32 at the student
    sigmas and at 0."""
    import contextlib

    grid, marks = sigma_grid(student_sigmas, substeps)
    x = noise.float()
    keep = []
    for i in range(len(grid) - 1):
        if i in marks:
            keep.append(x.clone())
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            v = guided_flow(teacher, x, grid[i], cond, uncond, guidance)
        x = x + (grid[i + 1] - grid[i]) * v
    keep.append(x)
    return torch.stack(keep, dim=1)


def shard_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, STAGE)


def generate_pairs(cfg: TrainConfig, rt: Runtime, world, teacher) -> str:
    """Generate ``ode_pairs.count`` pairs split over the processes; returns the shard directory."""
    pc = cfg.ode_pairs
    steps = make_steps(cfg.sampling.steps, cfg.sampling.shift, cfg.sampling.warp)
    sigmas = [s.sigma for s in steps]
    if sigmas[0] < 1.0 - 1e-6:
        raise ValueError(f"the student's first step must be pure noise (sigma 1), got sigma {sigmas[0]:.4f}; "
                         "start sampling.steps at 1000")
    teacher.eval().requires_grad_(False)
    mine = [i for i in range(pc.count) if i % rt.world_size == rt.rank]
    c, f, h, w = world.clip_shape
    trajs, indices = [], []
    from ..sf_model.progress import progress_bar

    bar = progress_bar(len(mine), STAGE, "pair", enabled=rt.is_main and cfg.run.progress)
    t0 = time.time()
    per_rank = -(-pc.count // rt.world_size)
    for k in range(0, per_rank, pc.batch_size):  # the same number of rounds on every rank
        if pc.time_budget_s > 0 and broadcast_int(int(time.time() - t0 > pc.time_budget_s), rt):
            break
        idx = mine[k:k + pc.batch_size]
        if not idx:
            continue
        cond = world.contexts(idx, rt.device, stream=STAGE)
        uncond = world.uncond(len(idx), rt.device)
        noise = torch.stack([seeded_randn((c, f, h, w), cfg.run.seed, STAGE, i, device=rt.device) for i in idx])
        traj = teacher_trajectory(teacher, noise, cond, uncond, sigmas, pc.substeps, pc.guidance, rt.autocast)
        trajs.append(traj.to(torch.float16).cpu())
        indices += idx
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    out = shard_dir(cfg)
    os.makedirs(out, exist_ok=True)
    data = {"trajectories": torch.cat(trajs) if trajs else torch.zeros(0, len(sigmas) + 1, c, f, h, w),
            "indices": torch.tensor(indices, dtype=torch.long),
            "sigmas": torch.tensor(sigmas), "timesteps": torch.tensor([s.timestep for s in steps]),
            "world_size": rt.world_size}
    atomic_torch_save(data, os.path.join(out, f"rank{rt.rank}.pt"))
    rt.barrier()
    return out


def load_pairs(directory: str) -> dict:
    """All shards of a pair directory merged and ordered by sample index."""
    files = sorted(glob.glob(os.path.join(directory, "rank*.pt")))
    if not files:
        raise ValueError(f"no ODE pairs in {directory}; run the 'ode_pairs' stage first")
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in files]
    idx = torch.cat([s["indices"] for s in shards])
    traj = torch.cat([s["trajectories"] for s in shards])
    order = torch.argsort(idx)
    for s in shards[1:]:
        if not torch.equal(s["sigmas"], shards[0]["sigmas"]):
            raise ValueError(f"shards in {directory} were made with different student steps")
    return {"trajectories": traj[order], "indices": idx[order], "sigmas": shards[0]["sigmas"],
            "timesteps": shards[0]["timesteps"]}
