"""Stage ``sfpp``: Self-Forcing++ (Cui et al. 2025, arXiv 2510.02283) -- training past the teacher's horizon.

Starting from a Self Forcing export (the ``dmd`` stage's EMA generator, and its critic when the run has one),
every iteration of the official DMD loop (``training.dmd``) is run on a window of the student's own long
rollout instead of a teacher-length clip:

1. Long self-rollout: the generator rolls out N = ``horizon`` x T latent frames (T = the training clip) chunk by
   chunk with the sampler's own ``denoise_chunk``/``commit_chunk`` through the rolling KV cache of inference
   (window K = T frames plus ``sink``; ``training.long_rollout``). Chunks before the sampled window run
   without gradient (all denoising steps, as at inference, with ``prefix_exit = "last"``); chunks after it are
   never generated (the rollout is causal).
2. Backward noise initialisation: the teacher (real score) and the critic (fake score) see the student's
   rollout re-noised on the window, x_t = (1 - sigma) x0 + sigma eps (``dmd_gradient``), not fresh noise.
3. Extended DMD: the window start i ~ U{0..N-K} (on chunk boundaries with ``align = "chunk"``) is drawn on
   rank 0 and broadcast, like the exit step. The window [i, i+K) is handed to the bidirectional teacher and
   critic as a K-frame clip, i.e. at positions 0..K-1 (re-based). The generator's gradient flows only through
   the exit-step forwards of the window's chunks (earlier chunks act only through the detached cache); the
   critic learns the flow of windows of fresh no-grad long rollouts.

``horizon = 1`` with ``sink = 0`` is plain Self Forcing trained further from the same start (the "Self Forcing
continued" control at equal generator updates; ``sfpp.name = "self_forcing_continued"``).

The stage writes ``<out_dir>/<name>.safetensors`` (EMA) and the bundle ``<name>_<kind>.safetensors`` next to the
main export, whose metadata declares the rolling cache it was trained with (``train_frames`` = K, ``sink``),
which ``sf_model.window.default_policy`` -- hence the nodes and the CLI -- use for long videos.
"""

from __future__ import annotations

import math
import os

import torch

from ..sf_model.schedule import make_steps
from .config import TrainConfig
from .dmd import (alternate, check_roles, critic_loss, dmd_gradient, dmd_loss, draw_exit, make_reencoder,
                  score_sigmas, self_forcing_path)
from .engine import Runtime, Trainable, accumulate, read_checkpoint, run_loop, sample_indices, seeded_randn
from .long_rollout import Window, draw_window, rollout_long
from .models import load_dit, save_dit
from .ode_init import sampling_meta
from .roles import check_generator_architecture, check_real_score, critic_init_path, load_frozen

STAGE = "sfpp"  # the key of every random draw: runs of any name (sfpp, self_forcing_continued) draw alike


# -- paths -------------------------------------------------------------------------------------------
def sfpp_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.out_dir, f"{cfg.sfpp.name}.safetensors")


def sfpp_export_path(cfg: TrainConfig) -> str:
    from .export import default_export_path

    folder = os.path.dirname(os.path.abspath(default_export_path(cfg)))
    return os.path.join(folder, f"{cfg.sfpp.name}_{cfg.world.kind}.safetensors")


def generator_source(cfg: TrainConfig) -> str:
    path = cfg.sfpp.generator_path or self_forcing_path(cfg)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: Self-Forcing++ continues a Self Forcing model; run the 'dmd' "
                         "stage first or set sfpp.generator_path")
    return path


def has_checkpoint(folder: str) -> bool:
    """A stage folder holding a trainer checkpoint: its ``checkpoint/`` folder of ``torch.distributed.checkpoint``
    step folders (training/sharded_checkpoint.py), or an older single ``checkpoint.pt`` (still read)."""
    return os.path.isfile(os.path.join(folder, "checkpoint.pt")) or os.path.isdir(os.path.join(folder, "checkpoint"))


def critic_source(cfg: TrainConfig) -> str | None:
    """The critic to start from: ``sfpp.critic_path`` (a trainer checkpoint -- a stage folder, e.g.
    ``<run>/dmd``, or an older single ``checkpoint.pt`` -- or a model file), else the dmd stage's live critic when
    the run has one (``<out_dir>/dmd``), else None: ``roles.critic_init_path`` (the toy teacher; Wan:
    ``models.critic_init``)."""
    if cfg.sfpp.critic_path:
        if not os.path.exists(cfg.sfpp.critic_path):
            raise ValueError(f"sfpp.critic_path {cfg.sfpp.critic_path} does not exist")
        return cfg.sfpp.critic_path
    folder = os.path.join(cfg.run.out_dir, "dmd")
    return folder if has_checkpoint(folder) else None


