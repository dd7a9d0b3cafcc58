"""Resampling Forcing (Guo et al., "End-to-End Training for Autoregressive Video Diffusion via
Self-Resampling"): a causal video diffusion model trained from data without a teacher, on history the model
degraded itself. The paper's Algorithm 1, per training step:

1. t_s ~ LogitNormal(0, 1), shifted t_s <- s t_s / (1 + (s - 1) t_s) (``[resampling] shift_s``, s = 0.6; small s
   keeps the history close to the data, large s lets it drift);
2. with no gradient, the *degraded history* x~ of the clip (``simulation``):
   - ``"autoregressive"`` (the paper): chunk by chunk, the clean chunk is noised to t_s and denoised by the
     model with a numerical solver (``resample_steps`` levels of ``solver``) through a KV cache holding the
     already degraded chunks, then committed to the cache as the sampler commits a finished chunk
     (``sf_model.resample.self_resample``) -- errors inside a chunk *and* their accumulation across chunks;
   - ``"parallel"``: every chunk noised to t_s and denoised at once against the *clean* history (one parallel
     [clean | noisy] forward per solver level): the errors of one chunk, never accumulated;
   - ``"noise"``: the history only noised to t_s (noise augmentation);
3. one parallel forward over [x~ | noisy clip] under teacher forcing's sparse causal mask
   (``sf_model.mask.teacher_forcing_visibility``: noisy chunk i sees x~ of the chunks before it and itself,
   nothing of the other noisy chunks; RoPE positions duplicated), x~ at the commit level ``context_noise``,
   and the flow loss ||(eps - x) - v||^2 averaged over every frame (each chunk at its own level, drawn like
   the baselines' from the export's steps or a continuous shifted schedule).

The warm-up is teacher forcing (the same step with x~ = x, stage ``resampling_warmup``), so a stage pair
``resampling_warmup`` -> ``resampling`` is the whole method; several ``resampling`` variants may start from
one warm-up (``init_path``). History routing (``routing_topk``: each query token sees the top-k history frames
by q . mean key, plus its chunk and the sink; ``sf_model.routing``) and a sliding ``window`` apply in the
resampling, in the training forward and -- stored in the export with ``solver`` and the sampler steps -- at
inference (``StreamOptions.from_meta``). Under ``compute.budget_s`` the warm-up gets ``warmup_fraction`` of the
budget and the resampling stage the rest; both outputs' metadata and the export say what each got.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sf_model.mask import teacher_forcing_positions, teacher_forcing_visibility
from ..sf_model.resample import resample_sigmas, self_resample
from ..sf_model.schedule import add_noise, make_steps
from .baselines import draw_levels, frame_levels, loop_seconds
from .config import TrainConfig
from .engine import Trainable, accumulate, generator, run_loop, sample_indices, seeded_randn

WARMUP, RESAMPLING = "resampling_warmup", "resampling"
SIMULATIONS = ("autoregressive", "parallel", "noise")


# -- the simulation timestep -------------------------------------------------------------------------------
def shift_timestep(t, s: float):
    """t_s <- s t_s / (1 + (s - 1) t_s): s < 1 moves the timesteps towards 0 (less degradation), s > 1 up."""
    return s * t / (1 + (s - 1) * t)


def simulation_timesteps(count: int, s: float, *key) -> torch.Tensor:
    """``count`` shifted logit-normal timesteps in (0, 1): sigmoid(N(0, 1)), then ``shift_timestep``; keyed."""
    u = torch.randn(count, generator=generator(*key))
    return shift_timestep(torch.sigmoid(u), float(s))


# -- attention of the method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How the causal model attends, in training and at inference."""

    frames_per_block: int
    context_noise: float = 0.0
    window: int | None = None
    sink: int = 0
    routing_topk: int | None = None

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Layout":
        r = cfg.resampling
        return cls(cfg.sampling.frames_per_block, float(cfg.sampling.context_noise), r.window or None, r.sink,
                   r.routing_topk or None)


