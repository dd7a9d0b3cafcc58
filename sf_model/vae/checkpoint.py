"""Loading and saving Wan2.1 VAE weights.

Accepted files (detected from their content, not their extension):
- ``.safetensors`` with the original Wan key names (ComfyUI's ``wan_2.1_vae.safetensors``) or
  with diffusers ``AutoencoderKLWan`` key names;
- pickled PyTorch files (``Wan2.1_VAE.pth``), always read with ``torch.load(weights_only=True)``:
  a pickle that would construct arbitrary objects (and could run code) is refused.

The architecture is inferred from the tensor shapes, so reduced test sizes load too. Loading is
strict: every mismatch is reported in one ``VAECheckpointError`` (a ``ValueError``).
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from safetensors.torch import save_file as _st_save_file

from ..checkpoint import CheckpointError, CheckpointNotFound, check_finite, mismatch_report, publish, read_file
from ..checkpoint import short_list as _short
from .model import WanVAE, WanVAEConfig

StateDict = Dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "model", "module", "vae")
_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")


class VAECheckpointError(CheckpointError):
    """A file that is not a loadable Wan2.1 VAE checkpoint (corrupt, unsafe, or mismatched)."""


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a flat ``{name: tensor}`` dict (CPU) through the package's one file reader."""
    try:
        obj, _ = read_file(path)
    except CheckpointNotFound:
        raise
    except CheckpointError as e:
        raise VAECheckpointError(str(e)) from e
    sd = _flatten_checkpoint(obj, os.fspath(path))
    check_finite(sd, os.fspath(path), VAECheckpointError)
    return sd


def _flatten_checkpoint(obj, path: str) -> StateDict:
    if isinstance(obj, Mapping) and any(k in obj for k in ("generator_ema", "generator", "critic")):
        raise VAECheckpointError(f"{path} is a Self Forcing training checkpoint (generator weights), not a "
                                 "Wan2.1 VAE; pass the VAE file (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)")
    for _ in range(3):  # unwrap {"state_dict": {...}} style containers
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
            if len(inner) == 1:
                obj = obj[inner[0]]
                continue
        break
    if not isinstance(obj, Mapping):
        raise VAECheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise VAECheckpointError(f"{path}: {len(bad)} entries are not named tensors: {_short(bad)}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# key layouts
# ---------------------------------------------------------------------------------------------
# Sub-keys of a residual block: original Wan name <-> diffusers name.
_RES_W2D = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_RES_D2W = {v: k for k, v in _RES_W2D.items()}
_TOP_D2W = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
_SIDE_D2W = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}


