"""How public causal Wan 2.1 projects ship their checkpoints, and the attention they were trained with.

Checked against each project's released code and configs (facts only; December 2026 snapshots):

| release (``RELEASES``) | file | layout | trained attention / sampling |
| --- | --- | --- | --- |
| Self Forcing (guandeh17/Self-Forcing) | ``self_forcing_dmd.pt`` | ``{"generator", "generator_ema", ...}``, ``model.`` keys; EMA read | 3 frames per block, one cache for the clip, 4 warped steps |
| LongLive 1.0 (NVlabs/LongLive) | ``longlive_base.pt`` + ``lora.pt`` | base as Self Forcing (or ``{"model"}``), ``generator`` read (``use_ema: false``); LoRA ``{"generator_lora": peft keys}``, rank 256, alpha 256 | 3 frames per block, ``local_attn_size 12``, ``sink_size 3`` |
| Rolling Forcing (TencentARC/RollingForcing) | ``rolling_forcing_dmd.pt`` | as Self Forcing (EMA keys with ``_fsdp_wrapped_module.``) | 3 frames per block, the first block kept as a sink, 21 frames attended (``local_attn_size 21``, ``sink_size 3``), 5 warped steps 1000..200 |
| Causal Forcing (thu-ml/Causal-Forcing) | ``chunkwise/causal_forcing.pt``, ``framewise/causal_forcing.pt``, ``framewise-2step.pt``, ``framewise-1step.pt``, ``chunkwise/longvideo.pt`` | as Self Forcing (``model._fsdp_wrapped_module.`` keys possible); ``generator`` read for chunk-wise (run without ``--use_ema``), EMA for the others | chunk-wise 3 / frame-wise 1 frame per block; 4, 2 or 1 warped steps; ``longvideo.pt`` runs on Rolling Forcing's code (21 frames incl. a 3-frame sink) |
| Krea Realtime 14B (krea-ai/realtime-video) | ``krea-realtime-video-14b.safetensors`` | flat safetensors, ``model.`` keys, Wan 2.1 14B shapes | 3 frames per block, Self Forcing's step list (1000/937/833/625 = 1000/750/500/250 warped) |

None of these files says which project made it (their weights have one architecture), so a release is recognised
by its published file name (``release_for``), and only files without our metadata get a release's settings (a file
we wrote says what it is itself). Their fp8 variants are not separate files: LongLive's and Krea's fp8 are quantised at
run time from the bf16 weights (torchao); fp8 files made for ComfyUI are read as below. What
these projects do beyond one step list and one KV cache is not reproduced by our sampler and is left out of the
defaults: Rolling Forcing's joint denoising of several blocks, Causal Forcing++'s 4-step first chunk, Krea's KV
re-computation of its context frames. LongLive 2.0 is a Wan 2.2 TI2V-5B model (48 latent channels): not a Wan 2.1
causal model, refused (``check_wan21``).

Weight formats handled by ``normalize_weights``: ComfyUI's scaled fp8 (a ``scaled_fp8`` marker and a
``<linear>.scale_weight`` per fp8 weight, ``weight * scale_weight`` in real units; ``scale_input`` is dropped) and
peft's ``base_model.model.`` prefix. LoRA files (``read_lora_state``/``merge_lora``): ComfyUI core's format
(``diffusion_model.<linear>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, what ``training.lora`` writes),
peft's (``[base_model.model.]<linear>.lora_A[.default].weight`` / ``lora_B``, optionally under ``generator_lora``:
LongLive's ``lora.pt``; peft stores no alpha, so alpha = rank, LongLive's own setting, unless given) and diffusers
names (``transformer.blocks.N.attn1.to_q.lora_A.weight``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

LORA_TOP_LEVEL = "generator_lora"
SCALED_FP8_MARKER = "scaled_fp8"
_LORA_SUFFIXES = {  # key suffix -> (role, format)
    ".lora_down.weight": ("down", "ComfyUI"), ".lora_up.weight": ("up", "ComfyUI"),
    ".lora_A.weight": ("down", "peft"), ".lora_B.weight": ("up", "peft"),
    ".lora_A.default.weight": ("down", "peft"), ".lora_B.default.weight": ("up", "peft"),
}
_LORA_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.", "lora_unet_")


@dataclass(frozen=True)
class Release:
    """A public causal Wan release: its name, how its files are named, and the settings it was trained with
    (our checkpoint metadata keys: ``frames_per_block``, ``steps``, ``shift``, ``warp``, ``local_attn_size`` and
    ``sink_size`` in the official meaning, see ``sf_model.window.from_official``)."""

    key: str
    title: str
    names: tuple[str, ...]          # regexes searched in the lower-cased file name (with its parent folder)
    meta: dict = field(default_factory=dict)
    # The training checkpoint's entry the project's own inference reads ('generator_ema' with --use_ema, else
    # 'generator'); None = our default order (EMA first).
    entry: str | None = None


_SF_STEPS = [1000, 750, 500, 250]
RELEASES: tuple[Release, ...] = (
    Release("longlive", "LongLive (NVlabs, Wan 2.1 1.3B)", (r"longlive",),
            {"frames_per_block": 3, "local_attn_size": 12, "sink_size": 3, "steps": _SF_STEPS, "shift": 5.0,
             "warp": True}, entry="generator"),  # configs: use_ema false
    Release("rolling_forcing", "Rolling Forcing (TencentARC)", (r"rolling[_-]?forcing",),
            {"frames_per_block": 3, "local_attn_size": 21, "sink_size": 3, "steps": [1000, 800, 600, 400, 200],
             "shift": 5.0, "warp": True}),
    Release("causal_forcing_1step", "Causal Forcing++ frame-wise 1-step (thu-ml)", (r"framewise[_-]1step",),
            {"frames_per_block": 1, "steps": [1000], "shift": 5.0, "warp": True}),
    Release("causal_forcing_2step", "Causal Forcing++ frame-wise 2-step (thu-ml)", (r"framewise[_-]2step",),
            {"frames_per_block": 1, "steps": [1000, 500], "shift": 5.0, "warp": True}),
    Release("causal_forcing_framewise", "Causal Forcing frame-wise (thu-ml)", (r"framewise.*causal[_-]?forcing",
                                                                                r"causal[_-]?forcing.*framewise"),
            {"frames_per_block": 1, "steps": _SF_STEPS, "shift": 5.0, "warp": True}),
    Release("causal_forcing_longvideo", "Causal Forcing long video (thu-ml, Rolling Forcing's code)",
            (r"chunkwise/longvideo",),
            {"frames_per_block": 3, "local_attn_size": 21, "sink_size": 3, "steps": _SF_STEPS, "shift": 5.0,
             "warp": True}, entry="generator_ema"),
    Release("causal_forcing", "Causal Forcing chunk-wise (thu-ml)", (r"causal[_-]?forcing", r"chunkwise"),
            {"frames_per_block": 3, "steps": _SF_STEPS, "shift": 5.0, "warp": True},
            entry="generator"),  # its README runs the chunk-wise model without --use_ema
    Release("krea_realtime_14b", "Krea Realtime 14B (krea-ai)", (r"krea",),
            {"frames_per_block": 3, "steps": _SF_STEPS, "shift": 5.0, "warp": True}),
    Release("self_forcing", "Self Forcing (guandeh17)", (r"self[_-]?forcing",),
            {"frames_per_block": 3, "steps": _SF_STEPS, "shift": 5.0, "warp": True}),
)
RELEASE_KEYS = tuple(r.key for r in RELEASES)


def release_by_key(key: str) -> Release:
    for r in RELEASES:
        if r.key == key:
            return r
    raise ValueError(f"unknown release {key!r}; choose from {list(RELEASE_KEYS)}")


def release_for(path: str) -> Release | None:
    """The release a file's published name says it is (the file name with its parent folder, lower case; the first
    match of ``RELEASES`` in order, most specific first), or None."""
    path = os.fspath(path).replace("\\", "/")
    name = "/".join(path.split("/")[-2:]).lower()
    for r in RELEASES:
        if any(re.search(rx, name) for rx in r.names):
            return r
    return None


def apply_release(meta: Mapping, release: Release | None) -> dict:
    """``meta`` with the release's trained settings filled in where the file's own metadata is silent (a window
    stored in either meaning, ours or the official one, keeps the release's window and sink out)."""
    out = dict(meta)
    if release is None:
        return out
    stored_window = any(k in meta for k in ("window", "local_attn_size", "sink", "sink_size"))
    for k, v in release.meta.items():
        if k in ("local_attn_size", "sink_size") and stored_window:
            continue
        out.setdefault(k, list(v) if isinstance(v, list) else v)
    out.setdefault("release", release.key)
    return out


# -- weight formats -----------------------------------------------------------------------------
def is_lora_key(key: str) -> bool:
    return any(key.endswith(s) for s in _LORA_SUFFIXES) or key.endswith(".alpha")


def looks_like_lora(sd: Mapping) -> bool:
    """True when every tensor of ``sd`` is a LoRA factor or alpha (a LoRA file, not a model)."""
    keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    return bool(keys) and all(is_lora_key(k) for k in keys)


def dequantize_scaled_fp8(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> tuple[dict, bool]:
    """Fold ComfyUI's scaled fp8 into plain weights: ``w.to(dtype) * scale_weight`` for every ``<x>.scale_weight``,
    the ``scaled_fp8`` marker and ``scale_input`` dropped. (sd, whether the file was scaled fp8)."""
    scales = {k[: -len(".scale_weight")]: v for k, v in sd.items() if k.endswith(".scale_weight")}
    if SCALED_FP8_MARKER not in sd and not scales:
        return dict(sd), False
    out = {}
    for k, v in sd.items():
        if k == SCALED_FP8_MARKER or k.endswith(".scale_weight") or k.endswith(".scale_input"):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and base in scales:
            v = v.to(dtype) * scales[base].to(dtype)
        elif v.is_floating_point() and v.element_size() == 1:
            v = v.to(dtype)  # fp8 without a scale (scale 1)
        out[k] = v
    return out, True


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes) -> tuple[dict, list[str]]:
    """Strip the prefixes most keys carry, repeatedly (``model.base_model.model.blocks...`` -> ``blocks...``):
    a prefix is stripped when more than half of the keys start with it. (sd, prefixes stripped in order)."""
    sd, stripped = dict(sd), []
    for _ in range(4):
        for prefix in prefixes:
            if sum(k.startswith(prefix) for k in sd) >= len(sd) // 2 + 1:
                sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
                stripped.append(prefix)
                break
        else:
            break
    return sd, stripped


# -- LoRA ---------------------------------------------------------------------------------------
@dataclass
class LoraFactors:
    """One adapted linear: delta W = alpha / rank * up @ down (``down`` [rank, in], ``up`` [out, rank])."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def read_lora_state(obj: Mapping, to_wan: Callable[[str], str] = lambda k: k,
                    alpha: float | None = None) -> tuple[dict[str, LoraFactors], str]:
    """{Wan weight name (``blocks.0.self_attn.q.weight``): factors} of a LoRA state dict in any accepted format
    (module docstring) and a description. ``to_wan`` maps diffusers names; ``alpha`` is used where the file stores
    none (peft), default alpha = rank."""
    source = "LoRA"
    if LORA_TOP_LEVEL in obj and isinstance(obj[LORA_TOP_LEVEL], Mapping):
        obj, source = obj[LORA_TOP_LEVEL], f"LoRA ['{LORA_TOP_LEVEL}']"
    parts: dict[str, dict] = {}
    formats = set()
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for suffix, (role, fmt) in _LORA_SUFFIXES.items():
            if k.endswith(suffix):
                parts.setdefault(k[: -len(suffix)], {})[role] = v
                formats.add(fmt)
                break
        else:
            if k.endswith(".alpha"):
                parts.setdefault(k[: -len(".alpha")], {})["alpha"] = float(v.float().reshape(-1)[0])
            else:
                raise ValueError(f"{source}: key {k!r} is not a LoRA factor (lora_down/lora_up, lora_A/lora_B) "
                                 "or alpha")
    if not parts:
        raise ValueError(f"{source}: no LoRA factors found")
    names, stripped = strip_prefixes({m: None for m in parts}, _LORA_PREFIXES)
    renamed = dict(zip(parts, names))
    out = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"{source}: {module!r} has {'no up' if 'down' in p else 'no down'} factor")
        name = renamed[module].replace("_fsdp_wrapped_module.", "")
        out[to_wan(name + ".weight")] = LoraFactors(p["down"], p["up"], p.get("alpha", alpha))
    desc = f"{source}, {'/'.join(sorted(formats))} keys" + (f", prefix {' '.join(repr(s) for s in stripped)}"
                                                            if stripped else "")
    return out, desc


def merge_lora(sd: Mapping[str, torch.Tensor], factors: Mapping[str, LoraFactors], strength: float = 1.0,
               source: str = "LoRA") -> dict[str, torch.Tensor]:
    """``sd`` with every factor merged: W + strength * alpha / rank * up @ down (float32 math, back to W's dtype;
    fp8 weights come back in bfloat16). Strict: a factor for a weight the model lacks, or of the wrong shape,
    raises ValueError naming them all."""
    unknown = sorted(n for n in factors if n not in sd)
    bad = [f"{n}: LoRA up {tuple(f.up.shape)} down {tuple(f.down.shape)} vs weight {tuple(sd[n].shape)}"
           for n, f in factors.items()
           if n in sd and (f.up.dim() != 2 or f.down.dim() != 2 or f.up.shape[1] != f.down.shape[0]
                           or (f.up.shape[0], f.down.shape[1]) != tuple(sd[n].shape))]
    if unknown or bad:
        msg = []
        if unknown:
            msg.append(f"{len(unknown)} LoRA modules the model does not have: {', '.join(unknown[:6])}")
        if bad:
            msg.append(f"{len(bad)} shape conflicts: {'; '.join(bad[:4])}")
        raise ValueError(f"{source} does not fit the model: " + "; ".join(msg))
    out = dict(sd)
    for name, f in factors.items():
        w = out[name]
        alpha = float(f.alpha) if f.alpha is not None else float(f.rank)
        delta = (strength * alpha / f.rank) * (f.up.float() @ f.down.float())
        dtype = w.dtype if w.element_size() > 1 else torch.bfloat16
        out[name] = (w.float() + delta.to(w.device)).to(dtype)
    return out


def comfy_lora_state_dict(factors: Mapping[str, LoraFactors], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Factors ({Wan weight name: LoraFactors}) in ComfyUI core's LoRA key format, which core
    ``LoraLoaderModelOnly`` reads for Wan models: ``diffusion_model.<linear>.lora_down.weight`` / ``lora_up.weight``
    and ``alpha`` (float32 scalar; alpha = rank where neither the factors nor ``alpha`` give one)."""
    out = {}
    for name, f in factors.items():
        key = "diffusion_model." + (name[: -len(".weight")] if name.endswith(".weight") else name)
        a = f.alpha if f.alpha is not None else (alpha if alpha is not None else f.rank)
        out[f"{key}.lora_down.weight"] = f.down.detach().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = f.up.detach().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(a), dtype=torch.float32)
    return out

