"""Checkpoint I/O for the causal Wan DiT: one loader for every layout, one saver.

Accepted files: ``.safetensors`` and ``.pt``/``.pth``/``.ckpt`` (always ``torch.load(weights_only=True)``:
a pickle that would run code is refused). Accepted layouts:

- official Self Forcing / CausVid training checkpoints: ``{"generator_ema": ..., "generator": ...,
  "critic": ...}`` (EMA preferred) or a bare dict, keys prefixed ``model.``;
- FSDP / activation-checkpointing / torch.compile wrappers: ``_fsdp_wrapped_module.``,
  ``_checkpoint_wrapped_module.``, ``_orig_mod.`` anywhere in a key;
- Wan / ComfyUI-native bare keys (also under ``model.diffusion_model.``);
- diffusers ``WanTransformer3DModel`` names;
- peft's ``base_model.model.`` prefix (stripped with the others, repeatedly: ``model.base_model.model.``);
- ComfyUI scaled fp8 (``scaled_fp8`` + ``scale_weight``, folded into bfloat16 weights) and plain fp8 weights;
- the public causal releases of ``sf_model.layouts`` (Self Forcing, LongLive, Rolling Forcing, Causal Forcing,
  Krea Realtime 14B): recognised by their published file names, their trained attention and sampling settings
  filled into the metadata where the file says nothing; a separately shipped LoRA (LongLive's ``lora.pt``, or any
  ComfyUI/peft/diffusers LoRA) merged at load with ``lora=``.

A LoRA file given as the model is refused with a message saying to give it as the LoRA; ``convert_lora`` rewrites
any accepted LoRA in ComfyUI core's key format (for core ``LoraLoaderModelOnly``). ``inspect_checkpoint``
reads only a safetensors header (config, layout, metadata; no weights), e.g. to recognise a 14B before loading.

Loading is strict: any mismatch raises one ``CheckpointError`` naming missing and unexpected keys and
shape conflicts. ``save_model`` writes safetensors with bare Wan keys, our config and sampling defaults
in the metadata, and ``{"transformer": {"causal_ar": true}}`` under ``config`` (what ComfyUI core reads to
build a causal Wan).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .config import WanConfig, check_field, infer_config
from .layouts import (LORA_TOP_LEVEL, apply_release, comfy_lora_state_dict, dequantize_scaled_fp8, looks_like_lora,
                      merge_lora, read_lora_state, release_by_key, release_for, strip_prefixes)
from .weight_cast import cast_linears, is_float8, linear_param_names

FORMAT_KEY = "self_forcing"
FORMAT_VERSION = 1
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
TOP_LEVEL_CHOICES = ("generator_ema", "generator", "model", "state_dict", "module")
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "model.")
LORA_ONLY = ("is a LoRA (low-rank adapter), not a model: load the base model it was trained on and give this file "
             "as its LoRA")
# Sampling defaults a checkpoint may store, checked by the config's rule (sf_model.config.check_field);
# ``model`` (the WanConfig) is checked by WanConfig.from_dict, ``steps`` and ``context_noise`` by StreamOptions.
META_FIELDS = {
    "frames_per_block": ("int", 1, 1 << 10),
    "train_frames": ("int", 1, 1 << 16),
    "sink": ("int", 0, 1 << 16),
    "shift": ("float", 0.0, 1e6),
    "warp": ("bool", None, None),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    config: WanConfig
    layout: str
    meta: dict = field(default_factory=dict)
    # Bundled parts of self-contained models (e.g. the toy world's text encoder and codec):
    # {name: state dict}, declared in the metadata under "bundle".
    extras: dict = field(default_factory=dict)


# -- reading files ------------------------------------------------------------------------------
class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The file does not exist."""