def history_flow(model, history: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, context,
                 layout: Layout) -> torch.Tensor:
    """The flow predicted for the noisy frames ``x_t`` [B, C, F, H, W] (timesteps [B, F]) given ``history``
    (x~, or the clean clip) in one forward over [history | x_t] under the teacher-forcing mask."""
    b, f = history.shape[0], history.shape[2]
    x_in = torch.cat([history, x_t], dim=2)
    t_hist = torch.full((b, f), layout.context_noise, device=timesteps.device, dtype=timesteps.dtype)
    vis = teacher_forcing_visibility(f, layout.frames_per_block, layout.window, layout.sink)
    routing = {} if layout.routing_topk is None else {"routing_topk": layout.routing_topk,
                                                      "routing_sink": layout.sink}
    out = model(x_in, torch.cat([t_hist, timesteps], dim=1), context, visibility=vis,
                positions=teacher_forcing_positions(f), **routing)
    return out[:, :, f:]


def resampling_loss(model, x0, history, noise, sigma, timesteps, context, layout: Layout) -> torch.Tensor:
    """Flow-matching MSE of every noisy frame (sigma, timesteps [B, F]) given the (degraded) history: the mean
    over frames of ||(noise - x0) - v||^2 (frames have equal size, so the mean over all elements)."""
    x_t = add_noise(x0, noise, sigma[:, None, :, None, None])
    pred = history_flow(model, history, x_t, timesteps, context, layout)
    return F.mse_loss(pred.float(), (noise - x0).float())


# -- the degraded history ----------------------------------------------------------------------------------------
@torch.no_grad()
def degrade_history(model, x0: torch.Tensor, sigma_s: torch.Tensor, noise: torch.Tensor, context, layout: Layout,
                    simulation: str = "autoregressive", solver: str = "renoise") -> torch.Tensor:
    """x~ of the clean clip ``x0`` [B, C, F, H, W] at each sample's level ``sigma_s`` [B] (no gradient).
    ``noise`` [n, B, C, F, H, W]: n = the solver levels; the noise of t_s and, for the "renoise" solver, of
    every further level ("euler" reads only the first)."""
    if simulation not in SIMULATIONS:
        raise ValueError(f"simulation must be one of {SIMULATIONS}, got {simulation!r}")
    b, f = x0.shape[0], x0.shape[2]
    x0 = x0.detach().float()
    s0 = sigma_s.float().view(b, 1, 1, 1, 1)
    if simulation == "noise":
        return add_noise(x0, noise[0].float(), s0)
    if simulation == "autoregressive":
        last = (f - 1) // layout.frames_per_block * layout.frames_per_block  # the last chunk is never history
        return self_resample(model, context, x0, sigma_s, noise, frames_per_block=layout.frames_per_block,
                             solver=solver, context_noise=layout.context_noise, window=layout.window,
                             sink=layout.sink, routing_topk=layout.routing_topk, frames=last)
    sigmas = resample_sigmas(sigma_s.float(), noise.shape[0])
    text = context if not isinstance(context, torch.Tensor) else model.encode_text(context)
    x = add_noise(x0, noise[0].float(), s0)
    out = x0
    for j in range(sigmas.shape[1]):
        s = sigmas[:, j]
        flow = history_flow(model, x0, x, (s * 1000.0)[:, None].expand(b, f).contiguous(), text, layout).float()
        out = x - s.view(b, 1, 1, 1, 1) * flow
        if j < sigmas.shape[1] - 1:
            nxt = out + flow if solver == "euler" else noise[j + 1].float()
            x = add_noise(out, nxt, sigmas[:, j + 1].view(b, 1, 1, 1, 1))
    return out


# -- noise levels of the training loss ---------------------------------------------------------------------------
def sample_steps(cfg: TrainConfig) -> list[int]:
    """The exported model's sampler steps: ``resampling.sample_steps``, else ``sampling.steps``."""
    return list(cfg.resampling.sample_steps or cfg.sampling.steps)


