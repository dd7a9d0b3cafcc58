"""Training configuration: TOML files (stdlib ``tomllib``) mapped onto small dataclasses.

A config file has one table per concern::

    [run]       out_dir, seed, device, precision, log_every, checkpoint_every
    [model]     WanConfig fields of the DiT (teacher, critic and student share the architecture)
    [sampling]  frames_per_block, steps, shift, warp, context_noise (the student's few-step sampler)
    [world]     kind = "toy" (procedural videos, bundled text encoder/codec) or "wan" (precomputed embeddings)
    [models]    which checkpoint plays which role: generator_init, real_score, critic_init, ode_teacher, vae
                (``training.roles``; the toy teacher plays every role)
    [teacher] [ode_pairs] [ode_init] [dmd] [export] [eval]   one table per stage
    [teacher_forcing] [diffusion_forcing]                   the baselines (``training.baselines``)
    [compute]   budget_s: one equal time budget per baseline after the teacher (overrides the stages' own)
    [sfpp]      Self-Forcing++: long rollouts, DMD on a sampled window (``training.sfpp``; asked for by name)
    [grpo]      optional GRPO after Self-Forcing++: group-relative rewards of long rollouts (``training.grpo``)
    [resampling]  Resampling Forcing: warm-up + self-resampled history (``training.resampling``; by name)
    [lora]      enabled, rank, alpha, dropout, targets: train the generator as LoRA adapters (``training.lora``)

Unknown keys are refused (a typo must not silently fall back to a default). ``--set table.key=value`` on
the command line overrides any value (parsed as a TOML value).
"""

from __future__ import annotations

import dataclasses
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..sf_model.config import WanConfig
from ..sf_model.sampler import StreamOptions
from ..sf_model.schedule import DEFAULT_STEPS
from ..sf_model.window import CachePolicy

STAGES = ("teacher", "ode_pairs", "ode_init", "dmd", "sfpp", "grpo", "teacher_forcing", "diffusion_forcing",
          "eval", "export")
# Resampling Forcing (``training.resampling``): asked for by name, like Self-Forcing++
RESAMPLING_STAGES = ("resampling_warmup", "resampling")
STAGES = STAGES[:STAGES.index("eval")] + RESAMPLING_STAGES + STAGES[STAGES.index("eval"):]
# What a run does when no stage is named: the Self Forcing pipeline (the baselines are asked for by name, or
# all together with --stages baselines).
PIPELINE = ("teacher", "ode_pairs", "ode_init", "dmd", "eval", "export")
BASELINE_STAGES = ("teacher_forcing", "diffusion_forcing")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/toy"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    precision: str = "fp32"       # fp32 | bf16 (bf16 compute; master weights and optimiser state stay fp32)
    log_every: int = 10
    checkpoint_every: int = 100
    progress: bool = True         # tqdm bars on rank 0
    parallel: str = "fsdp"        # fsdp (FSDP2 shards) | ddp (replicas), over torchrun's processes
    optimizer_offload: bool = False  # FSDP2 CPUOffloadPolicy: float32 shards + AdamW state in host memory
    ema_on_cpu: bool = False      # EMA shadows in host memory
    activation_checkpointing: bool = False  # recompute every block of the trained models in backward

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"run.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.parallel not in ("fsdp", "ddp"):
            raise ValueError(f"run.parallel must be 'fsdp' or 'ddp', got {self.parallel!r}")
        if self.optimizer_offload and self.parallel != "fsdp":
            raise ValueError("run.optimizer_offload needs run.parallel = 'fsdp'")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("run.checkpoint_every and run.log_every must be >= 1")


@dataclass(frozen=True)
class SamplingConfig:
    frames_per_block: int = 3
    steps: tuple[int, ...] = DEFAULT_STEPS
    shift: float = 5.0
    warp: bool = True
    context_noise: float = 0.0

    def stream_options(self, window: int | None = None, sink: int = 0) -> StreamOptions:
        """The student's sampler: one fixed cache, or a rolling ``window`` (+ ``sink``) as ``CachePolicy`` rules."""
        return StreamOptions.from_policy(CachePolicy(self.frames_per_block, window, sink), steps=tuple(self.steps),
                                         warp=self.warp, shift=self.shift, context_noise=self.context_noise)


