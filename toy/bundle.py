"""Self-contained toy models: the DiT plus its text encoder and codec in one safetensors file.

Plain functions for the CLI, the ComfyUI nodes and the trainer (no ComfyUI import)::

    loaded = load_model(path)                     # sf_model.checkpoint
    is_toy_bundle(loaded)                         # True for our toy exports
    ctx = encode_prompt(loaded, "a red circle bouncing on a black background")   # [1, L, text_dim] float32
    frames = latents_to_frames(loaded, latents)   # latents [B, 16, F, H, W] -> IMAGE [B*F, H', W', 3] in [0, 1]

Format (``FORMAT`` = 2): the metadata's ``toy`` entry holds ``{"format": 2, "text_encoder": <the
ToyTextEncoder's constructor arguments>, "size", "latent_size", "train_frames", "fps"}``; the weights of the
text encoder and of the codec are the bundle parts ``toy_text`` and ``toy_codec`` (their ``state_dict``).
There is one text encoder class (``toy.text.ToyTextEncoder``) and one codec class (``toy.codec.ToyCodec``).

Bundles written before format 2 named their parts by module path; ``upgrade_legacy`` rewrites the two
layouts that were ever exported into format 2 with the same numbers (a test checks that the outputs match).
"""

from __future__ import annotations

import torch

from .codec import ToyCodec
from .text import VOCAB, ToyTextEncoder

TEXT_PART, CODEC_PART = "toy_text", "toy_codec"
FORMAT = 2
DEFAULT_FPS = 8


# -- building and saving ----------------------------------------------------------------------------------
# Inner width of the toy text encoder's layer: its output is projected to the model's text_dim (4096 for the
# umT5-shaped toy models), so the bundle carries ~3 MB of text encoder instead of a 4096-wide layer (~540 MB).
TEXT_WIDTH = 128


def build_toy_parts(text_dim: int, text_len: int, seed: int) -> tuple[ToyTextEncoder, ToyCodec]:
    """(text encoder, codec) for a model with that text width/length, on the CPU in float32."""
    width = TEXT_WIDTH if text_dim > TEXT_WIDTH else None
    return ToyTextEncoder(text_dim=text_dim, max_len=text_len, seed=seed, width=width).eval(), ToyCodec().eval()


def bundle_meta(text_encoder: ToyTextEncoder, size: int, latent_size, train_frames: int) -> dict:
    """The ``toy`` metadata entry of an export."""
    return {"format": FORMAT, "text_encoder": text_encoder.config(), "size": int(size),
            "latent_size": [int(v) for v in latent_size], "train_frames": int(train_frames), "fps": DEFAULT_FPS}


def bundle_extras(text_encoder: ToyTextEncoder, codec: ToyCodec) -> dict:
    return {TEXT_PART: text_encoder.state_dict(), CODEC_PART: codec.state_dict()}


# -- reading ----------------------------------------------------------------------------------------------
def is_toy_bundle(loaded) -> bool:
    return "toy" in loaded.meta and TEXT_PART in loaded.extras and CODEC_PART in loaded.extras


