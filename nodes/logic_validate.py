"""Input checks shared by the nodes (plain Python, no ComfyUI import).

Every check returns ``None`` when the value is fine and an error text that says how to fix it otherwise.
Values that are ``None`` (inputs linked from another node: ComfyUI passes them as None to
``validate_inputs``) are skipped; execute-time code calls the same functions with real values and raises.
"""

from __future__ import annotations

from typing import Iterable

from ..sf_model.schedule import parse_steps

TEMPORAL_STRIDE = 4  # Wan 2.1 VAE: 4 video frames per latent frame (plus the first frame)
SPATIAL_STRIDE = 8  # VAE downsampling
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
MAX_TIMESTEP = 1000


def latent_frames(length: int) -> int:
    """Latent frames of a 4k+1-frame video."""
    return (int(length) - 1) // TEMPORAL_STRIDE + 1


def pixel_frames(latents: int) -> int:
    """Video frames decoded from ``latents`` latent frames."""
    return TEMPORAL_STRIDE * (int(latents) - 1) + 1


def _nearest(value: int, candidates: Iterable[int], minimum: int) -> str:
    c = sorted({x for x in candidates if x >= minimum})
    return " or ".join(str(x) for x in c)


def check_range(name: str, value, lo=None, hi=None) -> str | None:
    """Min/max check (``validate_inputs`` switches off core's own check for the inputs it names)."""
    if value is None:
        return None
    if lo is not None and value < lo:
        return f"{name} {value} is below the minimum {lo}"
    if hi is not None and value > hi:
        return f"{name} {value} is above the maximum {hi}"
    return None


def check_length(length: int | None) -> str | None:
    """Video length must be 4k+1 frames."""
    if length is None:
        return None
    if length < 1:
        return f"length {length} must be at least 1 frame (use 1, 5, ..., 81)"
    if (length - 1) % TEMPORAL_STRIDE:
        lo = length - (length - 1) % TEMPORAL_STRIDE
        return (f"length {length} is not 4k+1 (Wan packs 4 frames per latent frame plus the first); "
                f"use {_nearest(length, (lo, lo + TEMPORAL_STRIDE), 1)}")
    return None


def check_size(name: str, value: int | None, multiple: int = SIZE_MULTIPLE) -> str | None:
    """Pixel width/height must be a positive multiple of ``multiple`` (16 for Wan)."""
    if value is None:
        return None
    if value < multiple:
        return f"{name} {value} is too small; use at least {multiple}"
    if value % multiple:
        lo = value - value % multiple
        return f"{name} {value} is not a multiple of {multiple}; use {_nearest(value, (lo, lo + multiple), multiple)}"
    return None


def check_extend_frames(frames: int | None) -> str | None:
    """Frames added by an extension: whole latent frames, i.e. a positive multiple of 4."""
    if frames is None:
        return None
    if frames < TEMPORAL_STRIDE:
        return f"extend_frames {frames} is too small; add at least {TEMPORAL_STRIDE} frames"
    if frames % TEMPORAL_STRIDE:
        lo = frames - frames % TEMPORAL_STRIDE
        return (f"extend_frames {frames} is not a multiple of {TEMPORAL_STRIDE} (one latent frame = "
                f"{TEMPORAL_STRIDE} video frames); use {_nearest(frames, (lo, lo + TEMPORAL_STRIDE), TEMPORAL_STRIDE)}")
    return None


def check_steps(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parse_steps(text)
    except ValueError as e:
        return str(e)
    return None


def first_error(*errors: str | None) -> str | None:
    for e in errors:
        if e:
            return e
    return None


def validate_generation(width=None, height=None, length=None, frames_per_block=None, steps=None,
                        shift=None, context_noise=None) -> bool | str:
    """Cheap cross-field checks of the sampler's widgets; True or an error text (None values skipped)."""
    err = first_error(
        check_size("width", width), check_range("width", width, hi=4096),
        check_size("height", height), check_range("height", height, hi=4096),
        check_length(length), check_range("length", length, hi=4093),
        check_range("frames_per_block", frames_per_block, 1, 21),
        check_steps(steps),
        check_range("shift", shift, 1.0, 20.0),
        check_range("context_noise", context_noise, 0.0, 1000.0),
    )
    return err or True


def validate_extension(extend_frames=None, history_frames=None, resample_strength=None, frames_per_block=None,
                       steps=None, shift=None, context_noise=None) -> bool | str:
    err = first_error(
        check_extend_frames(extend_frames), check_range("extend_frames", extend_frames, hi=4092),
        check_range("history_frames", history_frames, 0, 1024),
        check_range("resample_strength", resample_strength, 0.0, 1.0),
        check_range("frames_per_block", frames_per_block, 1, 21),
        check_steps(steps),
        check_range("shift", shift, 1.0, 20.0),
        check_range("context_noise", context_noise, 0.0, 1000.0),
    )
    return err or True


def validate_long_video(cache=None, window=None, sink=None, routing_topk=None) -> bool | str:
    if cache is not None and cache not in ("fixed", "rolling"):
        return f"cache '{cache}' is not one of: fixed, rolling"
    err = first_error(
        check_range("window", window, 1, 1024),
        check_range("sink", sink, 0, 64),
        check_range("routing_topk", routing_topk, 0, 1024),
    )
    if err:
        return err
    if cache == "rolling" and window is not None and routing_topk and routing_topk >= window:
        return (f"routing_topk {routing_topk} is not smaller than the window {window}: routing would keep "
                f"every frame; use a routing_topk below {window}, or 0 to switch routing off")
    return True


def validate_live_frames(every_nth=None, max_size=None, format=None, quality=None) -> bool | str:
    if format is not None and format not in ("jpeg", "png"):
        return f"format '{format}' is not one of: jpeg, png"
    err = first_error(
        check_range("every_nth", every_nth, 1, 64),
        check_range("max_size", max_size, 0, 4096),
        check_range("quality", quality, 1, 100),
    )
    return err or True