@dataclass(frozen=True)
class WorldConfig:
    kind: str = "toy"
    # toy: pixel size of the square videos, latent frames of a training clip, toy text encoder width
    size: int = 64
    frames: int = 12
    max_objects: int | None = None
    # wan: a prompt store (folder written by `python -m self_forcing.training.encode_prompts`: sharded, lazily
    # read; its negative prompt is the default unconditional context), or precomputed text embeddings (files
    # written by the nodes' 'Save Text Embeddings')
    prompt_store: str = ""
    prompts_dir: str = ""
    negative: str = ""            # embeddings of the negative prompt (CFG); empty = the store's, else zeros
    latent_height: int = 60
    latent_width: int = 104
    # toy: a toy teacher trained elsewhere (it plays every role). wan: DEPRECATED aliases of the [models] keys
    # (teacher_path: real_score/critic_init/ode_teacher; generator_path: generator_init), with a warning
    teacher_path: str = ""
    generator_path: str = ""
    # toy: seed of the toy text encoder (None = run.seed). Runs of several training seeds that share one
    # teacher must share its text encoder: set it to the teacher run's seed. A toy run may also name a
    # teacher trained elsewhere with teacher_path (then the teacher stage is not needed in this run).
    text_seed: int | None = None

    def __post_init__(self):
        if self.kind not in ("toy", "wan"):
            raise ValueError(f"world.kind must be 'toy' or 'wan', got {self.kind!r}")
        if self.frames < 1:
            raise ValueError(f"world.frames must be >= 1, got {self.frames}")


@dataclass(frozen=True)
class ModelsConfig:
    """Which checkpoint plays which role (``training.roles``; empty = the default named here)."""

    generator_init: str = ""      # causal ODE-init weights the DMD generator starts from ("" = <out_dir>/ode_init)
    real_score: str = ""          # frozen bidirectional real score, any size (paper: Wan2.1-T2V-14B); bf16 on CUDA
    critic_init: str = ""         # the critic's start, generator's architecture ("" = real_score if it has it)
    ode_teacher: str = ""         # makes the ODE pairs ("" = critic_init)
    vae: str = ""                 # Wan2.1 VAE: re-encoding for rollouts longer than the loss window (wan only)


@dataclass(frozen=True)
class OptimConfig:
    """One optimisation stage (teacher, ODE init): AdamW, clipping, EMA, accumulation."""

    steps: int = 100
    batch_size: int = 4           # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 0
    ema_decay: float = 0.999
    ema_start: int = 0
    ema_warmup: bool = False      # decay min(ema_decay, (1 + n) / (10 + n)) n steps after ema_start
    time_budget_s: float = 0.0    # > 0: stop cleanly after this many seconds (time-boxed runs)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps must be >= 0, batch_size and grad_accum >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class TeacherConfig(OptimConfig):
    ema_warmup: bool = True       # from scratch: without it a short run's EMA keeps ema_decay**steps of the init
    init_path: str = ""           # start from these weights (a teacher export) with a fresh optimiser; "" = random
    shift: float = 3.0            # training noise levels: shifted uniform sigmas
    cfg_dropout: float = 0.1      # probability of the empty prompt (for classifier-free guidance)


@dataclass(frozen=True)
class OdePairsConfig:
    count: int = 64
    batch_size: int = 16
    substeps: int = 8             # Euler steps between two of the student's noise levels (x2 for the last)
    guidance: float = 4.0         # CFG, uncond + g (cond - uncond)
    time_budget_s: float = 0.0    # > 0: stop after this many seconds with the pairs made so far


@dataclass(frozen=True)
class OdeInitConfig(OptimConfig):
    pass


