"""What a run on a core MODEL asks of ComfyUI, without importing ComfyUI: the device memory it needs besides the
weights (``core_run_bytes``, for ``comfy.model_management.load_models_gpu``'s ``memory_required``), and letting go
of what our CUDA speed-ups keep between runs when ComfyUI detaches the model (``release_on_detach``).

``nodes.comfy.core_loader`` calls both; the ComfyUI names they need (the detach callback type) are passed in.
"""

from __future__ import annotations

import torch

from ..sf_model.weight_cast import is_float8
from .core_model import (compute_dtype, core_meta, core_state_dict, fused_qkv_bytes, release_speedups,
                         skeleton_for)
from .sampling import run_bytes, run_options

CALLBACK_KEY = "self_forcing"


def core_run_bytes(patcher, run: dict | None) -> int | None:
    """Device bytes a run on a core MODEL needs besides its weights (``sampling.run_bytes`` of ``run``, the node's
    request, plus the fused QKV copy our CUDA speed-ups add for plain weights on a CUDA device), or None where
    ``run`` is missing or invalid (the run itself then names the problem)."""
    if run is None:
        return None
    decode, dm = run.get("decode"), patcher.model.diffusion_model
    try:
        cfg = skeleton_for(dm, core_state_dict(dm)[0], "auto").config  # the skeleton the run binds (cached)
        opts = run_options(run["frames_per_block"], run["steps"], run["shift"], run["context_noise"], run["options"],
                           total_frames=run["frames"], meta=core_meta(patcher), rope_max_frames=cfg.rope_max_frames)
    except ValueError:  # CheckpointError too
        return None
    dtype = compute_dtype(patcher)
    need = run_bytes(cfg, opts, run["frames"], run["lat_h"], run["lat_w"], run["batch"], dtype)
    if torch.device(patcher.load_device).type == "cuda" and not is_float8(patcher.model_dtype()):
        need += fused_qkv_bytes(cfg, dtype)
    return need + (decode.reserve_bytes if decode is not None else 0)


def release_on_detach(patcher, call_type: str | None) -> bool:
    """Make ComfyUI's detach of this model (it unloads it: ``ModelPatcher.detach`` runs its ``call_type``
    callbacks) drop what our CUDA speed-ups keep between runs for its diffusion model (``release_speedups``:
    the fused QKV copy and the CUDA-graph recordings with their memory pool, which ComfyUI does not count).
    Registered under one key, so repeated runs do not pile up callbacks. Returns whether it was registered
    (False where the patcher has no keyed callbacks or ``call_type`` is None: then the kept memory goes when the
    next run finds the weights moved, or with the model)."""
    add = getattr(patcher, "add_callback_with_key", None)
    remove = getattr(patcher, "remove_callbacks_with_key", None)
    if call_type is None or add is None or remove is None:
        return False
    remove(call_type, CALLBACK_KEY)
    add(call_type, CALLBACK_KEY, _on_detach)
    return True


def _on_detach(patcher, unpatch_all: bool = True, *_) -> bool:
    """ComfyUI calls ``callback(patcher, unpatch_all)``. ``unpatch_all`` False is ``load_models_gpu`` detaching a
    loaded model (the same patcher too) only to load it again, at every load, also from within a run
    (``free_memory``): the weights stay where they are, so the kept speed-ups stay (a later move of the weights
    is caught by ``core_model.fingerprint``). True: ComfyUI unloads the model."""
    return release_speedups(patcher.model.diffusion_model) if unpatch_all else False
