"""Flow-matching schedule of Self Forcing: shifted sigmas, warped few-step lists, noising.

The official code builds a 1000-entry table ``sigma_i = shift(1 - i/1000)`` (float32, sigma_min 0) with
``shift(s) = k s / (1 + (k - 1) s)`` and timesteps ``1000 sigma``; a nominal step list such as
[1000, 750, 500, 250] is *warped* by reading that table at ``1000 - step``, which with shift 5 gives
[1000, 937.5, 833.33, 625]. Sigmas of arbitrary timesteps are the nearest table entry (as its
``add_noise`` does). The model predicts the flow ``noise - x0``; x0 = x_t - sigma * flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_STEPS = (1000, 750, 500, 250)
DEFAULT_SHIFT = 5.0


def shift_sigma(sigma, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


@lru_cache(maxsize=16)
def sigma_table(shift: float) -> torch.Tensor:
    """The 1000 shifted training sigmas (float32, descending from 1), as the official scheduler builds them."""
    sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    return shift_sigma(sigmas, shift)


def timestep_table(shift: float) -> torch.Tensor:
    return sigma_table(shift) * NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class Step:
    timestep: float  # what the model's time embedding sees
    sigma: float     # noise level: x_t = (1 - sigma) x0 + sigma noise


def sigma_for_timestep(t: float, shift: float) -> float:
    """The table's sigma nearest to timestep ``t`` (0 maps to sigma 0)."""
    if t <= 0:
        return 0.0
    table = timestep_table(shift)
    i = int(torch.argmin((table - float(t)).abs()))
    return float(sigma_table(shift)[i])


def finite_number(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` (NaN, Inf and non-numbers are refused)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return number


def make_steps(steps=DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, warp: bool = True) -> list[Step]:
    """The denoising steps. With ``warp`` the nominal integers in (0, 1000] index the shifted table."""
    if isinstance(steps, (str, bytes)):
        raise ValueError(f"steps must be a list of timesteps, got the text {steps!r} (see parse_steps)")
    steps = [finite_number("every step", s) for s in steps]
    if not steps:
        raise ValueError(f"the step list is empty; the default is {format_steps(DEFAULT_STEPS)}")
    shift = finite_number("shift", shift)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be strictly decreasing, got {steps}")
    if any(not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps):
        raise ValueError(f"steps must lie in (0, 1000], got {steps}")
    if not warp:
        return [Step(s, sigma_for_timestep(s, shift)) for s in steps]
    out = []
    for s in steps:
        if s != int(s):
            raise ValueError(f"warped steps index the 1000-entry table and must be integers, got {s}")
        i = NUM_TRAIN_TIMESTEPS - int(s)
        out.append(Step(float(timestep_table(shift)[i]), float(sigma_table(shift)[i])))
    return out


def format_steps(steps=DEFAULT_STEPS) -> str:
    """(1000, 500) -> '1000, 500': how a step list is written in widgets and flags."""
    return ", ".join(str(int(s)) if float(s) == int(s) else str(s) for s in steps)


DEFAULT_STEPS_TEXT = format_steps(DEFAULT_STEPS)


def parse_steps(text: str) -> tuple[int, ...]:
    """'1000, 500' (commas or semicolons) -> (1000, 500); raises ValueError with a
    how-to-fix text for anything else (empty, not a number, not whole, outside (0, 1000], not decreasing)."""
    example = f"'{DEFAULT_STEPS_TEXT}'"
    parts = [p.strip() for p in str(text if text is not None else "").replace(";", ",").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"steps is empty; use e.g. {example}")
    values = []
    for p in parts:
        try:
            f = float(p)
        except ValueError:
            raise ValueError(f"steps: '{p}' is not a number; use comma-separated integers such as {example}") from None
        if f != f or f in (float("inf"), float("-inf")) or f != int(f):
            raise ValueError(f"steps: {p} is not a whole timestep; use integers in 1-{NUM_TRAIN_TIMESTEPS}")
        values.append(int(f))
    bad = [v for v in values if not 0 < v <= NUM_TRAIN_TIMESTEPS]
    if bad:
        raise ValueError(f"steps: {bad[0]} is outside 1-{NUM_TRAIN_TIMESTEPS}; every timestep must be in "
                         f"(0, {NUM_TRAIN_TIMESTEPS}]")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"steps {values} must be strictly decreasing (e.g. {example})")
    return tuple(values)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Rectified-flow noising: (1 - sigma) x0 + sigma noise. sigma: float or tensor broadcastable to x0."""
    return (1 - sigma) * x0 + sigma * noise
