"""The baselines of the toy comparison, trained by the same engine as Self Forcing: teacher forcing and
diffusion forcing (the causal ODE initialisation and Self Forcing are the ``ode_init`` and ``dmd`` stages).

Both start from the teacher's weights (as ``ode_init`` does), train the block-causal student with the
flow-matching loss (MSE between the predicted flow and ``noise - x0``; x_t = (1 - sigma) x0 + sigma noise,
timestep = 1000 sigma), keep an EMA of the weights and are sampled at inference with the same few-step
sampler, steps and cache as the others (``sf_model.sampler``: per chunk the warped steps, then a clean pass
at ``sampling.context_noise`` that writes the chunk's K/V).

Teacher forcing (``teacher_forcing``)
    One parallel forward over [clean frames | noisy frames] (2F frames). The mask
    (``sf_model.mask.teacher_forcing_visibility``): clean frames are block-causal among themselves (what the
    cache holds after each chunk's clean pass); noisy chunk i sees the clean chunks < i and itself, nothing
    of the other noisy chunks. Noisy frame p sits at the RoPE position of its clean twin p. Clean frames get
    timestep ``context_noise`` (the commit pass's), noisy chunk i its own level; the loss is on the noisy
    frames only. Each noisy chunk is therefore exactly a sampler chunk against a cache of the *ground-truth*
    earlier chunks (``tests/test_train_baselines.py`` checks this against running each chunk through a KV
    cache). Gradient flows through the clean frames' keys/values too (one graph, as in parallel training).

Diffusion forcing (``diffusion_forcing``)
    The block-causal forward of the clip (as ``ode_init``) with independent noise levels per chunk
    (``noise = "chunk"``, default) or per frame (``"frame"``); flow loss on every frame.

Noise levels (``schedule``)
    ``"sampler"`` (default): a level is drawn uniformly from the sampler's own warped steps (for shift 5
    and [1000, 750, 500, 250]: sigmas 1, 0.9375, 0.833, 0.625), the levels the model meets at inference;
    diffusion forcing adds the clean-context level (x0 itself at timestep ``context_noise``), which is what
    history holds at inference. ``"continuous"``: sigma = shift(u), u ~ U(0, 1), with the table's ``shift``.

Equal compute: ``[compute] budget_s`` gives each baseline the same training time (``config.ComputeConfig``);
the steps and seconds each one actually ran are written into its output's metadata and ``compute.json``
(``compute_report``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..sf_model.mask import teacher_forcing_positions, teacher_forcing_visibility
from ..sf_model.schedule import add_noise, make_steps, shift_sigma
from .config import TrainConfig
from .engine import Runtime, Trainable, accumulate, generator, read_jsonl, run_loop, sample_indices, seeded_randn
from .models import load_dit, save_dit

TEACHER_FORCING, DIFFUSION_FORCING = "teacher_forcing", "diffusion_forcing"
BASELINES = (TEACHER_FORCING, DIFFUSION_FORCING)


def baseline_path(cfg: TrainConfig, stage: str) -> str:
    return os.path.join(cfg.run.out_dir, f"{stage}.safetensors")


# -- noise levels --------------------------------------------------------------------------------------
def level_table(cfg: TrainConfig, with_context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the "sampler" schedule: the sampler's warped steps (+ the clean-context level:
    sigma 0 at timestep ``context_noise``, as the commit pass sees history)."""
    s = cfg.sampling
    steps = make_steps(s.steps, s.shift, s.warp)
    t = [st.timestep for st in steps]
    sig = [st.sigma for st in steps]
    if with_context:
        t.append(float(s.context_noise))
        sig.append(0.0)
    return torch.tensor(t, dtype=torch.float32), torch.tensor(sig, dtype=torch.float32)


