"""Random-weight models of any Wan size for the benchmarks (memory and time do not depend on the values).

A model is built on the meta device and allocated directly in its dtype on its device
(``training.models.empty_model``: no float32 copy of a 14B model ever exists), then filled there by a fast
on-device random init: matrices uniform with Xavier bounds (the output head scaled by 0.1), norm gains 1,
biases 0, modulations N(0, 1/dim). Values only need to be finite and of sane size; the same seed gives the
same values on every process of a device kind.

Imported by the benchmark scripts as ``self_forcing.benchmarks.wan_random`` (the repository root is the
package), which also works when a test loads a script by its path.
"""

from __future__ import annotations

import torch

from self_forcing.sf_model.config import WanConfig
from self_forcing.sf_model.model import CausalWanModel


@torch.no_grad()
def random_init_(model: CausalWanModel, seed: int = 0) -> CausalWanModel:
    """Fill every parameter of ``model`` in place on its own device (see the module docstring); returns it."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(int(seed))
    dim = model.config.dim
    for name, p in model.named_parameters():
        if "modulation" in name:
            p.normal_(0.0, dim ** -0.5, generator=g)
        elif p.ndim >= 2:
            fan_out, fan_in = p.shape[0], p[0].numel()
            bound = (6.0 / (fan_in + fan_out)) ** 0.5 * (0.1 if name.startswith("head.") else 1.0)
            p.uniform_(-bound, bound, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return model


def random_model(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 attn_backend: str = "sdpa") -> CausalWanModel:
    """A random ``CausalWanModel`` of ``config`` allocated in ``dtype`` on ``device`` and filled there."""
    from self_forcing.training.models import empty_model

    return random_init_(empty_model(config, device, dtype, attn_backend=attn_backend), seed)