def level_table(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the "sampler" levels: the export's warped steps."""
    s = cfg.sampling
    steps = make_steps(sample_steps(cfg), s.shift, s.warp)
    return (torch.tensor([st.timestep for st in steps], dtype=torch.float32),
            torch.tensor([st.sigma for st in steps], dtype=torch.float32))


# -- one training micro-step ---------------------------------------------------------------------------------------
def training_loss(model, x0: torch.Tensor, ctx: torch.Tensor, cfg: TrainConfig, stage: str, indices,
                  ) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of one micro-batch: the clips ``x0`` [B, C, F, H, W] and text ``ctx`` of the samples
    ``indices``, every random draw keyed by (seed, stage, sample) so a resumed run redoes the same step. The
    warm-up trains on the clean history; the resampling stage draws t_s and degrades the history first."""
    r = cfg.resampling
    layout = Layout.of(cfg)
    fpb, frames, seed, device = layout.frames_per_block, x0.shape[2], cfg.run.seed, x0.device
    drawn = [draw_levels(-(-frames // fpb), r.schedule, level_table(cfg), r.level_shift, seed, stage, "levels", i)
             for i in indices]
    t = frame_levels(torch.stack([d[0] for d in drawn]), frames, fpb).to(device)
    sigma = frame_levels(torch.stack([d[1] for d in drawn]), frames, fpb).to(device)
    noise = torch.stack([seeded_randn(x0.shape[1:], seed, stage, "noise", i, device=device) for i in indices])
    stats = {}
    history = x0
    if stage == RESAMPLING:
        levels = r.resample_steps  # (euler reads only the first noise)
        t_s = torch.cat([simulation_timesteps(1, r.shift_s, seed, stage, "t_s", i) for i in indices]).to(device)
        rnoise = torch.stack([seeded_randn((levels, *x0.shape[1:]), seed, stage, "resample", i, device=device)
                              for i in indices], dim=1)
        history = degrade_history(model, x0, t_s, rnoise, ctx, layout, r.simulation, r.solver).to(x0.dtype)
        stats = {"t_s": t_s.mean(), "history_mse": (history.float() - x0.float()).square().mean()}
    loss = resampling_loss(model, x0, history, noise, sigma, t, ctx, layout)
    return loss, {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in stats.items()}}


# -- the stages --------------------------------------------------------------------------------------------------
def stage_path(cfg: TrainConfig, stage: str) -> str:
    name = WARMUP if stage == WARMUP else cfg.resampling.name
    return os.path.join(cfg.run.out_dir, f"{name}.safetensors")


def export_path(cfg: TrainConfig) -> str:
    """The bundle of the resampling stage: ``<name>_<kind>.safetensors`` next to the main export."""
    from .export import default_export_path

    folder = os.path.dirname(os.path.abspath(default_export_path(cfg)))
    return os.path.join(folder, f"{cfg.resampling.name}_{cfg.world.kind}.safetensors")


def start_weights(cfg: TrainConfig, stage: str, init_path: str, device):
    """The model a stage starts from: a file, the ``init_path`` given by the runner ("teacher"), or a fresh
    initialisation ("scratch"); the resampling stage defaults to the warm-up's output."""
    from .models import build_model, load_dit

    r = cfg.resampling
    spec = r.warmup_init if stage == WARMUP else (r.init_path or stage_path(cfg, WARMUP))
    if spec == "scratch":
        model = build_model(cfg.model, cfg.run.seed, device)
        return model.train().requires_grad_(True), "scratch"
    path = (init_path() if callable(init_path) else init_path) if spec == "teacher" else spec
    if not os.path.isfile(path):
        hint = "run the 'resampling_warmup' stage first" if stage == RESAMPLING else "check resampling.warmup_init"
        raise ValueError(f"{path} does not exist; {hint}")
    model, _ = load_dit(path, device, trainable=True)
    return model, path


def run_resampling_stage(cfg: TrainConfig, rt, world, stage: str, init_path, *,
                         stop_after: int | None = None) -> dict[str, str]:
    """Train (or resume) ``resampling_warmup`` or ``resampling``; writes the stage output (EMA) when it completes
    and, for ``resampling``, its bundle. Returns {stage: output[, "export_resampling": bundle]}. ``init_path``:
    the pretrained weights "teacher" stands for (a path, or a callable giving it when needed)."""
    if stage not in (WARMUP, RESAMPLING):
        raise ValueError(f"unknown Resampling Forcing stage {stage!r}")
    if not hasattr(world, "clips"):
        raise ValueError(f"Resampling Forcing trains on videos, and the {world.kind!r} world has none (it is data-"
                         "free: prompts only); use a world with clips (the toy world, or latents of real videos)")
    r = cfg.resampling
    model, start = start_weights(cfg, stage, init_path, rt.device)
    tr = Trainable(stage, model, rt, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay, grad_clip=r.grad_clip,
                   warmup=r.warmup, ema_decay=r.ema_decay, ema_start=r.ema_start, ema_warmup=r.ema_warmup)
    resample = stage == RESAMPLING

    def step_fn(step: int) -> dict:
        def micro(m: int):
            idx = sample_indices(step, m, rt, r.batch_size, r.grad_accum)
            x0 = world.clips(idx, rt.device, stream=stage)
            ctx = world.contexts(idx, rt.device, stream=stage)
            return training_loss(tr.wrapped, x0, ctx, cfg, stage, idx)

        metrics = accumulate(rt, tr, r.grad_accum, micro)
        metrics["grad_norm"] = tr.step()
        return metrics

    directory = os.path.join(cfg.run.out_dir, WARMUP if stage == WARMUP else r.name)
    steps = r.warmup_steps if stage == WARMUP else r.steps
    budget = r.warmup_time_budget_s if stage == WARMUP else r.time_budget_s
    end = run_loop(stage, steps, step_fn, {"student": tr}, directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=budget)
    out = {stage: stage_path(cfg, stage)}
    if end.completed and rt.is_main:
        from .models import save_dit

        info = {"stage": stage, "start": start, "steps": end.steps, "time_budget_s": budget,
                "batch_size": r.batch_size, "grad_accum": r.grad_accum, "lr": r.lr,
                "loop_seconds": loop_seconds(os.path.join(directory, "log.jsonl"))}
        if resample:
            info.update(simulation=r.simulation, shift_s=r.shift_s, resample_steps=r.resample_steps)
        save_dit(out[stage], tr.ema_model(), cfg.model, stage,
                 {**inference_meta(cfg), "steps_trained": end.steps, "resampling": info})
        if resample and r.export:
            out["export_resampling"] = export_resampling(cfg, world, out[stage])
    rt.barrier()
    return out


# -- what the export says --------------------------------------------------------------------------------------------
def inference_meta(cfg: TrainConfig) -> dict:
    """How the model is sampled (``StreamOptions.from_meta``): the sampler settings with the method's steps
    and solver, its history routing k, its sliding window and sink, and the method's name."""
    from .ode_init import sampling_meta

    r = cfg.resampling
    meta = {**sampling_meta(cfg), "method": "resampling_forcing", "steps": sample_steps(cfg), "solver": r.solver}
    if r.routing_topk:
        meta["routing_topk"] = r.routing_topk
    if r.window:
        meta["window"] = r.window
    if r.sink:
        meta["sink"] = r.sink
    return meta


def compute_summary(cfg: TrainConfig, source: str) -> dict:
    """The compute the model got: its warm-up (read from the warm-up output it started from, when it did) and its
    resampling stage, each with budget, steps and training-loop seconds; the total."""
    from .baselines import _meta

    stages = {}
    mine = _meta(source).get("resampling") or {}
    start = mine.get("start")
    if start and start not in ("scratch",) and os.path.isfile(start):
        warm = _meta(start).get("resampling") or {}
        if warm.get("stage") == WARMUP:
            stages[WARMUP] = {k: warm.get(k) for k in ("steps", "time_budget_s", "loop_seconds", "start")}
    stages[RESAMPLING] = {k: mine.get(k) for k in ("steps", "time_budget_s", "loop_seconds", "start")}

    def total(key):
        vals = [s.get(key) for s in stages.values() if s.get(key) is not None]
        return round(sum(vals), 3) if vals else None

    return {"stages": stages, "budget_s": total("time_budget_s"), "loop_s": total("loop_seconds")}


def export_resampling(cfg: TrainConfig, world, source: str) -> str:
    """The bundle of a resampling stage output, with its sampler settings and the compute it got."""
    from .export import export_model

    r = cfg.resampling
    variant = {"simulation": r.simulation, "shift_s": r.shift_s, "resample_steps": r.resample_steps,
               "solver": r.solver, "routing_topk": r.routing_topk, "window": r.window, "sink": r.sink}
    return export_model(cfg, world, source, export_path(cfg), role="resampling_forcing", publish=False,
                        extra_meta={**inference_meta(cfg), "variant": variant,
                                    "compute": compute_summary(cfg, source)})
