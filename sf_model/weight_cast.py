"""Weights stored in float8 or on another device, cast/moved one linear layer at a time (as ComfyUI's "manual
cast" and its partial loading).

A Wan 2.1 14B model stored in ``float8_e4m3fn`` takes about 14 GB; upcasting it to bf16 for a run would need a
second 28 GB copy. Instead, ``cast_linears(model, dtype, scales)`` turns every ``nn.Linear`` of a model whose
weight is float8 into a ``CastLinear``: its weight and bias stay float8 in memory and are cast to ``dtype`` at
the moment the layer runs (``weight.to(dtype) * scale.to(dtype)`` for ComfyUI's scaled fp8, whose per-layer
``scale_weight`` gives the weight in real units), so only one layer's weight exists in ``dtype`` at a time.
Linear layers are nearly all of a Wan model's weights; the few other parameters (patch embedding, norms,
modulation) are small and are expected in ``dtype`` already.

With ``device`` (``cast_linears(model, dtype, scales, device)``) a linear layer whose weight is *not* on
``device`` is wrapped too, whatever its dtype: its weight stays where it is (e.g. the CPU, where ComfyUI's
partial loading left it) and is moved to the input's device (and cast) each time the layer runs, one layer's
weight at a time (``weight.to(device, dtype, non_blocking=True)``: one transient per layer).

Everything in ``sf_model.model`` that reads a linear layer's weight directly goes through ``linear_weight`` /
``linear_dtype`` (the weight as a plain model in ``dtype`` would hold it, and that dtype); for a plain
``nn.Linear`` they return ``layer.weight`` and its dtype, so the default path is unchanged. The fused QKV of
``CausalWanModel.fuse_qkv`` (and so the fused inference trunk of ``sf_model.speed``, which reads weights
directly) is refused for a model with cast layers, float8 or streamed (``check_not_cast``). ``uncast_linears``
undoes it all.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                          "float8_e5m2fnuz") if hasattr(torch, name))
SCALE_WEIGHT = "scale_weight"   # ComfyUI's scaled fp8: <linear>.scale_weight, weight * scale in real units
SCALE_INPUT = "scale_input"     # only used by fp8 matrix multiplication in ComfyUI; not needed to cast


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8_DTYPES


class CastLinear(nn.Linear):
    """An ``nn.Linear`` whose weight (and bias) are cast to ``compute_dtype`` - and moved to the input's device,
    or ``compute_device`` where no input is given - when it runs, the weight multiplied by ``weight_scale`` (a
    scalar tensor, or None for scale 1). For float8 weights and for weights kept on another device. Made by
    ``cast_linears`` (class swap of an existing layer: same parameters, same state-dict names), never
    constructed directly."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor | None
    compute_device: torch.device | None = None  # None: the weight's own device

    def cast_weight(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        dtype, device = dtype or self.compute_dtype, device or self.compute_device or self.weight.device
        w = self.weight.to(device=device, dtype=dtype, non_blocking=_async(device))
        if self.weight_scale is None:
            return w
        scale = self.weight_scale.to(device=device, dtype=dtype)
        return w.mul_(scale) if w is not self.weight else w * scale  # scaled in place: one transient, not two

    def cast_bias(self, dtype: torch.dtype | None = None, device: torch.device | None = None
                  ) -> torch.Tensor | None:
        if self.bias is None:
            return None
        device = device or self.compute_device or self.bias.device
        return self.bias.to(device=device, dtype=dtype or self.compute_dtype, non_blocking=_async(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.cast_weight(x.dtype, x.device), self.cast_bias(x.dtype, x.device))


def _async(device: torch.device) -> bool:
    """Copies to an accelerator are queued (non_blocking: its stream orders them before the layer's matmul); a
    copy to the CPU is not (the CPU would read it before it arrived)."""
    return torch.device(device).type != "cpu"


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` ('cuda' without an index matches any CUDA tensor's current device)."""
    device = torch.device(device)
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def linear_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight in its compute dtype (a transient cast for a ``CastLinear``, else the weight)."""
    return layer.cast_weight() if isinstance(layer, CastLinear) else layer.weight


def linear_bias(layer: nn.Linear) -> torch.Tensor | None:
    return layer.cast_bias() if isinstance(layer, CastLinear) else layer.bias


def linear_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype the layer computes in (its inputs' dtype)."""
    return layer.compute_dtype if isinstance(layer, CastLinear) else layer.weight.dtype


def split_scales(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, scales): ComfyUI's scaled-fp8 entries taken out of a state dict. ``scales`` maps a layer's name
    (``blocks.0.ffn.0``) to its ``scale_weight``; ``scale_input`` entries are dropped."""
    weights, scales = {}, {}
    for key, value in sd.items():
        base, _, leaf = key.rpartition(".")
        if leaf == SCALE_WEIGHT:
            scales[base] = value
        elif leaf != SCALE_INPUT:
            weights[key] = value
    return weights, scales


def linear_param_names(model: nn.Module) -> set[str]:
    """State-dict names of the weights and biases of ``model``'s linear layers."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, nn.Linear)
            for name, _ in module.named_parameters(recurse=False)}


def castable(model: nn.Module, sd: dict[str, torch.Tensor]) -> set[str]:
    """Names in ``sd`` of the float8 weights/biases of ``model``'s linear layers: what ``cast_linears`` keeps
    as float8 (a layer counts when its weight is float8)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = sd.get(f"{prefix}.weight")
            if weight is not None and is_float8(weight.dtype):
                names.add(f"{prefix}.weight")
                if f"{prefix}.bias" in sd:
                    names.add(f"{prefix}.bias")
    return names


def cast_linears(model: nn.Module, dtype: torch.dtype, scales: dict[str, torch.Tensor] | None = None,
                 device: torch.device | None = None) -> int:
    """Make every linear layer of ``model`` with a float8 weight - and, with ``device``, every linear layer whose
    weight is not on ``device`` (streamed to it per call) - a ``CastLinear`` computing in ``dtype`` (on
    ``device`` where no input says otherwise), with its ``scales`` entry (by layer name) as weight scale. A scale
    for any layer whose weight is not float8 is refused (ValueError). Returns the number of cast layers."""
    scales = dict(scales or {})
    device = torch.device(device) if device is not None else None
    count = 0
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        fp8 = is_float8(module.weight.dtype)
        if fp8 or (device is not None and not on_device(module.weight, device)):
            module.__class__ = CastLinear
            module.compute_dtype = dtype
            module.weight_scale = scales.pop(prefix, None) if fp8 else None
            if device is not None:
                module.compute_device = device
            count += 1
    if scales:
        raise ValueError(f"weight scales for layers whose weights are not float8 linear weights: "
                         f"{', '.join(sorted(scales)[:4])}")
    return count


def streamed_layers(model: nn.Module, device: torch.device) -> int:
    """How many linear layers of ``model`` keep their weight off ``device`` (moved to it per call)."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear) and not on_device(m.weight, device))


def uncast_linears(model: nn.Module) -> None:
    """Undo ``cast_linears``: plain ``nn.Linear`` layers again, scale references dropped."""
    for module in model.modules():
        if isinstance(module, CastLinear):
            del module.compute_dtype, module.weight_scale
            module.__dict__.pop("compute_device", None)
            module.__class__ = nn.Linear


def has_cast_layers(model: nn.Module) -> bool:
    return any(isinstance(m, CastLinear) for m in model.modules())


def check_not_cast(model: nn.Module, what: str) -> None:
    """Refuse ``what`` (something that reads linear weights directly) on a model with cast layers (float8, or
    weights streamed from another device)."""
    if has_cast_layers(model):
        raise ValueError(f"{what} reads the linear weights directly and does not support weights stored in "
                         "float8 or streamed from another device (cast per layer at run time); run this model "
                         "without it, or store it in bf16 on one device")


def parameter_kinds(model: nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of the model's parameters, cast layers counted in their compute dtype (and compute device,
    where they have one)."""
    kinds = set()
    for module in model.modules():
        cast = isinstance(module, CastLinear)
        dtype = module.compute_dtype if cast else None
        device = module.compute_device if cast else None
        for p in module.parameters(recurse=False):
            kinds.add((device or p.device, dtype or p.dtype))
    return kinds


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and weight scales as they are stored."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        scale = getattr(module, "weight_scale", None) if isinstance(module, CastLinear) else None
        if scale is not None:
            tensors[id(scale)] = scale
    return sum(t.numel() * t.element_size() for t in tensors.values())
