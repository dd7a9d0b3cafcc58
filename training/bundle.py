"""Self-contained toy models: the DiT plus its bundled text encoder and codec in one safetensors file.

Plain functions for the CLI and the ComfyUI nodes (no ComfyUI import)::

    loaded = load_model(path)                     # sf_model.checkpoint
    is_toy_bundle(loaded)                         # True for our toy exports
    ctx = encode_prompt(loaded, "a red circle bouncing on a black background")   # [1, L, text_dim] float32
    frames = latents_to_frames(loaded, latents)   # latents [B, 16, F, H, W] -> IMAGE [B*F, H', W', 3] in [0, 1]

The metadata's ``toy`` entry names the text encoder and codec classes (``toy_text.ToyTextEncoder`` and
``codec.ToyCodec``, or the minimal ``toy_parts_local`` ones) with their constructor arguments, plus the
frame size, the frame rate and the training clip length; their weights are the bundle parts ``toy_text``
and ``toy_codec``.
"""

from __future__ import annotations

import inspect

import torch

TEXT_PART, CODEC_PART = "toy_text", "toy_codec"
DEFAULT_FPS = 8


# -- building the parts --------------------------------------------------------------------------------
# (module in this package, class): the shared toy parts first, the minimal local ones as a fallback.
TEXT_CLASSES = (("toy_text", "ToyTextEncoder"), ("toy_parts_local", "LocalToyText"))
CODEC_CLASSES = (("codec", "ToyCodec"), ("toy_parts_local", "LocalToyCodec"))


def text_encoder_args(cfg) -> dict:
    """Offered to the encoder's constructor; each class keeps the names it takes (max_len / text_len)."""
    return {"text_dim": cfg.model.text_dim, "text_len": cfg.model.text_len, "max_len": cfg.model.text_len,
            "seed": cfg.run.seed}


def codec_args(cfg) -> dict:
    return {"channels": cfg.model.in_dim}


def _class(module: str, name: str, allowed):
    import importlib

    if (module, name) not in allowed:
        raise ValueError(f"unknown toy part {module}.{name}; known: {allowed}")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _first_available(choices):
    for module, name in choices:
        try:
            return module, name, _class(module, name, TEXT_CLASSES + CODEC_CLASSES)
        except (ImportError, AttributeError):
            continue
    raise ValueError(f"none of the toy parts {choices} can be imported")


def _construct(cls, args: dict):
    """cls(**args) keeping only the arguments its constructor takes; returns (object, args used)."""
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        args = {k: v for k, v in args.items() if k in params}
    return cls(**args), args


def build_toy_parts(cfg):
    """(text encoder, codec) for a config, on the CPU in float32; each remembers how it was built."""
    parts = []
    pick = {"auto": slice(None), "shared": slice(0, 1), "local": slice(1, 2)}[cfg.world.parts]
    for choices, args in ((TEXT_CLASSES, text_encoder_args(cfg)), (CODEC_CLASSES, codec_args(cfg))):
        module, name, cls = _first_available(choices[pick])
        obj, used = _construct(cls, args)
        obj.toy_spec = {"module": module, "class": name, "args": used}
        parts.append(obj.eval())
    return tuple(parts)


def bundle_meta(cfg, world) -> dict:
    c, f, h, w = world.clip_shape
    return {"text_encoder": world.text_encoder.toy_spec, "codec": world.codec.toy_spec, "size": cfg.world.size,
            "latent_size": [h, w], "train_frames": f, "fps": DEFAULT_FPS}


def bundle_extras(world) -> dict:
    return {TEXT_PART: world.text_encoder.state_dict(), CODEC_PART: world.codec.state_dict()}


# -- using a loaded bundle -------------------------------------------------------------------------------
def is_toy_bundle(loaded) -> bool:
    return "toy" in loaded.meta and TEXT_PART in loaded.extras and CODEC_PART in loaded.extras


def toy_parts(loaded):
    """The rebuilt (text encoder, codec) of a loaded toy bundle, cached on the LoadedModel."""
    cached = getattr(loaded, "_toy_parts", None)
    if cached is not None:
        return cached
    if not is_toy_bundle(loaded):
        raise ValueError("this checkpoint is not a self-contained toy model (no bundled text encoder/codec); "
                         "for Wan models encode prompts with umT5 and decode with the Wan VAE")
    toy = loaded.meta["toy"]
    te, cs = toy["text_encoder"], toy["codec"]
    enc, _ = _construct(_class(te["module"], te["class"], TEXT_CLASSES), dict(te["args"]))
    codec, _ = _construct(_class(cs["module"], cs["class"], CODEC_CLASSES), dict(cs["args"]))
    enc.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in loaded.extras[TEXT_PART].items()})
    codec.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in loaded.extras[CODEC_PART].items()})
    parts = (enc.eval(), codec.eval())
    loaded._toy_parts = parts
    return parts


@torch.no_grad()
def encode_prompt(loaded, prompt, device: torch.device | str | None = None) -> torch.Tensor:
    """Text states [B, text_len, text_dim] (float32) of a prompt (or a list of prompts)."""
    from .world import encode_text

    enc, _ = toy_parts(loaded)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return encode_text(enc, prompts, device if device is not None else loaded.model.device)


@torch.no_grad()
def latents_to_video(loaded, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents [B, C, F, H, W] -> pixels [B, 3, F, H', W'] in [-1, 1] (float32, CPU)."""
    _, codec = toy_parts(loaded)
    if latents.ndim != 5:
        raise ValueError(f"latents must be [batch, channels, frames, height, width], got {tuple(latents.shape)}")
    return codec.decode(latents.detach().float().cpu()).clamp(-1, 1)


@torch.no_grad()
def latents_to_frames(loaded, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, F, H, W] -> IMAGE frames [B*F, H', W', 3] in [0, 1] (ComfyUI's layout)."""
    video = latents_to_video(loaded, latents)
    return ((video + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1).contiguous()