def upgrade_legacy(toy: dict, extras: dict) -> tuple[dict, dict]:
    """(toy metadata, extras) of a pre-format-2 bundle rewritten as format 2 (same outputs).

    Format 1 named each part ``{"module", "class", "args"}``. Two pairs were exported: ``toy_text.ToyTextEncoder``
    + ``codec.ToyCodec`` (already today's classes) and the minimal ``toy_parts_local.LocalToyText`` +
    ``LocalToyCodec`` of the first bundled demo model, whose numbers today's classes reproduce exactly: a word
    table + position table with no final norm is a ``ToyTextEncoder`` with no layers and ``final_norm=False``
    (rows re-ordered to its vocabulary), and ``(x - shift) * scale`` then an orthonormal basis is a
    ``ToyCodec`` with that basis as its matrix and ``shift`` as its per-channel mean.
    """
    te, cs = toy.get("text_encoder", {}), toy.get("codec", {})
    text, codec = dict(extras[TEXT_PART]), dict(extras[CODEC_PART])
    if (te.get("module"), te.get("class")) == ("toy_text", "ToyTextEncoder"):
        args = dict(te.get("args", {}))
    elif (te.get("module"), te.get("class")) == ("toy_parts_local", "LocalToyText"):
        args = te.get("args", {})
        words, positions = text["words"], text["positions"]
        legacy_vocab = ("a", "and", "bouncing", "on", "background", "circle", "square", "triangle", "red", "green",
                        "blue", "yellow", "magenta", "cyan", "white", "black", "gray", "navy", "brown", "<unk>")
        index = {w: i for i, w in enumerate(legacy_vocab)}
        rows = [torch.zeros_like(words[0])] + [words[index.get(w, index["<unk>"])] for w in VOCAB[1:]]
        text = {"token_embedding.weight": torch.stack(rows), "position_embedding": positions}
        args = {"text_dim": int(args.get("text_dim", words.shape[1])), "max_len": int(positions.shape[0]),
                "num_layers": 0, "seed": int(args.get("seed", 0)), "final_norm": False}
    else:
        raise ValueError(f"unknown toy text encoder {te.get('module')}.{te.get('class')} in this bundle; "
                         "re-export it with this version of the trainer")
    if (cs.get("module"), cs.get("class")) == ("codec", "ToyCodec"):
        pass
    elif (cs.get("module"), cs.get("class")) == ("toy_parts_local", "LocalToyCodec"):
        if int(cs.get("args", {}).get("factor", 2)) != 2 or tuple(codec["basis"].shape) != (16, 12):
            raise ValueError("this legacy toy codec is not a 2x2 pixel-unshuffle codec; re-export the model")
        codec = {"matrix": codec["basis"], "pixel_mean": codec["shift"].expand(3).clone(), "scale": codec["scale"]}
    else:
        raise ValueError(f"unknown toy codec {cs.get('module')}.{cs.get('class')} in this bundle; "
                         "re-export it with this version of the trainer")
    meta = {k: v for k, v in toy.items() if k not in ("text_encoder", "codec")}
    meta.update(format=FORMAT, text_encoder=args)
    return meta, {**extras, TEXT_PART: text, CODEC_PART: codec}


def _float(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def toy_parts(loaded) -> tuple[ToyTextEncoder, ToyCodec]:
    """The rebuilt (text encoder, codec) of a loaded toy bundle, cached on the LoadedModel."""
    cached = getattr(loaded, "_toy_parts", None)
    if cached is not None:
        return cached
    if not is_toy_bundle(loaded):
        raise ValueError("this checkpoint is not a self-contained toy model (no bundled text encoder/codec); "
                         "for Wan models encode prompts with umT5 and decode with the Wan VAE")
    toy, extras = loaded.meta["toy"], loaded.extras
    if toy.get("format") != FORMAT:
        toy, extras = upgrade_legacy(toy, extras)
    args = toy.get("text_encoder")
    if not isinstance(args, dict):
        raise ValueError("the toy bundle's metadata has no text_encoder arguments; re-export the model")
    try:
        enc = ToyTextEncoder(**args)
    except TypeError as e:
        raise ValueError(f"the toy bundle's text_encoder arguments {args} do not fit ToyTextEncoder: {e}") from None
    codec = ToyCodec()
    enc.load_state_dict(_float(extras[TEXT_PART]))
    codec.load_state_dict(_float(extras[CODEC_PART]))
    parts = (enc.eval(), codec.eval())
    loaded._toy_parts = parts
    return parts


# -- using a loaded bundle -------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompt(loaded, prompt, device: torch.device | str | None = None) -> torch.Tensor:
    """Text states [B, text_len, text_dim] (float32) of a prompt (or a list of prompts)."""
    enc, _ = toy_parts(loaded)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return enc.encode(prompts).float().to(device if device is not None else loaded.model.device)


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