def _swap_prefix(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    return any(
        k.startswith(("quant_conv.", "post_quant_conv.", "encoder.down_blocks.", "decoder.up_blocks."))
        or ".mid_block." in k
        for k in keys
    )


def diffusers_to_wan(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename diffusers ``AutoencoderKLWan`` keys to the original Wan names (unknown keys kept)."""
    res_ids = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    per_block = max(res_ids) + 2 if res_ids else 0  # resnets (nrb+1) + one upsampler
    out: StateDict = {}
    for key, value in sd.items():
        out[_diffusers_key_to_wan(key, per_block)] = value
    return out


def _diffusers_key_to_wan(key: str, per_block: int) -> str:
    top = _swap_prefix(key, _TOP_D2W)
    if top != key:
        return top
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest):
        kind, i, sub = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"{side}.middle.{2 * i + 1}.{sub}"
        return f"{side}.middle.{2 * i}.{_swap_prefix(sub, _RES_D2W)}"
    if m := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        return f"{side}.downsamples.{m.group(1)}.{_swap_prefix(m.group(2), _RES_D2W)}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        idx = int(m.group(1)) * per_block + int(m.group(2))
        return f"{side}.upsamples.{idx}.{_swap_prefix(m.group(3), _RES_D2W)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        idx = int(m.group(1)) * per_block + per_block - 1
        return f"{side}.upsamples.{idx}.{m.group(2)}"
    return f"{side}.{_swap_prefix(rest, _SIDE_D2W)}"


def wan_to_diffusers(sd: Mapping[str, torch.Tensor], config: WanVAEConfig) -> StateDict:
    """Rename original Wan keys to diffusers ``AutoencoderKLWan`` names."""
    per_block = config.num_res_blocks + 2
    top_w2d = {v: k for k, v in _TOP_D2W.items()}
    side_w2d = {v: k for k, v in _SIDE_D2W.items()}
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        if key.startswith(tuple(top_w2d)):
            new = _swap_prefix(key, top_w2d)
        else:
            side, _, rest = key.partition(".")
            if m := re.match(r"middle\.(\d+)\.(.*)", rest):
                i, sub = int(m.group(1)), m.group(2)
                if i % 2:
                    new = f"{side}.mid_block.attentions.{i // 2}.{sub}"
                else:
                    new = f"{side}.mid_block.resnets.{i // 2}.{_swap_prefix(sub, _RES_W2D)}"
            elif m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
                new = f"{side}.down_blocks.{m.group(1)}.{_swap_prefix(m.group(2), _RES_W2D)}"
            elif m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
                block, j = divmod(int(m.group(1)), per_block)
                if j == per_block - 1:
                    new = f"{side}.up_blocks.{block}.upsamplers.0.{m.group(2)}"
                else:
                    new = f"{side}.up_blocks.{block}.resnets.{j}.{_swap_prefix(m.group(2), _RES_W2D)}"
            elif side in ("encoder", "decoder"):
                new = f"{side}.{_swap_prefix(rest, side_w2d)}"
        out[new] = value
    return out


def _strip_prefix(sd: StateDict) -> StateDict:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def to_wan_layout(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Any supported layout -> original Wan key names."""
    sd = _strip_prefix(dict(sd))
    return diffusers_to_wan(sd) if is_diffusers_layout(sd) else sd


# ---------------------------------------------------------------------------------------------
# config inference and strict loading
# ---------------------------------------------------------------------------------------------
def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
    """Architecture from tensor shapes of a state dict with original Wan key names."""
    first = sd.get("encoder.conv1.weight")
    if first is None or "conv2.weight" not in sd:
        hint = ""
        if any(".self_attn." in k or k.startswith(("blocks.", "model.diffusion_model.")) for k in sd):
            hint = " It looks like a diffusion-model (DiT) checkpoint, not a VAE."
        raise VAECheckpointError(
            "not a Wan2.1 VAE checkpoint: 'encoder.conv1.weight' / 'conv2.weight' not found "
            f"({len(sd)} keys, e.g. {_short(sorted(sd), 5)}).{hint}"
        )
    if first.dim() != 5 or first.shape[1] != 3:
        raise VAECheckpointError(
            f"encoder.conv1.weight has shape {tuple(first.shape)}; a Wan2.1 VAE expects [dim, 3, 3, 3, 3] "
            "(a Wan2.2 VAE takes 12 input channels and is not supported)"
        )
    dim = int(first.shape[0])
    z_dim = int(sd["conv2.weight"].shape[0])
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    levels: List[List[int]] = [[]]  # output channels of the res blocks of each level
    temporal: List[bool] = []
    for i in ids:
        p = f"encoder.downsamples.{i}."
        if p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            levels.append([])
        elif p + "residual.2.weight" in sd:
            levels[-1].append(int(sd[p + "residual.2.weight"].shape[0]))
        else:
            raise VAECheckpointError(f"cannot tell what encoder.downsamples.{i} is (no residual or resample weights)")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts or any(len(set(level)) != 1 for level in levels):
        raise VAECheckpointError(f"irregular encoder layout (residual block channels per level: {levels})")
    mults = []
    for level in levels:
        if level[0] % dim:
            raise VAECheckpointError(f"encoder channels {level[0]} are not a multiple of the base dim {dim}")
        mults.append(level[0] // dim)
    try:
        return WanVAEConfig(
            dim=dim, z_dim=z_dim, dim_mult=tuple(mults), num_res_blocks=counts.pop(), temporal_downsample=tuple(temporal)
        )
    except ValueError as e:
        raise VAECheckpointError(f"inconsistent VAE weights: {e}") from e


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise one VAECheckpointError listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = mismatch_report(expected, sd)
    bad_dtype = sorted(k for k, v in sd.items() if k in expected and not v.is_floating_point())
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} non-floating-point tensors: {_short(bad_dtype)}")
    if problems:
        raise VAECheckpointError(
            "checkpoint does not match the Wan2.1 VAE architecture inferred from it ("
            f"{len(sd)} keys in file, {len(expected)} expected): " + "; ".join(problems)
        )


def vae_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Optional[WanVAEConfig] = None,
) -> WanVAE:
    """Build a WanVAE from a state dict in any supported layout (strict)."""
    sd = to_wan_layout(sd)
    config = config or infer_vae_config(sd)
    with torch.device("meta"):
        vae = WanVAE(config)
    check_state_dict(vae, sd)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def load_vae(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAE:
    """Load a Wan2.1 VAE (.safetensors or .pth; Wan, ComfyUI or diffusers key names).

    Returns the model in eval mode with gradients disabled, on ``device`` in ``dtype``.
    Raises VAECheckpointError for corrupt, unsafe or mismatched files.
    """
    sd = read_state_dict(path)
    try:
        return vae_from_state_dict(sd, device=device, dtype=dtype)
    except VAECheckpointError as e:
        raise VAECheckpointError(f"{os.fspath(path)}: {e}") from e


def save_vae(path: str | os.PathLike, vae: WanVAE, layout: str = "wan") -> None:
    """Save weights to safetensors with original Wan names (``layout='wan'``, loads in ComfyUI)
    or diffusers ``AutoencoderKLWan`` names (``layout='diffusers'``)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    if layout == "diffusers":
        sd = wan_to_diffusers(sd, vae.config)
    elif layout != "wan":
        raise ValueError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
    tmp = os.fspath(path) + ".tmp"
    _st_save_file(sd, tmp, metadata={"format": "pt", "layout": layout})
    publish(tmp, os.fspath(path))
