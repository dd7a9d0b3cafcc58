"""Which latent space a model's LATENT lives in, and how the nodes convert it (no ComfyUI import).

Two formats cross the nodes' boundary, chosen by the model (``latent_space(handle)``):

- ``wan21`` (Wan models): core's Wan 2.1 LATENT, ``{"samples": raw VAE latents [B, 16, F, H/8, W/8]}`` with
  ``F = (length - 1) / 4 + 1``. The DiT works on normalised latents, so samples are normalised with the
  Wan 2.1 statistics on the way in and denormalised on the way out. No tag: any core LATENT is this.
- ``self_forcing_toy`` (self-contained toy models that bundle their own codec): ``{"samples": the model's own
  latents [B, 16, F, H/s, W/s], "self_forcing_format": "self_forcing_toy", "self_forcing_codec": "<id>"}``,
  one latent frame per video frame, ``s`` the codec's spatial factor (2). The bundled codec decodes exactly
  what the DiT produces, so these latents pass through UNCHANGED (Wan 2.1 normalisation would scale them
  per channel and the codec would decode something else). The tag says so explicitly; the codec id (a hash
  of the codec's weights) keeps one toy model's latents from being decoded by a different codec.

A prompt from 'Self Forcing Toy Text Encode' carries a similar tag in its CONDITIONING entry, so a toy model
refuses umT5 prompts and a Wan model refuses toy prompts (both would silently give noise).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sf_model.latent_format import (SPATIAL_STRIDE, TEMPORAL_STRIDE, latent_frames, preview_strip, to_model_space,
                                      to_raw)
from ..toy.bundle import CODEC_PART, TEXT_PART, is_toy_bundle, latents_to_frames, toy_parts
from .validate import check_length, check_size, first_error, not_a_number

WAN21 = "wan21"
TOY = "self_forcing_toy"
FORMAT_KEY = "self_forcing_format"  # in a LATENT dict
CODEC_KEY = "self_forcing_codec"  # in a LATENT dict: which toy codec made it
TEXT_KEY = "self_forcing_toy_text"  # in a CONDITIONING entry's dict: which toy text encoder made it


def part_id(loaded, part: str) -> str:
    """A short id of a bundled part (hash of its tensors), cached on the LoadedModel."""
    ids = getattr(loaded, "_toy_part_ids", None)
    if ids is None:
        ids = {}
        loaded._toy_part_ids = ids
    if part not in ids:
        h = hashlib.sha1(part.encode())
        for key in sorted(loaded.extras[part]):
            t = loaded.extras[part][key].detach().cpu().contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        ids[part] = f"{part}:{h.hexdigest()[:16]}"
    return ids[part]


@dataclass(frozen=True)
class LatentSpace:
    """How LATENT samples of one model map to the model's own space, to pixels and to frame counts."""

    name: str
    spatial: int  # pixels per latent pixel
    temporal: int  # video frames per latent frame (Wan: 4, plus the first frame alone)
    codec: str | None = None  # toy: the codec id its LATENTs are tagged with
    loaded: Any = field(default=None, compare=False, repr=False)  # toy: the LoadedModel (for its codec)

    @property
    def is_toy(self) -> bool:
        return self.name == TOY

    # -- frames and sizes ----------------------------------------------------------------------------
    def latent_frames(self, length: int) -> int:
        """Latent frames of a video of ``length`` frames (Wan: 4k+1 -> k+1; toy: one per frame)."""
        return latent_frames(length, self.temporal)

    def check_request(self, width: int, height: int, length: int, patch: tuple[int, int, int]) -> None:
        """Width/height a multiple of stride x patch; Wan lengths 4k+1 (toy: any length >= 1)."""
        multiple = self.spatial * max(patch[1], patch[2])
        if self.is_toy:
            frames = not_a_number("length", length) or (
                None if length >= 1 else f"length {length} must be at least 1 frame")
        else:
            frames = check_length(length)
        err = first_error(check_size("width", width, multiple), check_size("height", height, multiple), frames)
        if err:
            raise ValueError(err)

    # -- conversions ---------------------------------------------------------------------------------
    def to_model(self, samples: torch.Tensor) -> torch.Tensor:
        """LATENT samples -> the model's space (float32, always a new tensor: the input LATENT stays untouched)."""
        return to_model_space(samples) if not self.is_toy else samples.to(torch.float32, copy=True)

    def from_model(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents -> LATENT samples (float32)."""
        return to_raw(latents) if not self.is_toy else latents.to(torch.float32)

    def wrap(self, samples: torch.Tensor) -> dict:
        """A LATENT dict; toy latents carry their format and codec tags."""
        if not self.is_toy:
            return {"samples": samples}
        return {"samples": samples, FORMAT_KEY: TOY, CODEC_KEY: self.codec}

    def unwrap(self, latent) -> torch.Tensor:
        """The samples of a LATENT meant for this space; refuses a LATENT of the other format."""
        tag = latent.get(FORMAT_KEY) if isinstance(latent, dict) else None
        samples = latent.get("samples") if isinstance(latent, dict) else latent
        if not self.is_toy:
            if tag == TOY:
                raise ValueError("this LATENT holds a toy model's codec latents (from 'Self Forcing Stream Sampler' "
                                 "running a self-contained toy model), not Wan 2.1 latents; continue it with the same "
                                 "toy model, or decode it with 'Self Forcing Toy Decode'")
            return samples
        if tag != TOY:
            raise ValueError("this LATENT is not a toy model's latent (it has no 'self_forcing_toy' tag: a Wan 2.1 "
                             "latent from VAEEncode or from a sampler running a Wan model, or a toy latent passed "
                             "through a node that dropped the tag); connect the LATENT output of 'Self Forcing Stream "
                             "Sampler' running this toy model directly, or decode Wan latents with core VAE Decode")
        made_by = latent.get(CODEC_KEY)
        if made_by is not None and made_by != self.codec:
            raise ValueError(f"this LATENT was made by a toy model with another codec ({made_by}, this model has "
                             f"{self.codec}); decode it with the model that generated it")
        return samples

    # -- previews ------------------------------------------------------------------------------------
    def preview(self, latents: torch.Tensor, max_frames: int = 4) -> torch.Tensor:
        """uint8 [H, n*W, 3] strip of up to ``max_frames`` frames of batch item 0 (model-space latents).

        Wan: the cheap latent -> RGB projection; toy: the bundled codec itself (as cheap, and exact)."""
        if not self.is_toy:
            return preview_strip(latents, max_frames=max_frames)
        frames = latents.shape[2]
        n = max(1, min(max_frames, frames))
        idx = torch.linspace(0, frames - 1, n).round().long() if n > 1 else torch.tensor([frames - 1])
        rgb = latents_to_frames(self.loaded, latents[:1, :, idx])  # [n, H, W, 3] in [0, 1]
        return (torch.cat(list(rgb), dim=1) * 255.0).round().clamp(0, 255).to(torch.uint8)

    # -- prompts -------------------------------------------------------------------------------------
    def check_prompt(self, conditioning) -> None:
        """Refuse a prompt made for the other kind of model (toy prompts carry their encoder's id)."""
        extra = conditioning[0][1] if _entry_has_dict(conditioning) else {}
        made_by = extra.get(TEXT_KEY)
        if not self.is_toy:
            if made_by is not None:
                raise ValueError("positive comes from 'Self Forcing Toy Text Encode' (a toy model's own encoder); "
                                 "a Wan model needs umT5-XXL prompts: core CLIPLoader (type 'wan') + CLIPTextEncode")
            return
        mine = part_id(self.loaded, TEXT_PART)
        if made_by is None:
            raise ValueError("positive was not made by 'Self Forcing Toy Text Encode': a self-contained toy model only "
                             "understands its own bundled text encoder; connect 'Self Forcing Toy Text Encode' fed "
                             "with the same model")
        if made_by != mine:
            raise ValueError("positive was encoded by another toy model's text encoder; feed 'Self Forcing Toy Text "
                             "Encode' with the same model as the sampler")


def _entry_has_dict(conditioning) -> bool:
    return (isinstance(conditioning, (list, tuple)) and len(conditioning) > 0
            and isinstance(conditioning[0], (list, tuple)) and len(conditioning[0]) > 1
            and isinstance(conditioning[0][1], dict))


WAN21_SPACE = LatentSpace(WAN21, SPATIAL_STRIDE, TEMPORAL_STRIDE)


def toy_space(loaded) -> LatentSpace:
    """The latent space of a loaded toy bundle: its codec's strides (spatial from the codec or the metadata's
    frame/latent size; no temporal compression)."""
    _, codec = toy_parts(loaded)
    temporal = int(getattr(codec, "temporal_factor", 1))
    if temporal != 1:
        raise ValueError(f"toy codecs with temporal compression ({temporal} frames per latent frame) are not "
                         "supported by the nodes")
    spatial = getattr(codec, "spatial_factor", None) or getattr(codec, "factor", None)
    if spatial is None:
        info = loaded.meta["toy"]
        spatial = int(info["size"]) // int(info["latent_size"][0])
    return LatentSpace(TOY, int(spatial), 1, codec=part_id(loaded, CODEC_PART), loaded=loaded)


def latent_space(handle) -> LatentSpace:
    """The LATENT format of a model handle: toy for self-contained toy bundles, Wan 2.1 otherwise."""
    loaded = handle.loaded
    return toy_space(loaded) if is_toy_bundle(loaded) else WAN21_SPACE
