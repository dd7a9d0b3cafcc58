"""Which checkpoint plays which role in training: the ``[models]`` table.

Self Forcing uses four models besides the student being trained (``docs/training.md``, "Model roles"):

- ``generator_init``: the causal student's starting weights for DMD -- the ODE-initialised checkpoint (Self
  Forcing's released ``ode_init``, or this run's ``ode_init`` stage output, the default).
- ``real_score``: the frozen bidirectional model whose guided x0 prediction the generator is pulled towards
  (the paper: Wan2.1-T2V-14B). Its architecture is its own (read from the file); only the latent and text
  interface (channels, patch, text width) must match the generator's. Loaded frozen, in bf16 on CUDA.
- ``critic_init``: the fake score's starting weights. The critic is *trained*, so it has the generator's
  architecture (Wan2.1-T2V-1.3B). Default: the real score's file, only when that has the generator's
  architecture -- otherwise an error asks for it (a 14B real score must not become a trainable 14B critic).
  The ``ode_init`` stage and the baselines start their students from these weights too.
- ``ode_teacher``: the bidirectional teacher whose ODE trajectories make the ODE pairs. Default: the critic's
  initialisation (the official recipe makes its pairs with Wan2.1-T2V-1.3B).
- ``vae``: the Wan2.1 VAE, used only by rollouts longer than the loss window (``training.loss_window``).

The toy world keeps its single teacher in every role (``<out_dir>/teacher.safetensors``, or a toy teacher
trained elsewhere named by ``world.teacher_path``). For Wan, ``world.teacher_path`` and
``world.generator_path`` are deprecated aliases: they still work, with a ``FutureWarning``.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from ..sf_model.config import WanConfig, size_name
from .config import TrainConfig

# Fields that make two checkpoints the same architecture (what the weights show; text_len, eps and the RoPE
# settings are not part of the weights).
ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "patch_size", "in_dim", "out_dim", "text_dim",
               "freq_dim", "qk_norm", "cross_attn_norm")
# Fields the real score must share with the generator: it reads the generator's latents and text states.
INTERFACE_FIELDS = ("patch_size", "in_dim", "out_dim", "text_dim")


def same_architecture(a: WanConfig, b: WanConfig, fields=ARCH_FIELDS) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def describe(config: WanConfig) -> str:
    shape = f"dim {config.dim}, {config.num_layers} layers, {config.num_heads} heads"
    name = size_name(config)
    return f"Wan {name} ({shape})" if name in ("1.3B", "14B") else shape


def checkpoint_architecture(path: str) -> WanConfig:
    """The ``WanConfig`` of a checkpoint without reading its tensors when it is safetensors: from our metadata,
    else inferred from the key names and shapes (``sf_model.checkpoint``'s rules, any layout it accepts)."""
    from ..sf_model.checkpoint import (FORMAT_KEY, CheckpointError, is_safetensors, load_state_dict_file,
                                       normalize_state_dict, split_bundle)
    from ..sf_model.config import infer_config

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    if not is_safetensors(path):
        return load_state_dict_file(path)[1]
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError has no stable import path
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    ours = json.loads(meta[FORMAT_KEY]) if FORMAT_KEY in meta else {}
    if isinstance(ours, dict) and "model" in ours:
        return WanConfig.from_dict(ours["model"])
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    fake, _ = split_bundle(fake, ours.get("bundle", []) if isinstance(ours, dict) else [])
    sd, _ = normalize_state_dict(fake)
    try:
        return infer_config(sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


# -- the roles ---------------------------------------------------------------------------------------
def _deprecated(cfg: TrainConfig, key: str, replacement: str) -> str:
    """The value of a deprecated ``[world]`` alias (Wan world), with a warning naming the new key(s)."""
    value = getattr(cfg.world, key)
    if value and cfg.world.kind == "wan":
        warnings.warn(f"world.{key} is deprecated: it stands for {replacement} (the [models] table, see "
                      "docs/training.md 'Model roles'). Set those keys instead; a 14B real score needs "
                      "models.critic_init set to a model of the generator's size (Wan2.1-T2V-1.3B).",
                      FutureWarning, stacklevel=3)
    return value


def real_score_path(cfg: TrainConfig) -> str:
    """The frozen real score: ``models.real_score``; toy: the toy teacher; Wan: the deprecated alias
    ``world.teacher_path``, else an error."""
    if cfg.models.real_score:
        return cfg.models.real_score
    if cfg.world.kind == "toy":
        if cfg.world.teacher_path:  # a toy teacher shared by several runs (seeds)
            return cfg.world.teacher_path
        from .teacher import teacher_path

        return teacher_path(cfg)
    alias = _deprecated(cfg, "teacher_path", "models.real_score, models.critic_init and models.ode_teacher")
    if alias:
        return alias
    raise ValueError("set models.real_score to the released bidirectional Wan2.1 T2V weights (the real score; "
                     "the paper uses Wan2.1-T2V-14B) and models.critic_init to Wan2.1-T2V-1.3B")


def critic_init_path(cfg: TrainConfig) -> str:
    """The critic's (fake score's) starting weights: ``models.critic_init``, else the real score's file when it
    has the generator's architecture (``[model]``); else a ValueError that asks for it."""
    if cfg.models.critic_init:
        return cfg.models.critic_init
    real = real_score_path(cfg)
    if not os.path.isfile(real):
        raise ValueError(f"{real} does not exist; run the 'teacher' stage first or set models.real_score "
                         "(models.critic_init defaults to it)")
    arch = checkpoint_architecture(real)
    if not same_architecture(arch, cfg.model):
        raise ValueError(
            f"models.critic_init is not set, and the real score {real} ({describe(arch)}) does not have the "
            f"generator's architecture ([model]: {describe(cfg.model)}). The critic is trained: it starts from "
            "bidirectional weights of the generator's architecture, not from a copy of the real score. Set "
            "models.critic_init, e.g. to Wan2.1-T2V-1.3B (wan2.1_t2v_1.3B_bf16.safetensors).")
    return real


def student_init_path(cfg: TrainConfig) -> str:
    """Where the ode_init stage (and the baselines) start the causal student: the critic's initialisation,
    the bidirectional weights of the generator's architecture (checked from the file's header)."""
    path = critic_init_path(cfg)
    if os.path.isfile(path):
        arch = checkpoint_architecture(path)
        if not same_architecture(arch, cfg.model):
            raise ValueError(f"the causal student would start from {path} ({describe(arch)}), but [model] (the "
                             f"generator's architecture) is {describe(cfg.model)}: set models.critic_init to "
                             "bidirectional weights of the generator's architecture, e.g. Wan2.1-T2V-1.3B")
    return path


def ode_teacher_path(cfg: TrainConfig) -> str:
    """The ODE-pair teacher: ``models.ode_teacher``, else the critic's initialisation (Wan2.1-T2V-1.3B in the
    official recipe; the toy teacher for the toy world)."""
    return cfg.models.ode_teacher or critic_init_path(cfg)


def generator_init_path(cfg: TrainConfig) -> str:
    """The DMD generator's start: ``models.generator_init``, the deprecated ``world.generator_path``, else this
    run's ode_init output."""
    if cfg.models.generator_init:
        return cfg.models.generator_init
    alias = cfg.world.generator_path
    if alias:
        _deprecated(cfg, "generator_path", "models.generator_init")
        return alias
    return os.path.join(cfg.run.out_dir, "ode_init.safetensors")  # the ode_init stage's output (ode_init_path)


# -- loading ---------------------------------------------------------------------------------------
def frozen_dtype(device: torch.device) -> torch.dtype:
    """A frozen model's parameter dtype: bf16 on CUDA (never fp32: a 14B real score is 28 GB, not 56),
    float32 on the CPU (tests; CPU bf16 is slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_frozen(path: str, device: torch.device):
    """A frozen bidirectional model (real score, ODE teacher): eval, no gradient, ``frozen_dtype(device)``,
    allocated in that dtype from the start (``models.load_dit``). Its architecture is the file's own."""
    from .models import load_dit

    model, _ = load_dit(path, torch.device(device), dtype=frozen_dtype(device))
    return model.eval().requires_grad_(False)


def check_generator_architecture(model, cfg: TrainConfig, role: str, path: str = "") -> None:
    """A trained model (generator, critic) must have ``[model]``'s architecture."""
    if not same_architecture(model.config, cfg.model):
        where = f" ({path})" if path else ""
        raise ValueError(f"the {role}{where} is {describe(model.config)}, but [model] (the generator's "
                         f"architecture) is {describe(cfg.model)}; the {role} must have the generator's "
                         "architecture" + (" -- set models.critic_init to such weights, e.g. Wan2.1-T2V-1.3B"
                                           if role == "critic" else ""))


def check_real_score(model, cfg: TrainConfig, path: str = "") -> None:
    """The real score may be any size, but it must read the generator's latents and text states."""
    bad = [f for f in INTERFACE_FIELDS if getattr(model.config, f) != getattr(cfg.model, f)]
    if bad:
        where = f" ({path})" if path else ""
        raise ValueError(f"the real score{where} does not read the generator's latents/text: "
                         + ", ".join(f"{f} {getattr(model.config, f)} != {getattr(cfg.model, f)}" for f in bad))