@dataclass(frozen=True)
class DmdConfig(OptimConfig):
    """Self Forcing with DMD. ``steps`` counts critic updates; the generator updates every ``critic_ratio``."""

    lr: float = 2e-6
    lr_critic: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    critic_ratio: int = 5
    guidance: float = 3.0         # official form: cond + g (cond - uncond)
    min_t: float = 0.02
    max_t: float = 0.98
    score_shift: float = 5.0
    # Rollouts longer than the loss window (``training.loss_window``; official num_training_frames > 21):
    # 0 = world.frames (no long rollouts); else each rollout has a random number of blocks in
    # [world.frames, rollout_frames] frames and the losses see its last world.frames frames, whose first latent
    # is re-encoded as an image latent (decode, last pixel frame, encode alone) when reencode_first is set
    rollout_frames: int = 0
    reencode_first: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.rollout_frames < 0:
            raise ValueError(f"dmd.rollout_frames must be >= 0 (0 = world.frames), got {self.rollout_frames}")
        if self.critic_ratio < 1:
            raise ValueError(f"dmd.critic_ratio must be >= 1, got {self.critic_ratio}")
        if not 0.0 <= self.min_t < self.max_t <= 1.0:
            raise ValueError(f"need 0 <= dmd.min_t < dmd.max_t <= 1, got {self.min_t}, {self.max_t}")


@dataclass(frozen=True)
class SfppConfig(DmdConfig):
    """Self-Forcing++ (``training.sfpp``): DMD on a window of the student's own long rollout, continuing from a
    Self Forcing export. ``steps`` counts critic updates (generator every ``critic_ratio``); the DMD settings
    (lr, guidance, ...) are this table's own, with [dmd]'s defaults. Outputs ``<out_dir>/<name>.safetensors``
    and the bundle ``<name>_<world.kind>.safetensors`` next to the main export; ``horizon = 1`` with
    ``sink = 0`` is plain Self Forcing trained further."""

    name: str = "sfpp"            # output / checkpoint folder / export name (e.g. self_forcing_continued)
    horizon: int = 20             # rollout length N in training clips: N = horizon x world.frames
    window: int = 0               # K: the DMD window and the rolling cache window (latent frames); 0 = world.frames
    sink: int = 0                 # attention-sink frames of the rolling cache (declared in the export)
    align: str = "chunk"          # window starts: on chunk boundaries ("chunk") or any frame ("frame")
    prefix_exit: str = "last"     # chunks before the window: all steps ("last", as inference) or the window's exit
    generator_path: str = ""      # start; "" = <out_dir>/self_forcing.safetensors (the DMD stage's output)
    critic_path: str = ""         # "" = the dmd stage's critic (<out_dir>/dmd) if present, else models.critic_init
    slice_s: float = 0.0          # > 0: train at most this long per call, checkpoint, export only when all steps ran
    # Wan: a window that starts mid-video gets its first latent re-encoded as an image latent (the teacher's
    # clip-start convention; ``training.loss_window``, the VAE of models.vae) and its first chunk left out of the
    # DMD loss. Off by default: the toy teacher has no such convention.
    reencode_first: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.horizon < 1 or self.window < 0 or self.sink < 0 or self.slice_s < 0:
            raise ValueError("sfpp needs horizon >= 1, window >= 0, sink >= 0, slice_s >= 0")
        if self.align not in ("chunk", "frame") or self.prefix_exit not in ("last", "same"):
            raise ValueError(f"sfpp.align must be 'chunk' or 'frame' and sfpp.prefix_exit 'last' or 'same', got "
                             f"{self.align!r}, {self.prefix_exit!r}")
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"sfpp.name must be a plain name (letters, digits, _), got {self.name!r}")