def draw_levels(count: int, schedule: str, table: tuple[torch.Tensor, torch.Tensor], shift: float,
                *key) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` independent levels (timesteps [count], sigmas [count]) keyed by ``key``."""
    g = generator(*key)
    if schedule == "sampler":
        idx = torch.randint(0, len(table[0]), (count,), generator=g)
        return table[0][idx], table[1][idx]
    sigma = shift_sigma(torch.rand(count, generator=g), shift)
    return sigma * 1000.0, sigma


def frame_levels(levels: torch.Tensor, num_frames: int, frames_per_block: int) -> torch.Tensor:
    """Per-chunk levels [B, chunks] -> per-frame [B, F] (per-frame levels pass through)."""
    if levels.shape[1] == num_frames:
        return levels
    return levels.repeat_interleave(frames_per_block, dim=1)[:, :num_frames]


# -- losses --------------------------------------------------------------------------------------------
def teacher_forcing_flow(model, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, context,
                         frames_per_block: int, context_noise: float = 0.0, window: int | None = None,
                         sink: int = 0) -> torch.Tensor:
    """The flow predicted for the noisy frames ``x_t`` [B, C, F, H, W] (timesteps [B, F]) given the clean
    history ``x0`` (any history, e.g. degraded, works the same way) in one forward over [x0 | x_t]."""
    b, f = x0.shape[0], x0.shape[2]
    x_in = torch.cat([x0, x_t], dim=2)
    t_hist = torch.full((b, f), float(context_noise), device=timesteps.device, dtype=timesteps.dtype)
    t_in = torch.cat([t_hist, timesteps], dim=1)
    vis = teacher_forcing_visibility(f, frames_per_block, window, sink)
    out = model(x_in, t_in, context, visibility=vis, positions=teacher_forcing_positions(f))
    return out[:, :, f:]


def teacher_forcing_loss(model, x0, noise, sigma, timesteps, context, frames_per_block: int,
                         context_noise: float = 0.0) -> torch.Tensor:
    """Flow-matching MSE of the noisy frames (sigma, timesteps [B, F]) against clean history."""
    x_t = add_noise(x0, noise, sigma[:, None, :, None, None])
    pred = teacher_forcing_flow(model, x0, x_t, timesteps, context, frames_per_block, context_noise)
    return F.mse_loss(pred.float(), (noise - x0).float())


def diffusion_forcing_loss(model, x0, noise, sigma, timesteps, context, frames_per_block: int) -> torch.Tensor:
    """Flow-matching MSE on every frame of the block-causal forward with per-frame levels [B, F]."""
    x_t = add_noise(x0, noise, sigma[:, None, :, None, None])
    pred = model(x_t, timesteps, context, frames_per_block=frames_per_block)
    return F.mse_loss(pred.float(), (noise - x0).float())


# -- the stages ----------------------------------------------------------------------------------------
def train_baseline(cfg: TrainConfig, rt: Runtime, world, teacher_path: str, stage: str, *,
                   stop_after: int | None = None) -> str:
    """Train (or resume) one baseline from the teacher's weights; writes ``<out_dir>/<stage>.safetensors``
    (EMA weights) once the stage completes (its steps or its time budget)."""
    if stage not in BASELINES:
        raise ValueError(f"unknown baseline {stage!r}; choose from {BASELINES}")
    bc = getattr(cfg, stage)
    fpb, ctx_noise = cfg.sampling.frames_per_block, float(cfg.sampling.context_noise)
    df = stage == DIFFUSION_FORCING
    table = level_table(cfg, with_context=df)
    _, frames, _, _ = world.clip_shape
    chunks = -(-frames // fpb)
    units = frames if df and bc.noise == "frame" else chunks
    model, _ = load_dit(teacher_path, rt.device, trainable=True)
    tr = Trainable(stage, model, rt, lr=bc.lr, betas=bc.betas, weight_decay=bc.weight_decay,
                   grad_clip=bc.grad_clip, warmup=bc.warmup, ema_decay=bc.ema_decay, ema_start=bc.ema_start,
                   ema_warmup=bc.ema_warmup)
    seed = cfg.run.seed

    def step_fn(step: int) -> dict:
        def micro(m: int):
            idx = sample_indices(step, m, rt, bc.batch_size, bc.grad_accum)
            x0 = world.clips(idx, rt.device, stream=stage)
            ctx = world.contexts(idx, rt.device, stream=stage)
            drawn = [draw_levels(units, bc.schedule, table, bc.shift, seed, stage, "levels", i) for i in idx]
            t = frame_levels(torch.stack([d[0] for d in drawn]), frames, fpb).to(rt.device)
            sigma = frame_levels(torch.stack([d[1] for d in drawn]), frames, fpb).to(rt.device)
            noise = torch.stack([seeded_randn(x0.shape[1:], seed, stage, "noise", i, device=rt.device) for i in idx])
            if df:
                loss = diffusion_forcing_loss(tr.wrapped, x0, noise, sigma, t, ctx, fpb)
            else:
                loss = teacher_forcing_loss(tr.wrapped, x0, noise, sigma, t, ctx, fpb, ctx_noise)
            return loss, {"loss": loss.detach()}

        metrics = accumulate(rt, tr, bc.grad_accum, micro)
        metrics["grad_norm"] = tr.step()
        return metrics

    directory = os.path.join(cfg.run.out_dir, stage)
    end = run_loop(stage, bc.steps, step_fn, {"student": tr}, directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=bc.time_budget_s)
    path = baseline_path(cfg, stage)
    if end.completed and rt.is_main:
        from .ode_init import sampling_meta

        info = {"schedule": bc.schedule, "time_budget_s": bc.time_budget_s, "batch_size": bc.batch_size,
                "grad_accum": bc.grad_accum, "lr": bc.lr, "init": "teacher",
                "loop_seconds": loop_seconds(os.path.join(directory, "log.jsonl"))}
        if df:
            info["noise"] = bc.noise
        save_dit(path, tr.ema_model(), cfg.model, stage,
                 {**sampling_meta(cfg), "steps_trained": end.steps, "baseline": info})
    rt.barrier()
    return path


# -- what each baseline got ----------------------------------------------------------------------------
def loop_seconds(log_path: str) -> float | None:
    """Seconds a stage's training loop ran, summed over invocations (each restarts its clock) from its log."""
    if not os.path.isfile(log_path):
        return None
    total, last = 0.0, 0.0
    for rec in read_jsonl(log_path):
        t = rec.get("time")
        if not isinstance(t, (int, float)):
            continue
        if t < last:  # a new invocation (resume) started its clock again
            total += last
        last = float(t)
    return round(total + last, 3)


def _meta(path: str) -> dict:
    """Our metadata of a stage output (the safetensors header only: no tensor is read)."""
    from safetensors import safe_open

    from ..sf_model.checkpoint import FORMAT_KEY

    if not os.path.isfile(path):
        return {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get(FORMAT_KEY, "{}"))
    except Exception:  # not a safetensors file of ours: nothing to report
        return {}


def _pairs_made(cfg: TrainConfig) -> int | None:
    import glob

    files = sorted(glob.glob(os.path.join(cfg.run.out_dir, "ode_pairs", "rank*.pt")))
    if not files:
        return None
    return sum(int(torch.load(p, map_location="cpu", weights_only=True, mmap=True)["indices"].numel())
               for p in files)


def stage_wall_seconds(cfg: TrainConfig) -> dict[str, float]:
    """Wall seconds per stage (loading and compilation included), summed over invocations
    (``<out_dir>/stage_times.jsonl``, written by ``stages.run_stages``)."""
    path = os.path.join(cfg.run.out_dir, "stage_times.jsonl")
    out: dict[str, float] = {}
    if os.path.isfile(path):
        for rec in read_jsonl(path):
            out[rec["stage"]] = round(out.get(rec["stage"], 0.0) + float(rec["seconds"]), 3)
    return out


MODEL_STAGES = {"causal_init": ("ode_pairs", "ode_init"), "self_forcing": ("ode_pairs", "ode_init", "dmd"),
                TEACHER_FORCING: (TEACHER_FORCING,), DIFFUSION_FORCING: (DIFFUSION_FORCING,)}


def compute_report(cfg: TrainConfig) -> dict:
    """Per model (causal_init, self_forcing, teacher_forcing, diffusion_forcing): the stages it took after
    the shared teacher, each with its configured budget, the steps it ran (pairs made for ode_pairs), its
    training-loop seconds and its wall seconds; plus the totals."""
    from .dmd import self_forcing_path
    from .ode_init import ode_init_path
    from .teacher import teacher_path

    wall = stage_wall_seconds(cfg)
    outputs = {"ode_init": ode_init_path(cfg), "dmd": self_forcing_path(cfg),
               TEACHER_FORCING: baseline_path(cfg, TEACHER_FORCING),
               DIFFUSION_FORCING: baseline_path(cfg, DIFFUSION_FORCING)}
    stages = {}
    for stage in ("ode_pairs", "ode_init", "dmd", TEACHER_FORCING, DIFFUSION_FORCING):
        entry = {"budget_s": getattr(cfg, stage).time_budget_s, "wall_s": wall.get(stage)}
        if stage == "ode_pairs":
            entry["pairs"] = _pairs_made(cfg)
        else:
            entry["steps"] = _meta(outputs[stage]).get("steps_trained")
            entry["loop_s"] = loop_seconds(os.path.join(cfg.run.out_dir, stage, "log.jsonl"))
        stages[stage] = entry
    teacher = cfg.world.teacher_path or teacher_path(cfg)
    report = {"budget_s": cfg.compute.budget_s,
              "teacher": {"path": teacher,  # a released Wan teacher is not read (gigabytes)
                          "steps": _meta(teacher).get("steps_trained") if cfg.world.kind == "toy" else None},
              "models": {}}
    for model, parts in MODEL_STAGES.items():
        rows = {s: stages[s] for s in parts}

        def total(key, rows=rows):
            vals = [r.get(key) for r in rows.values()]
            return round(sum(v for v in vals if v is not None), 3) if any(v is not None for v in vals) else None

        report["models"][model] = {"stages": rows, "budget_s": total("budget_s"), "loop_s": total("loop_s"),
                                   "wall_s": total("wall_s")}
    return report
