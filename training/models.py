"""Building, initialising, saving and loading the DiTs of the trainer (teacher, critic, student).

All three share one architecture (a ``CausalWanModel``); the teacher and the critic run it bidirectionally
(``frames_per_block=None``), the student block-causally. Stage outputs are safetensors written with
``sf_model.checkpoint.save_model`` (bare Wan keys + our metadata, with ``role`` saying which model it is),
so every stage's output also loads in the nodes and the CLI.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..sf_model.checkpoint import check_compatible, load_model, load_state_dict_file, save_model
from ..sf_model.config import WanConfig
from ..sf_model.model import CausalWanModel


def init_wan_weights(model: CausalWanModel, seed: int) -> CausalWanModel:
    """Wan's initialisation for training from scratch: Xavier-uniform linears and patch embedding,
    N(0, 0.02) text/time embeddings, zero biases, a zero output head (the first prediction is 0)."""
    g = torch.Generator().manual_seed(int(seed))

    def xavier_(w: torch.Tensor) -> None:
        fan_out, fan_in = w.shape[0], w[0].numel()
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                xavier_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        for seq in (model.text_embedding, model.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for blk in model.blocks:
            blk.modulation.copy_(torch.randn(blk.modulation.shape, generator=g) / model.config.dim ** 0.5)
        model.head.modulation.copy_(torch.randn(model.head.modulation.shape, generator=g) / model.config.dim ** 0.5)
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    return model


def build_model(config: WanConfig, seed: int, device: torch.device) -> CausalWanModel:
    """A freshly initialised float32 model on ``device`` (same weights for the same seed everywhere)."""
    model = CausalWanModel(config, attn_backend="sdpa")
    init_wan_weights(model, seed)
    return model.to(device=device, dtype=torch.float32)


def empty_model(config: WanConfig, device: torch.device, dtype: torch.dtype,
                attn_backend: str = "sdpa") -> CausalWanModel:
    """An uninitialised model allocated directly in ``dtype`` on ``device`` (built on the meta device
    first: no float32 copy of the weights ever exists)."""
    with torch.device("meta"):
        model = CausalWanModel(config, attn_backend=attn_backend)
    return model.to(dtype=dtype).to_empty(device=device)


def load_dit(path: str, device: torch.device, trainable: bool = False, *,
             dtype: torch.dtype = torch.float32) -> tuple[CausalWanModel, dict]:
    """Load any checkpoint sf_model reads as a model in ``dtype`` (float32 by default); returns
    (model, metadata). Another ``dtype`` (e.g. bfloat16 for the frozen real score) is allocated in that
    dtype from the start and filled tensor by tensor, never as a float32 model first."""
    if dtype == torch.float32:
        loaded = load_model(path, device=device, dtype=torch.float32, attn_backend="sdpa")
        model, meta = loaded.model, loaded.meta
    else:
        sd, config, _layout, meta, _extras = load_state_dict_file(path)
        model = empty_model(config, device, dtype)
        check_compatible(model, sd, source=path)
        model.load_state_dict(sd, strict=True)  # copy_ per tensor, converting to dtype
        del sd
        model = model.eval().requires_grad_(False)
    if trainable:
        model.train().requires_grad_(True)
    return model, meta


def frozen_copy(model: CausalWanModel, *, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> CausalWanModel:
    """A non-trainable copy (the real score), by default in the model's dtype and device. With ``dtype``
    or ``device`` the copy is allocated there directly and filled tensor by tensor (a bfloat16 copy of a
    float32 model never holds a second float32 model)."""
    import copy

    if dtype is None and device is None:
        return copy.deepcopy(model).eval().requires_grad_(False)
    out = empty_model(model.config, device or model.device, dtype or model.dtype, model.attn_backend_request)
    out.load_state_dict(model.state_dict(), strict=True)
    return out.eval().requires_grad_(False)


def save_dit(path: str, model: nn.Module, config: WanConfig, role: str, meta: dict | None = None,
             dtype: torch.dtype | None = None, extras: dict | None = None) -> None:
    """Write a stage's model (atomic, via ``save_model``) with ``role`` in the metadata."""
    save_model(path, model, config, meta={"role": role, **(meta or {})}, dtype=dtype, extras=extras)