@dataclass(frozen=True)
class GrpoConfig(OptimConfig):
    """GRPO for long-term smoothness (Self-Forcing++ section 3.3; ``training.grpo``, toy world only): groups of
    ``group`` stochastic long rollouts per prompt, rewarded by the toy world's own rules, clipped policy-ratio
    objective per denoising transition. ``steps`` counts rollout batches (each ``inner_updates`` updates)."""

    steps: int = 50
    lr: float = 1e-6
    betas: tuple[float, float] = (0.0, 0.999)
    ema_decay: float = 0.99
    group: int = 4                # G rollouts per prompt (the group of the relative advantage)
    prompts_per_step: int = 2     # prompts per process and step (rollout batch = prompts_per_step x group)
    horizon: int = 5              # rollout length N = horizon x world.frames latent frames
    window: int = 0               # rolling cache window K; 0 = the start model's train_frames, else world.frames
    sink: int = -1                # attention-sink frames; -1 = the start model's declared sink (else 0)
    clip_eps: float = 0.2         # ratio clip [1 - eps, 1 + eps]
    beta: float = 0.0             # KL to the frozen start model (0: no reference model)
    inner_updates: int = 1        # updates per rollout batch (the ratio leaves 1 after the first)
    generator_path: str = ""      # "" = <out_dir>/<sfpp.name>.safetensors if present, else self_forcing.safetensors

    def __post_init__(self):
        super().__post_init__()
        if self.group < 2 or self.prompts_per_step < 1 or self.horizon < 1 or self.inner_updates < 1:
            raise ValueError("grpo needs group >= 2, prompts_per_step >= 1, horizon >= 1, inner_updates >= 1")
        if self.window < 0 or self.sink < -1 or not 0 < self.clip_eps < 1 or self.beta < 0:
            raise ValueError("grpo needs window >= 0, sink >= -1, 0 < clip_eps < 1, beta >= 0")


SCHEDULES = ("sampler", "continuous")


@dataclass(frozen=True)
class TeacherForcingConfig(OptimConfig):
    """Teacher forcing: flow matching of each noisy chunk against the clean frames of the earlier chunks.

    ``schedule``: "sampler" = each chunk's noise level is one of the sampler's (warped) steps, uniformly;
    "continuous" = sigma = shift(u), u ~ U(0, 1) per chunk, with ``shift``.
    """

    lr: float = 1e-4
    schedule: str = "sampler"
    shift: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass(frozen=True)
class DiffusionForcingConfig(TeacherForcingConfig):
    """Diffusion forcing: independent noise levels per chunk (``noise = "chunk"``) or per frame ("frame"),
    block-causal attention, flow loss on every frame. The "sampler" schedule draws among the sampler's steps
    *and* the clean-context level (``sampling.context_noise``), which is what history holds at inference."""

    noise: str = "chunk"

    def __post_init__(self):
        super().__post_init__()
        if self.noise not in ("chunk", "frame"):
            raise ValueError(f"diffusion_forcing.noise must be 'chunk' or 'frame', got {self.noise!r}")