def is_safetensors(path: str) -> bool:
    """Detect safetensors by content (8-byte header length, then a JSON object), not by extension."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_file(path: str) -> tuple[dict, dict]:
    """Tensors and string metadata of a checkpoint file (nested dicts are kept as they are).

    The one file reader of the package (the DiT and the VAE loaders both use it): safetensors, or a
    PyTorch pickle read with ``weights_only=True`` -- a pickle that would build other objects (and could
    run code) is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (an interrupted download?)")
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError has no stable import path across versions
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return tensors, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).lower()
        if "weights only load failed" in msg or "unsupported global" in msg:
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects that are not plain tensors and could "
                f"run code when unpickled (torch.load weights_only=True rejected it: {str(e).splitlines()[0]}). "
                "Use a .safetensors file, or convert this one in a trusted environment.") from e
        raise CheckpointError(f"{path} could not be read: truncated or corrupt pickle ({e})") from e
    except Exception as e:  # zip and pickle readers raise many types for garbage input
        raise CheckpointError(f"{path} could not be read as safetensors or a PyTorch checkpoint "
                              f"(truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj, {}


# -- layouts ----------------------------------------------------------------------------------
def _pairs() -> list[tuple[str, str]]:
    """(Wan name, diffusers name) templates; {n} is a block index, {p} the parameter leaf."""
    pairs = [
        ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
        ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
        ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
        ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
        ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
        ("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),  # Wan's cross-attn norm is diffusers' norm2
        ("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
        ("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
        ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
        ("head.head.{p}", "proj_out.{p}"),
        ("head.modulation", "scale_shift_table"),
    ]
    for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for x in "qkv":
            pairs.append((f"blocks.{{n}}.{wan}.{x}.{{p}}", f"blocks.{{n}}.{dif}.to_{x}.{{p}}"))
        pairs.append((f"blocks.{{n}}.{wan}.o.{{p}}", f"blocks.{{n}}.{dif}.to_out.0.{{p}}"))
        for x in ("norm_q", "norm_k"):
            pairs.append((f"blocks.{{n}}.{wan}.{x}.{{p}}", f"blocks.{{n}}.{dif}.{x}.{{p}}"))
    return pairs


def _compile(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>[^.]+)")
    return re.compile("^" + rx + "$")


_NAME_PAIRS = [(_compile(w), w, _compile(d), d) for w, d in _pairs()]


def wan_to_diffusers(key: str) -> str:
    """Wan parameter name -> diffusers WanTransformer3DModel name."""
    for rx, _, _, tpl in _NAME_PAIRS:
        if m := rx.match(key):
            return tpl.format(**m.groupdict())
    return key  # patch_embedding.* is the same in both


def diffusers_to_wan(key: str) -> str:
    """diffusers WanTransformer3DModel name -> Wan parameter name."""
    for _, tpl, rx, _ in _NAME_PAIRS:
        if m := rx.match(key):
            return tpl.format(**m.groupdict())
    return key


def _strip_wrappers(key: str) -> str:
    for part in WRAPPER_PARTS:
        key = key.replace(part, "")
    return key


def normalize_state_dict(obj: Mapping, entry: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Bring any accepted layout to bare Wan names; returns (state_dict, layout description).

    ``entry``: the training checkpoint's entry to read when present (a release's, e.g. LongLive reads
    'generator'); else the first of ``TOP_LEVEL_CHOICES`` (EMA first)."""
    layout = []
    picked = None
    for name in ((entry,) if entry else ()) + TOP_LEVEL_CHOICES:
        if name in obj and isinstance(obj[name], Mapping):
            picked = name
            break
    if picked is not None:
        layout.append(f"training checkpoint ['{picked}']")
        obj = obj[picked]
    elif isinstance(obj.get(LORA_TOP_LEVEL), Mapping):
        raise CheckpointError(f"this file (top-level '{LORA_TOP_LEVEL}', e.g. LongLive's lora.pt) {LORA_ONLY}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    if looks_like_lora(tensors):
        raise CheckpointError(f"this file (only lora_A/lora_B or lora_down/lora_up keys) {LORA_ONLY}")
    sd = {_strip_wrappers(k): v for k, v in tensors.items()}
    if any(k != _strip_wrappers(k) for k in tensors):
        layout.append("FSDP/compile wrappers stripped")
    sd, stripped = strip_prefixes(sd, MODEL_PREFIXES)
    layout += [f"prefix '{p}'" for p in stripped]
    sd, scaled = dequantize_scaled_fp8(sd)
    if scaled:
        layout.append("scaled fp8 (folded into bf16)")
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        sd = {diffusers_to_wan(k): v for k, v in sd.items()}
        layout.append("diffusers names")
    else:
        layout.append("Wan names")
    return sd, ", ".join(layout)


# -- strict loading ---------------------------------------------------------------------------
def short_list(items, n: int = 8) -> str:
    """'a, b, c ... (+N more)': a readable excerpt of a long list of names."""
    items = sorted(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def mismatch_report(expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape conflicts of ``sd`` against {name: shape}, as phrases."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {short_list(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape conflicts: {short_list(shapes, 4)}")
    return parts


def check_compatible(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise one CheckpointError listing every missing/unexpected key and shape conflict."""
    parts = mismatch_report({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if parts:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))


def split_bundle(tensors: Mapping[str, torch.Tensor], names) -> tuple[dict, dict]:
    """Separate bundled parts ``{name}.*`` from the DiT's tensors."""
    extras = {n: {} for n in names}
    rest = {}
    for k, v in tensors.items():
        head, _, tail = k.partition(".")
        if head in extras and tail:
            extras[head][tail] = v
        else:
            rest[k] = v
    return rest, extras


def non_finite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, else None.

    One pass per tensor at load: ``aminmax`` propagates NaN and Inf and needs no mask the size of the tensor,
    so it costs far less than ``isfinite(t).all()`` (float8, which it does not take, is widened first).
    """
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() == 1:
            t = t.to(torch.float16)
        lo, hi = torch.aminmax(t.detach())
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            return name
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, error=None) -> None:
    """Refuse weights holding NaN or Inf (``error``, default CheckpointError): they would give a black video."""
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise (error or CheckpointError)(
            f"{source}: tensor '{bad}' holds NaN or Inf values (a diverged training run or a damaged file); "
            "refusing to load it")


def check_meta(meta, path: str) -> None:
    """Refuse metadata of the wrong shape or out of range (CheckpointError naming the field)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the '{FORMAT_KEY}' metadata must be a JSON object, got {type(meta).__name__}")
    try:
        for name, (kind, low, high) in META_FIELDS.items():
            if meta.get(name) is not None:
                check_field(name, meta[name], kind, low, high)
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {e}") from None
    bundle = meta.get("bundle", [])
    if not isinstance(bundle, list) or not all(isinstance(n, str) for n in bundle):
        raise CheckpointError(f"{path}: metadata 'bundle' must be a list of part names, got {bundle!r}")
    if "toy" in meta and not isinstance(meta["toy"], dict):
        raise CheckpointError(f"{path}: metadata 'toy' must be a JSON object, got {type(meta['toy']).__name__}")


def file_metadata(file_meta: Mapping, path: str) -> dict:
    """Our metadata (``FORMAT_KEY``) of a file's string metadata, checked; {} when it has none."""
    meta = {}
    if FORMAT_KEY in file_meta:
        try:
            meta = json.loads(file_meta[FORMAT_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: unreadable '{FORMAT_KEY}' metadata: {e}") from e
    check_meta(meta, path)
    return meta


def find_release(meta: dict, path: str, release: str | None):
    """The public release a file without our metadata is (``release``: "auto" = by the file name, a key of
    ``sf_model.layouts.RELEASES``, or None = never); None when it has our metadata or none matches."""
    if release is None or meta:
        return None
    try:
        return release_for(path) if release == "auto" else release_by_key(release)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def with_release(meta: dict, found, release: str | None, layout: str) -> tuple[dict, str]:
    """Fill a release's (``find_release``) trained settings into the metadata and name it in the layout."""
    if found is None:
        return meta, layout
    how = "by file name" if release == "auto" else "as asked"
    return apply_release(meta, found), f"{layout}, release: {found.title} ({how})"


def check_wan21(config: WanConfig, path: str) -> None:
    """Refuse a Wan 2.2 TI2V-5B (48 latent channels, e.g. LongLive 2.0): our model and VAE are Wan 2.1's."""
    if config.in_dim == 48 and config.out_dim == 48:
        raise CheckpointError(f"{path}: a Wan 2.2 TI2V-5B model (48 latent channels, e.g. LongLive 2.0); only "
                              "Wan 2.1 causal models (16 latent channels, 1.3B or 14B) are supported")


def apply_lora_file(sd: dict, lora: str, strength: float, alpha: float | None = None) -> tuple[dict, str]:
    """``sd`` with the LoRA file ``lora`` merged (``sf_model.layouts.merge_lora``) and a layout note."""
    obj, _ = read_file(lora)
    name = os.path.basename(os.fspath(lora))
    try:
        factors, desc = read_lora_state(obj, diffusers_to_wan, alpha)
        sd = merge_lora(sd, factors, strength, source=f"LoRA {name}")
    except ValueError as e:
        raise CheckpointError(f"{lora}: {e}") from None
    rank = next(iter(factors.values())).rank
    return sd, f"LoRA {name} merged ({desc}, {len(factors)} linears, rank {rank}, strength {strength:g})"


def convert_lora(src: str, dst: str, alpha: float | None = None) -> str:
    """Rewrite a LoRA in any accepted format (LongLive's peft ``lora.pt``, diffusers names) as a safetensors file in
    ComfyUI core's key format, for core ``LoraLoaderModelOnly`` (``alpha`` where the file stores none; default
    alpha = rank, LongLive's setting). Atomic write; returns ``dst``."""
    from safetensors.torch import save_file

    obj, _ = read_file(src)
    try:
        factors, _ = read_lora_state(obj, diffusers_to_wan, alpha)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    dst = os.fspath(dst)
    tmp = dst + ".tmp"
    save_file(comfy_lora_state_dict(factors, alpha), tmp)
    publish(tmp, dst)
    return dst


def _resolve(obj, file_meta: dict, path: str, release: str | None) -> tuple[dict, str, dict, dict]:
    """What both readers make of a file's tensors (or header entries) and metadata: (bare Wan state dict,
    layout description, metadata with the release's settings, bundled extras)."""
    meta = file_metadata(file_meta, path)
    obj, extras = split_bundle(obj, meta.get("bundle", []))
    found = find_release(meta, path, release)
    sd, layout = normalize_state_dict(obj, found.entry if found else None)
    meta, layout = with_release(meta, found, release, layout)
    return sd, layout, meta, extras


def load_state_dict_file(path: str, lora: str | None = None, lora_strength: float = 1.0,
                         release: str | None = "auto", lora_alpha: float | None = None,
                         ) -> tuple[dict[str, torch.Tensor], WanConfig, str, dict, dict]:
    """Read a file and return (bare Wan state dict, config, layout, meta, bundled extras).

    ``lora``: a LoRA file merged into the weights (strength ``lora_strength``; ``lora_alpha`` where the file
    stores none, default alpha = rank). ``release``: see ``with_release``."""
    sd, layout, meta, extras = _resolve(*read_file(path), path, release)
    check_finite(sd, path)
    if lora is not None:
        sd, note = apply_lora_file(sd, lora, float(lora_strength), lora_alpha)
        check_finite(sd, lora)
        layout += ", " + note
    for name, part in extras.items():
        check_finite({f"{name}.{k}": v for k, v in part.items()}, path)
    if extras:
        layout += ", bundled: " + ", ".join(extras)
    try:
        config = WanConfig.from_dict(meta["model"]) if "model" in meta else infer_config(sd)
    except (KeyError, ValueError) as e:
        where = "the metadata's model config: " if "model" in meta else ""
        raise CheckpointError(f"{path}: {where}{e}") from e
    check_wan21(config, path)
    return sd, config, layout, meta, extras


_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                  "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A safetensors file's tensors as meta-device stand-ins (name, shape, dtype; no data read) and its string
    metadata: enough to recognise the model (a 14B file is read in milliseconds)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if not is_safetensors(path):
        raise CheckpointError(f"{path} is not a safetensors file (only their header can be read alone)")
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size > 100 << 20:
            raise CheckpointError(f"{path}: safetensors header of {size} bytes is implausible (corrupt file?)")
        try:
            header = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from e
    file_meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype = _HEADER_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has an unknown dtype {info.get('dtype')!r}")
        tensors[name] = torch.empty([int(n) for n in info["shape"]], dtype=dtype, device="meta")
    return tensors, file_meta


def inspect_checkpoint(path: str, release: str | None = "auto") -> tuple[WanConfig, str, dict]:
    """(config, layout, meta) of a safetensors checkpoint from its header alone (``read_header``)."""
    sd, layout, meta, _ = _resolve(*read_header(path), path, release)
    try:
        config = WanConfig.from_dict(meta["model"]) if "model" in meta else infer_config(sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    check_wan21(config, path)
    return config, layout, meta


def load_model(path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               attn_backend: str = "auto", lora: str | None = None, lora_strength: float = 1.0,
               release: str | None = "auto", lora_alpha: float | None = None) -> LoadedModel:
    """Load any supported checkpoint into a ``CausalWanModel`` (strictly), with an optional LoRA merged.

    ``dtype`` None keeps the file's floating dtype (float32 for fp32 training checkpoints; bfloat16 for fp8).
    A float8 ``dtype`` (``torch.float8_e4m3fn``) stores the linear layers' weights in float8 (rounded as ComfyUI's
    weight_dtype fp8_e4m3fn does, no scale), cast to bfloat16 one layer at a time when they run
    (``sf_model.weight_cast``); the rest is bfloat16. Such a model cannot use ``fuse_qkv`` / the fused trunk.
    ``lora``/``lora_strength``/``lora_alpha``/``release``: see ``load_state_dict_file``.
    """
    sd, config, layout, meta, extras = load_state_dict_file(path, lora, lora_strength, release, lora_alpha)
    model = build_model(sd, config, device, dtype, attn_backend, source=os.path.basename(os.fspath(path)))
    return LoadedModel(model=model, config=config, layout=layout, meta=meta, extras=extras)


def build_model(sd: Mapping[str, torch.Tensor], config: WanConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, attn_backend: str = "auto", source: str = "checkpoint"):
    """A ``CausalWanModel`` on ``device`` from a bare Wan state dict (``load_state_dict_file``), strictly.

    Nothing is allocated on ``device`` before the keys and shapes are checked; callers that must check the
    memory of a run first (``sf_model.memory.check_fits``) read the file, check, then build.
    """
    from .model import CausalWanModel

    if dtype is None:
        dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
        if dtype.itemsize == 1:  # fp8 storage: compute in bfloat16
            dtype = torch.bfloat16
    with torch.device("meta"):
        model = CausalWanModel(config, attn_backend=attn_backend)
    check_compatible(model, sd, source=source)
    if is_float8(dtype):  # float8 storage of the linear layers, built on the device in its final dtypes
        storage, dtype = dtype, torch.bfloat16
        keep, top = linear_param_names(model), torch.finfo(storage).max
        bad = next((k for k in sorted(keep) if not bool(sd[k].abs().max() <= top)), None)  # casts would saturate
        if bad is not None:
            raise CheckpointError(f"{source}: tensor '{bad}' has values beyond {storage}'s range (+-{top:g}); "
                                  "load it in bf16")
        ready = {k: v.to(device=device, dtype=storage if k in keep else dtype) for k, v in sd.items()}
        model.load_state_dict(ready, strict=True, assign=True)
        cast_linears(model, dtype)
        return model.eval().requires_grad_(False)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


# -- saving ------------------------------------------------------------------------------------
def save_model(path: str, model_or_state_dict, config: WanConfig, meta: Mapping | None = None,
               dtype: torch.dtype | None = None, extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
    """Write a safetensors file with bare Wan keys and metadata our loader and ComfyUI core read.

    ``meta`` may carry sampling defaults (``frames_per_block``, ``steps``, ``shift``) and anything JSON.
    ``extras`` bundles other parts of a self-contained model ({name: state dict}, stored as
    ``name.<key>`` and declared in the metadata). The write is atomic (temporary file, then rename).
    """
    from safetensors.torch import save_file

    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    sd, _ = normalize_state_dict(sd)
    # clone: parameters may be views of one tensor (fused q/k/v), which safetensors refuses to save
    cast = lambda v: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone()  # noqa: E731
    sd = {k: cast(v) for k, v in sd.items()}
    for name, part in (extras or {}).items():
        if "." in name or any(k.startswith(name + ".") for k in sd):
            raise ValueError(f"bundle name '{name}' must be a plain word that no DiT key starts with")
        sd.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in part.items()})
    info = {"format_version": FORMAT_VERSION, "model": config.to_dict(), **dict(meta or {})}
    if extras:
        info["bundle"] = sorted(extras)
    metadata = {
        "config": json.dumps({"transformer": {"causal_ar": True}}),
        FORMAT_KEY: json.dumps(info, sort_keys=True),
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=metadata)
    publish(tmp, path)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Move a finished temporary file over ``path`` with the permissions of a newly created file (0o666 less
    the umask): safetensors creates its files 0o600, which other users of a shared model folder cannot read."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