def checkpoint_part(path: str, part: str) -> dict:
    """The whole weights of one part of a trainer checkpoint: a stage folder (its newest readable DCP step
    folder, ``read_full_checkpoint``), or an older single ``checkpoint.pt`` (the file, or a stage folder
    holding one)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "checkpoint.pt")):
        from .sharded_checkpoint import read_full_checkpoint

        parts = read_full_checkpoint(path)["parts"]
    else:
        parts = read_checkpoint(os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path)["parts"]
    if part not in parts:
        raise ValueError(f"{path} holds no {part} (parts: {sorted(parts)})")
    return parts[part]["model"]


def load_critic(cfg: TrainConfig, source: str | None, device: torch.device, like: str):
    """The trainable critic (float32): ``source`` a trainer checkpoint (its ``critic`` part loaded into a model
    read from ``like``, a file of the generator's architecture) or a model file; None: the critic's role
    (``roles.critic_init_path``)."""
    if source is not None and (os.path.isdir(source) or source.endswith((".pt", ".pth"))):
        critic, _ = load_dit(like, device, trainable=True)
        critic.load_state_dict(checkpoint_part(source, "critic"))
        return critic
    path = source or critic_init_path(cfg)
    critic, _ = load_dit(path, device, trainable=True)
    check_generator_architecture(critic, cfg, "critic", path)
    return critic


# -- the trainer -------------------------------------------------------------------------------------
class SfppTrainer:
    """Generator, critic and real score; ``step(step)`` is one iteration (critic every step, generator every
    ``critic_ratio``). ``drawn`` records (kind, step, window start, exit step) of every draw (logs, tests).

    ``generator`` and ``critic``: trainable models of ``cfg.model``'s architecture; ``real_score``: a frozen
    bidirectional model of any size reading the same latents and text (``roles``). ``reencoder``: what
    re-encodes a window's first latent (default with ``sfpp.reencode_first``: ``dmd.make_reencoder``)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, world, generator, critic, real_score, reencoder=None):
        self.real = check_roles(cfg, rt, generator, critic, real_score)  # frozen; sharded over processes
        self.cfg, self.rt, self.world = cfg, rt, world
        sc = self.sc = cfg.sfpp
        common = dict(betas=sc.betas, weight_decay=sc.weight_decay, grad_clip=sc.grad_clip, warmup=sc.warmup)
        self.gen = Trainable("generator", generator.train().requires_grad_(True), rt, lr=sc.lr,
                             ema_decay=sc.ema_decay, ema_start=sc.ema_start, ema_warmup=sc.ema_warmup, **common)
        self.critic = Trainable("critic", critic.train().requires_grad_(True), rt, lr=sc.lr_critic, **common)
        if rt.activation_checkpointing:  # the rolling cache is rewritten before backward: keep copied history
            generator.set_activation_checkpointing(True, history="copy")
        c, f, h, w = world.clip_shape
        self.latent_shape = (c, h, w)
        self.window_frames = sc.window or f
        self.total = sc.horizon * f
        if self.total < self.window_frames:
            raise ValueError(f"the rollout ({sc.horizon} x {f} = {self.total} frames) is shorter than the window "
                             f"({self.window_frames}); raise sfpp.horizon")
        self.opts = cfg.sampling.stream_options(window=self.window_frames, sink=sc.sink)
        self.steps = make_steps(cfg.sampling.steps, cfg.sampling.shift, cfg.sampling.warp)
        self.drawn: list[tuple[str, int, int, int]] = []
        self.start_meta: dict = {}  # the generator file's metadata (from_paths)
        self.reencoder = reencoder
        if reencoder is None and sc.reencode_first and self.total > self.window_frames:
            if getattr(world, "codec", None) is None and not cfg.models.vae:
                raise ValueError("sfpp.reencode_first re-encodes the first latent of windows that start mid-video "
                                 "through the VAE: set models.vae to the Wan2.1 VAE, or sfpp.reencode_first = false")
            self.reencoder = make_reencoder(cfg, world, rt.device)

    @classmethod
    def from_paths(cls, cfg: TrainConfig, rt: Runtime, world, generator_path: str, real_score_path: str,
                   critic: str | None = None) -> "SfppTrainer":
        """Load the roles: the generator (a Self Forcing model) and the critic (``load_critic``) trainable in
        float32, the real score frozen (``roles.load_frozen``: bf16 on CUDA)."""
        real = load_frozen(real_score_path, rt.device)
        check_real_score(real, cfg, real_score_path)
        crit = load_critic(cfg, critic, rt.device, like=generator_path)
        gen, meta = load_dit(generator_path, rt.device, trainable=True)
        check_generator_architecture(gen, cfg, "generator", generator_path)
        out = cls(cfg, rt, world, gen, crit, real)
        out.start_meta = meta
        return out

    def parts(self) -> dict:
        return {"generator": self.gen, "critic": self.critic}

    def _noise_for(self, indices, *key):
        c, h, w = self.latent_shape
        dev = self.rt.device

        def noise_for(chunk: int, frames: int, count: int) -> list[torch.Tensor]:
            return [torch.stack([seeded_randn((c, frames, h, w), *key, i, chunk, s, device=dev) for i in indices])
                    for s in range(count)]
        return noise_for

    def draw(self, kind: str, step: int) -> tuple[Window, int]:
        """The window and exit step of one rollout, drawn on rank 0 and broadcast."""
        seed = self.cfg.run.seed
        exit_index = draw_exit(len(self.steps), self.rt, seed, STAGE, f"{kind}-exit", step)
        window = draw_window(self.total, self.window_frames, self.opts.frames_per_block, self.sc.align, self.rt,
                             seed, STAGE, f"{kind}-window", step)
        self.drawn.append((kind, step, window.start, exit_index))
        return window, exit_index

    def rollout(self, model, text, indices, window: Window, exit_index: int, grad: bool,
                *key) -> tuple[torch.Tensor, int]:
        """(the scores' K-frame clip of the window, the first of its frames that carries the DMD loss): the
        window of the long rollout as it is, or -- ``reencode_first``, Wan -- with its first latent re-encoded as
        an image latent and its first chunk left out of the loss (``training.loss_window``)."""
        prefix_exit = len(self.steps) - 1 if self.sc.prefix_exit == "last" else exit_index
        video = rollout_long(model, text, window, batch=len(indices), latent_shape=self.latent_shape,
                             steps=self.steps, opts=self.opts, exit_index=exit_index, prefix_exit=prefix_exit,
                             noise_for=self._noise_for(indices, *key), grad=grad, cache_dtype=self.rt.compute_dtype)
        if self.reencoder is None or window.start == 0:
            return video[:, :, window.start:window.end], 0
        from .loss_window import loss_window

        lw = loss_window(video, window.start, window.frames, reencode_first=self.reencoder,
                         masked_frames=self.opts.frames_per_block)
        return lw.video, lw.loss_from

    def generator_step(self, step: int) -> dict:
        sc, rt, seed = self.sc, self.rt, self.cfg.run.seed
        window, exit_index = self.draw("gen", step)

        def micro(m: int):
            idx = sample_indices(step, m, rt, sc.batch_size, sc.grad_accum)
            cond = self.world.contexts(idx, rt.device, stream=STAGE)
            uncond = self.world.uncond(len(idx), rt.device)
            text = self.gen.wrapped.encode_text(cond)
            video, loss_from = self.rollout(self.gen.wrapped, text, idx, window, exit_index, True, seed, STAGE,
                                            "gen-noise", step)
            sigma = score_sigmas(idx, sc, seed, STAGE, "gen-t", step).to(rt.device)
            eps = torch.stack([seeded_randn(video.shape[1:], seed, STAGE, "gen-score", step, i, device=rt.device)
                               for i in idx])
            grad, info = dmd_gradient(video, self.critic.model, self.real, cond, uncond, sigma, eps, sc.guidance)
            loss = dmd_loss(video[:, :, loss_from:], grad[:, :, loss_from:])
            return loss, {"generator_loss": loss.detach(), **info}

        metrics = accumulate(rt, self.gen, sc.grad_accum, micro)
        metrics["generator_grad_norm"] = self.gen.step()
        metrics.update(exit_index=exit_index, window_start=window.start)
        return metrics

    def critic_step(self, step: int) -> dict:
        sc, rt, seed = self.sc, self.rt, self.cfg.run.seed
        window, exit_index = self.draw("critic", step)

        def micro(m: int):
            idx = sample_indices(step, m, rt, sc.batch_size, sc.grad_accum)
            cond = self.world.contexts(idx, rt.device, stream=f"{STAGE}-critic")
            with torch.no_grad():
                text = self.gen.model.encode_text(cond)
                video, _ = self.rollout(self.gen.model, text, idx, window, exit_index, False, seed, STAGE,
                                        "critic-noise", step)
            sigma = score_sigmas(idx, sc, seed, STAGE, "critic-t", step).to(rt.device)
            eps = torch.stack([seeded_randn(video.shape[1:], seed, STAGE, "critic-score", step, i,
                                            device=rt.device) for i in idx])
            loss = critic_loss(self.critic.wrapped, video, cond, sigma, eps)
            return loss, {"critic_loss": loss.detach()}

        metrics = accumulate(rt, self.critic, sc.grad_accum, micro)
        metrics["critic_grad_norm"] = self.critic.step()
        metrics["critic_window_start"] = window.start
        return metrics

    def step(self, step: int) -> dict:
        return alternate(step, self.sc.critic_ratio, self.generator_step, self.critic_step)


# -- the stage ---------------------------------------------------------------------------------------
def cache_meta(cfg: TrainConfig, world) -> dict:
    """What the export declares about its training: the rolling cache (``train_frames`` = ``window`` = K and
    ``sink``: ``sf_model.window.default_policy`` and ``trained_attention`` make them the nodes' and the CLI's
    defaults for long videos) and the Self-Forcing++ settings."""
    sc = cfg.sfpp
    f = world.clip_shape[1]
    k = sc.window or f
    return {"train_frames": k, "window": k, "sink": sc.sink,
            "sfpp": {"horizon": sc.horizon, "rollout_frames": sc.horizon * f, "window": k, "sink": sc.sink,
                     "align": sc.align, "prefix_exit": sc.prefix_exit, "critic_ratio": sc.critic_ratio}}


def train_sfpp(cfg: TrainConfig, rt: Runtime, world, real_score_path: str, *,
               stop_after: int | None = None) -> dict[str, str]:
    """Train (resuming the stage's checkpoint, ``<out_dir>/<name>/checkpoint/``); once every step ran, write the
    stage output and the bundle. Returns {"sfpp": output, "export_sfpp": bundle}, or {} when this call stopped
    early (``slice_s``, ``stop_after``)."""
    from .baselines import loop_seconds
    from .export import export_model

    sc = cfg.sfpp
    start, critic_from = generator_source(cfg), critic_source(cfg)
    trainer = SfppTrainer.from_paths(cfg, rt, world, start, real_score_path, critic_from)
    directory = os.path.join(cfg.run.out_dir, sc.name)
    end = run_loop(sc.name, sc.steps, trainer.step, trainer.parts(), directory, rt, log_every=cfg.run.log_every,
                   checkpoint_every=cfg.run.checkpoint_every, progress=cfg.run.progress, stop_after=stop_after,
                   time_budget_s=sc.slice_s or sc.time_budget_s)
    if not end.completed or (sc.slice_s and end.steps < sc.steps):
        rt.barrier()
        return {}
    path, bundle = sfpp_path(cfg), sfpp_export_path(cfg)
    if rt.is_main:
        meta = cache_meta(cfg, world)
        meta["sfpp"].update(start=start, start_steps_trained=trainer.start_meta.get("steps_trained"),
                            critic_start=critic_from or critic_init_path(cfg), critic_steps=end.steps,
                            generator_updates=math.ceil(end.steps / sc.critic_ratio),
                            loop_s=loop_seconds(os.path.join(directory, "log.jsonl")))
        save_dit(path, trainer.gen.ema_model(), cfg.model, sc.name,
                 {**sampling_meta(cfg), **meta, "steps_trained": end.steps})
        # drift None: an eval.json in out_dir measured another model
        export_model(cfg, world, path, bundle, role=sc.name, publish=False,
                     extra_meta={**meta, "drift": None, "compute": meta["sfpp"]})
    rt.barrier()
    return {"sfpp": path, "export_sfpp": bundle}