@dataclass(frozen=True)
class ResamplingConfig(OptimConfig):
    """Resampling Forcing (``training.resampling``): teacher-free training on self-resampled history.

    Stage ``resampling_warmup``: teacher forcing from ``warmup_init`` for ``warmup_steps`` (time-boxed runs:
    ``warmup_fraction`` of ``compute.budget_s``). Stage ``resampling``: from ``init_path`` (default the
    warm-up's output); per step t_s ~ LogitNormal(0, 1), shifted t_s <- s t_s / (1 + (s - 1) t_s) with
    s = ``shift_s``; the history degraded without gradient by ``simulation`` ("autoregressive": each chunk
    noised to t_s and re-denoised through the KV cache after the already degraded chunks; "parallel": every
    chunk re-denoised at once against the clean history; "noise": only noised) with ``resample_steps`` levels
    of ``solver``; then one parallel forward of [degraded history | noisy clip] and the flow loss of every
    frame. ``routing_topk`` (history routing), ``window`` and ``sink`` shape attention in training and go into
    the export with ``solver`` and ``sample_steps`` (its sampler). Both stages are asked for by name."""

    lr: float = 1e-4
    simulation: str = "autoregressive"   # autoregressive | parallel | noise
    shift_s: float = 0.6
    resample_steps: int = 4              # solver levels from t_s towards 0 when resampling
    solver: str = "renoise"              # renoise (x0 + fresh noise) | euler (flow ODE): resampling and export
    sample_steps: tuple[int, ...] = ()   # the export's sampler steps; () = sampling.steps
    schedule: str = "sampler"            # training levels: the export's (warped) steps | "continuous"
    level_shift: float = 5.0             # shift of the "continuous" levels
    routing_topk: int = 0                # history routing: top-k history frames per query token (0 = off)
    window: int = 0                      # sliding attention window in latent frames (0 = none)
    sink: int = 0                        # sink frames (with a window or routing)
    warmup_steps: int = 100
    warmup_fraction: float = 0.25
    warmup_time_budget_s: float = 0.0
    warmup_init: str = "teacher"         # teacher | scratch | a file
    init_path: str = ""                  # "" = <out_dir>/resampling_warmup.safetensors | teacher | scratch | a file
    name: str = "resampling_forcing"     # output / checkpoint folder / export name
    export: bool = True                  # write the bundle <name>_<world.kind>.safetensors when the stage completes

    def __post_init__(self):
        super().__post_init__()
        if self.simulation not in ("autoregressive", "parallel", "noise"):
            raise ValueError(f"resampling.simulation must be autoregressive, parallel or noise, got {self.simulation!r}")
        if self.solver not in ("renoise", "euler"):
            raise ValueError(f"resampling.solver must be renoise or euler, got {self.solver!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"resampling.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.shift_s > 0 or self.resample_steps < 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("resampling needs shift_s > 0, resample_steps >= 1 and 0 <= warmup_fraction < 1")
        if self.routing_topk < 0 or self.window < 0 or self.sink < 0 or self.warmup_steps < 0:
            raise ValueError("resampling.routing_topk, window, sink and warmup_steps must be >= 0")
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"resampling.name must be a plain name (letters, digits, _), got {self.name!r}")


@dataclass(frozen=True)
class ComputeConfig:
    """Equal compute for the baselines. ``budget_s`` > 0: every baseline gets that many seconds of training
    after the shared teacher -- teacher forcing and diffusion forcing all of it, Self Forcing split over its
    stages as ``split`` (ode_pairs, ode_init, dmd fractions; the causal ODE init is Self Forcing's first part).
    These budgets replace the stages' own ``time_budget_s``."""

    budget_s: float = 0.0
    split: tuple[float, float, float] = (0.15, 0.3, 0.55)

    def __post_init__(self):
        if self.budget_s < 0:
            raise ValueError(f"compute.budget_s must be >= 0, got {self.budget_s}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"compute.split must be 3 fractions (ode_pairs, ode_init, dmd) summing to 1, "
                             f"got {self.split}")

    def stage_budgets(self) -> dict[str, float]:
        b, (p, i, d) = self.budget_s, self.split
        return {"ode_pairs": b * p, "ode_init": b * i, "dmd": b * d, "teacher_forcing": b,
                "diffusion_forcing": b}


@dataclass(frozen=True)
class ExportConfig:
    path: str = ""                # default: <out_dir>/self_forcing_toy.safetensors
    dtype: str = "fp16"
    hub_repo: str = ""            # publish to this Hugging Face repo (needs a token) when set
    hub_private: bool = False
    causal_init: bool = False     # also export the ODE-initialised student (for side-by-side comparisons)
    baselines: bool = True        # also export teacher_forcing / diffusion_forcing when those stages ran

    def __post_init__(self):
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"export.dtype must be fp32, fp16 or bf16, got {self.dtype!r}")


