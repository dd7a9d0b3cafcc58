"""LoRA on the generator: low-rank adapters (``peft``) on the linears of every transformer block.

``apply_lora(model, cfg.lora, seed)`` wraps the configured linears of each ``blocks.N`` (self-attention
q/k/v/o, cross-attention q/k/v/o, FFN ``ffn.0``/``ffn.2``) in ``peft`` LoRA layers, W x + s B A x with
s = alpha / rank, A [rank, in] drawn from ``seed`` (the same on every process, nothing to broadcast) and
B [out, rank] zero, so the wrapped model starts exactly equal to the base. Only A and B require gradient;
the optimiser (``engine.Trainable``) trains what requires gradient.

Outputs:

* ``merge_lora(model)``: W <- W + s B A in place and the LoRA layers replaced by their plain linears, so the
  model saves as today's bare Wan keys (``save_dit``) and can be fused/compiled for inference.
* ``comfy_lora_state_dict(model)`` / ``save_lora(path, model)``: the adapters in the key format ComfyUI's
  core LoRA loader reads for Wan models (``LoraLoaderModelOnly``):
  ``diffusion_model.blocks.N.<linear>.lora_down.weight`` (A), ``...lora_up.weight`` (B) and ``...alpha``
  (a scalar; core scales by alpha / rank, the rank read from ``lora_down``). ComfyUI maps the key
  ``diffusion_model.X`` to the weight ``diffusion_model.X.weight`` of any model (``model_lora_keys_unet``,
  ComfyUI a125cd8), and its Wan model names the block linears as the Wan checkpoints (and we) do.

A model with LoRA layers must not be fused for inference (``fuse_qkv`` and the FFN epilogue read the base
weights only): ``apply_lora`` refuses a fused model; merge first, then fuse. ``peft`` is optional: it is
imported only here (``pip install 'self-forcing-stream[train]'``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from .config import LORA_TARGETS, LoraConfig

ADAPTER = "default"           # the one adapter name we use
COMFY_PREFIX = "diffusion_model."
LORA_FORMAT_KEY = "self_forcing_lora"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ValueError("LoRA training needs peft: pip install 'self-forcing-stream[train]' (or pip install peft)") \
            from e
    return peft


def target_names(model: nn.Module, targets=LORA_TARGETS) -> list[str]:
    """Full names of the block linears LoRA adapts: ``blocks.N.<target>`` for every block and target."""
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; choose from {list(LORA_TARGETS)}")
    names = []
    for i, _ in enumerate(model.blocks):
        for t in targets:
            name = f"blocks.{i}.{t}"
            if not isinstance(model.get_submodule(name), nn.Linear):
                raise ValueError(f"{name} is not a plain nn.Linear (LoRA already applied?)")
            names.append(name)
    return names


def _check_unfused(model: nn.Module) -> None:
    for i, blk in enumerate(model.blocks):
        if getattr(blk.self_attn, "fused", None) is not None or getattr(blk, "ffn_first", None) is not None:
            raise ValueError(f"block {i} is fused for inference (fuse_qkv / FFN epilogue), which bypasses LoRA "
                             "layers: apply LoRA to an unfused training model, merge, then fuse")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer} of a model ``apply_lora`` adapted (empty for a plain model)."""
    peft = _peft()
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def apply_lora(model: nn.Module, lc: LoraConfig, seed: int = 0) -> nn.Module:
    """Wrap the ``lc.targets`` linears of every block in LoRA layers (in place; returns ``model``).

    Afterwards only the LoRA A/B matrices require gradient; the forward equals the base model's (B = 0).
    ``seed`` draws A (Kaiming-uniform, bound 1/sqrt(in), as peft's default) on the CPU, so every process of
    a distributed run starts from the same adapters without a broadcast.
    """
    peft = _peft()
    _check_unfused(model)
    names = target_names(model, lc.targets)
    config = peft.LoraConfig(r=int(lc.rank), lora_alpha=float(lc.alpha), lora_dropout=float(lc.dropout),
                             target_modules=names, bias="none", init_lora_weights=True)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            a = layer.lora_A[ADAPTER].weight
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_((torch.rand(a.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
            layer.lora_B[ADAPTER].weight.zero_()
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LoraWeights:
    """One adapted linear: ``down`` = A [rank, in], ``up`` = B [out, rank], delta W = alpha / rank * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


def lora_weights(model: nn.Module) -> dict[str, LoraWeights]:
    """{module name (``blocks.N.self_attn.q``): its A, B and alpha}, detached. ``alpha`` is peft's scale times
    the rank, so alpha / rank is exactly the scale the model trained with."""
    out = {}
    for name, layer in lora_layers(model).items():
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        out[name] = LoraWeights(down, up, float(layer.scaling[ADAPTER]) * down.shape[0])
    if not out:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + alpha/rank * B A, in the weight's dtype) and put the plain
    linear back in its place: in place, returns ``model`` with the keys of a model that never had LoRA."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    for name, layer in layers.items():
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if "peft_config" in vars(model):
        del model.peft_config
    model.requires_grad_(False)
    return model


def comfy_key(name: str) -> str:
    """The LoRA key ComfyUI maps to our linear ``name``: ``diffusion_model.<name>`` (its weight:
    ``diffusion_model.<name>.weight``)."""
    return COMFY_PREFIX + name


def comfy_lora_state_dict(model_or_weights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI's core LoRA loader reads them: ``<key>.lora_down.weight`` (A),
    ``<key>.lora_up.weight`` (B) and ``<key>.alpha`` (float32 scalar) per adapted linear, on the CPU."""
    weights = model_or_weights if isinstance(model_or_weights, Mapping) else lora_weights(model_or_weights)
    cast = lambda t: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous().clone()  # noqa: E731
    sd = {}
    for name, w in weights.items():
        key = comfy_key(name)
        sd[f"{key}.lora_down.weight"] = cast(w.down)
        sd[f"{key}.lora_up.weight"] = cast(w.up)
        sd[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return sd


def save_lora(path: str, model_or_weights, meta: Mapping | None = None, dtype: torch.dtype | None = None) -> str:
    """Write the ComfyUI LoRA file (atomic: temporary file, then rename); ``meta`` (JSON) goes into the
    safetensors metadata under ``self_forcing_lora`` with the rank, alpha and adapted modules."""
    from safetensors.torch import save_file

    from ..sf_model.checkpoint import publish

    weights = model_or_weights if isinstance(model_or_weights, Mapping) else lora_weights(model_or_weights)
    sd = comfy_lora_state_dict(weights, dtype)
    first = next(iter(weights.values()))
    info = {"rank": first.rank, "alpha": first.alpha, "modules": len(weights),
            "targets": sorted({n.split(".", 2)[2] for n in weights}), "format": "comfyui", **dict(meta or {})}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={LORA_FORMAT_KEY: json.dumps(info, sort_keys=True)})
    publish(tmp, path)
    return path


def read_lora(path: str) -> tuple[dict[str, LoraWeights], dict]:
    """Read a file ``save_lora`` wrote: ({module name: LoraWeights}, metadata)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(LORA_FORMAT_KEY, "{}"))
        keys = list(fh.keys())
        sd = {k: fh.get_tensor(k) for k in keys}
    out = {}
    for k in keys:
        if k.endswith(".lora_down.weight"):
            key = k[: -len(".lora_down.weight")]
            if not key.startswith(COMFY_PREFIX):
                raise ValueError(f"{path}: LoRA key {key!r} does not start with {COMFY_PREFIX!r}")
            out[key[len(COMFY_PREFIX):]] = LoraWeights(sd[k], sd[f"{key}.lora_up.weight"], float(sd[f"{key}.alpha"]))
    return out, meta


def lora_path(cfg) -> str:
    """Where the DMD stage writes the generator's adapters (next to its merged ``self_forcing.safetensors``)."""
    return os.path.join(cfg.run.out_dir, "self_forcing_lora.safetensors")


def save_and_merge(model: nn.Module, lora_path: str, meta: Mapping | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """The end of a LoRA stage: write the adapters to ``lora_path`` and return the model merged (in place)."""
    save_lora(lora_path, model, meta, dtype)
    return merge_lora(model)
