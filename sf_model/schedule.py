"""Flow-matching schedule of Self Forcing: shifted sigmas, warped few-step lists, noising, flow -> x0.

The official code builds a 1000-entry table ``sigma_i = shift(1 - i/1000)`` (float32, sigma_min 0) with
``shift(s) = k s / (1 + (k - 1) s)`` and timesteps ``1000 sigma``; a nominal step list such as
[1000, 750, 500, 250] is *warped* by reading that table at ``1000 - step``, which with shift 5 gives
[1000, 937.5, 833.33, 625]. Sigmas of arbitrary timesteps are the nearest table entry (as its
``add_noise`` does). The model predicts the flow ``noise - x0``; x0 = x_t - sigma * flow.
"""

from __future__ import annotations

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


def make_steps(steps=DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, warp: bool = True) -> list[Step]:
    """The denoising steps. With ``warp`` the nominal integers in (0, 1000] index the shifted table."""
    steps = [float(s) for s in steps]
    if not steps:
        raise ValueError("the step list is empty; the default is 1000, 750, 500, 250")
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


def parse_steps(text: str) -> list[int]:
    """'1000, 750, 500, 250' -> [1000, 750, 500, 250] with a clear error for anything else."""
    try:
        values = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"steps must be comma-separated integers such as '1000, 750, 500, 250', got '{text}'") from e
    make_steps(values)  # validates
    return values


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Rectified-flow noising: (1 - sigma) x0 + sigma noise. sigma: float or tensor broadcastable to x0."""
    return (1 - sigma) * x0 + sigma * noise


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - sigma * flow


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    return (x_t - x0) / sigma