# The linears of a transformer block LoRA may adapt (module names inside ``blocks.N``).
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the generator (DMD stage): W + alpha/rank * B @ A on the ``targets`` of every block; the base
    weights stay frozen. Exported merged and as a ComfyUI LoRA file (``training.lora``)."""

    enabled: bool = False
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora needs rank >= 1, alpha > 0, 0 <= dropout < 1; got {self.rank}, {self.alpha}, "
                             f"{self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora.targets must be a non-empty subset of {list(LORA_TARGETS)}, got {bad or []}")


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 4
    seed: int = 1234
    length_factor: int = 6        # generate length_factor x the training clip length
    window: int | None = None     # rolling cache window (latent frames); None = the training clip length
    batch_size: int = 4


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: WanConfig = field(default_factory=WanConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ode_pairs: OdePairsConfig = field(default_factory=OdePairsConfig)
    ode_init: OdeInitConfig = field(default_factory=OdeInitConfig)
    dmd: DmdConfig = field(default_factory=DmdConfig)
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    diffusion_forcing: DiffusionForcingConfig = field(default_factory=DiffusionForcingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resampling: ResamplingConfig = field(default_factory=ResamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sfpp: SfppConfig = field(default_factory=SfppConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)

    def __post_init__(self):
        fpb = self.sampling.frames_per_block
        if self.world.frames % fpb:
            raise ValueError(f"world.frames ({self.world.frames}) must be a multiple of "
                             f"sampling.frames_per_block ({fpb})")
        rf = self.dmd.rollout_frames
        if rf and (rf < self.world.frames or rf % fpb):
            raise ValueError(f"dmd.rollout_frames ({self.dmd.rollout_frames}) must be 0 or a multiple of "
                             f"sampling.frames_per_block ({fpb}) and >= world.frames ({self.world.frames})")
        if self.compute.budget_s > 0:  # one equal budget per baseline replaces the stages' own
            for stage, seconds in self.compute.stage_budgets().items():
                object.__setattr__(self, stage, dataclasses.replace(getattr(self, stage), time_budget_s=seconds))
            w, b = self.resampling.warmup_fraction, self.compute.budget_s  # Resampling Forcing: warm-up + stage
            object.__setattr__(self, "resampling", dataclasses.replace(
                self.resampling, warmup_time_budget_s=b * w, time_budget_s=b * (1 - w)))

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, WanConfig) else dataclasses.asdict(v)
        return out

    def summary(self) -> dict:
        """The parts of the config a model card should state."""
        d = self.to_dict()
        return {k: d[k] for k in ("model", "sampling", "world", "models", "teacher", "ode_pairs", "ode_init",
                                  "dmd")}


def _tuple_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}


def _build(cls, table: Mapping[str, Any], name: str):
    if not isinstance(table, Mapping):
        raise ValueError(f"[{name}] must be a table")
    if cls is WanConfig:
        base = WanConfig().to_dict()
        unknown = set(table) - set(base)
        if unknown:
            raise ValueError(f"unknown keys in [model]: {sorted(unknown)}; WanConfig fields are {sorted(base)}")
        return WanConfig.from_dict({**base, **table})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - names
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; allowed: {sorted(names)}")
    tuples = _tuple_fields(cls)
    return cls(**{k: (tuple(v) if k in tuples and v is not None else v) for k, v in table.items()})


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
    kinds = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - set(kinds)
    if unknown:
        raise ValueError(f"unknown tables in the config: {sorted(unknown)}; allowed: {sorted(kinds)}")
    parts = {}
    for name, f in kinds.items():
        cls = f.default_factory().__class__
        parts[name] = _build(cls, d.get(name, {}), name)
    return TrainConfig(**parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'dmd.steps=10' -> (['dmd', 'steps'], 10); the value is read as TOML (strings need quotes or are kept raw)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like table.key=value, e.g. dmd.steps=10")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) != 2:
        raise ValueError(f"override key {key!r} must be table.key, e.g. run.out_dir")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare string such as run.out_dir=/tmp/x
    return path, value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: Mapping | None = None) -> TrainConfig:
    """Read a TOML file (or a dict), apply ``table.key=value`` overrides, and validate."""
    d: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                d = tomllib.load(fh)
        except FileNotFoundError as e:
            raise ValueError(f"config file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
    if data is not None:
        d = _merge(d, data)
    for text in overrides:
        (table, key), value = parse_override(text)
        d.setdefault(table, {})[key] = value
    return from_dict(d)


def _merge(a: Mapping, b: Mapping) -> dict:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = dict(v) if isinstance(v, Mapping) else v
    return out
