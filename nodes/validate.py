"""The nodes' cross-field rules, each written once (plain Python, no ComfyUI import).

Every check returns ``None`` when the value is fine and an error text that says how to fix it otherwise.
Values that are ``None`` (inputs linked from another node: ComfyUI passes them as None to
``validate_inputs``) are skipped; execute-time code calls the same functions with real values and raises.
Ranges are not here: they come from the specs (``schema.check_inputs``). The cache rules (window and
routing) are ``sf_model.window``'s, the step list's ``sf_model.schedule.parse_steps``.
"""

from __future__ import annotations

import numbers
from typing import Iterable

from ..sf_model.latent_format import TEMPORAL_STRIDE
from ..sf_model.schedule import parse_steps

SIZE_MULTIPLE = 16  # Wan: VAE stride 8 x DiT patch 2


def _nearest(candidates: Iterable[int], minimum: int) -> str:
    return " or ".join(str(x) for x in sorted({x for x in candidates if x >= minimum}))


def not_a_number(name: str, value) -> str | None:
    """The error for a value that is not a number (plain Python callers; the nodes' specs say it first)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{name} must be a number, got {value!r}"
    return None


def check_length(length: int | None) -> str | None:
    """A Wan video length must be 4k+1 frames."""
    if length is None:
        return None
    if err := not_a_number("length", length):
        return err
    if length < 1:
        return f"length {length} must be at least 1 frame (use 1, 5, ..., 81)"
    if (length - 1) % TEMPORAL_STRIDE:
        lo = length - (length - 1) % TEMPORAL_STRIDE
        return (f"length {length} is not 4k+1 (Wan packs 4 frames per latent frame plus the first); "
                f"use {_nearest((lo, lo + TEMPORAL_STRIDE), 1)}")
    return None


def check_size(name: str, value: int | None, multiple: int = SIZE_MULTIPLE) -> str | None:
    """Pixel width/height must be a positive multiple of ``multiple`` (16 for Wan)."""
    if value is None:
        return None
    if err := not_a_number(name, value):
        return err
    if value < multiple:
        return f"{name} {value} is too small; use at least {multiple}"
    if value % multiple:
        lo = value - value % multiple
        return f"{name} {value} is not a multiple of {multiple}; use {_nearest((lo, lo + multiple), multiple)}"
    return None


def check_extend_frames(frames: int | None) -> str | None:
    """Frames added by an extension: whole latent frames, i.e. a positive multiple of 4."""
    if frames is None:
        return None
    if err := not_a_number("extend_frames", frames):
        return err
    if frames < TEMPORAL_STRIDE:
        return f"extend_frames {frames} is too small; add at least {TEMPORAL_STRIDE} frames"
    if frames % TEMPORAL_STRIDE:
        lo = frames - frames % TEMPORAL_STRIDE
        return (f"extend_frames {frames} is not a multiple of {TEMPORAL_STRIDE} (one latent frame = "
                f"{TEMPORAL_STRIDE} video frames); use {_nearest((lo, lo + TEMPORAL_STRIDE), TEMPORAL_STRIDE)}")
    return None


def check_steps(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parse_steps(text)
    except ValueError as e:
        return str(e)
    return None


def all_errors(*errors: str | None) -> str | None:
    """Every given error once, '; ' between them; None when there is none."""
    found = list(dict.fromkeys(e for e in errors if e))
    return "; ".join(found) if found else None


def first_error(*errors: str | None) -> str | None:
    for e in errors:
        if e:
            return e
    return None
