"""The few ComfyUI services the nodes use, and the spec -> ``io.Schema`` builder.

Imported only inside ComfyUI. Uses the public V3 API (``comfy_api.latest``) and long-stable modules:
``comfy.model_management``, ``comfy.utils.ProgressBar``, ``folder_paths``.
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from .logic_paths import register_text_embeds_folder
from .logic_sampling import RunHooks
from .specs import InputSpec, NodeSpec, OutputSpec

log = logging.getLogger("self_forcing")
PREVIEW_MAX_SIZE = 512

_CUSTOM = {}


def socket(io_type: str):
    """The io class of a socket type: core types where core has one, ``io.Custom`` otherwise."""
    core = {"LATENT": io.Latent, "CONDITIONING": io.Conditioning, "STRING": io.String, "INT": io.Int,
            "FLOAT": io.Float, "BOOLEAN": io.Boolean, "IMAGE": io.Image, "VIDEO": io.Video}
    if io_type in core:
        return core[io_type]
    if io_type not in _CUSTOM:
        _CUSTOM[io_type] = io.Custom(io_type)
    return _CUSTOM[io_type]


def ensure_folders() -> None:
    """Register our model folders (idempotent; also run before any schema lists files)."""
    register_text_embeds_folder(folder_paths)


def build_input(spec: InputSpec, options: list | None = None):
    common = dict(optional=spec.optional, tooltip=spec.tooltip)
    if spec.display_name:
        common["display_name"] = spec.display_name
    t = spec.type
    if t == "INT":
        return io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, **common)
    if t == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    if t == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if t == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if t == "COMBO":
        opts = list(options if options is not None else spec.options)
        default = spec.default if spec.default in opts else None
        return io.Combo.Input(spec.name, options=opts, default=default, **common)
    return socket(t).Input(spec.name, **common)


def build_output(spec: OutputSpec):
    return socket(spec.type).Output(display_name=spec.name, tooltip=spec.tooltip)


def build_schema(spec: NodeSpec, dynamic_options: dict[str, list] | None = None) -> io.Schema:
    dynamic_options = dynamic_options or {}
    kwargs = dict(
        node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
        description=spec.description,
        inputs=[build_input(i, dynamic_options.get(i.name)) for i in spec.inputs],
        outputs=[build_output(o) for o in spec.outputs],
        is_output_node=spec.is_output_node,
    )
    fields = {f.name for f in dataclasses.fields(io.Schema)}
    if spec.search_aliases and "search_aliases" in fields:  # newer cores only
        kwargs["search_aliases"] = list(spec.search_aliases)
    return io.Schema(**kwargs)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.numpy())


def run_hooks(total_hint: int = 1) -> RunHooks:
    """Progress bar with previews, interrupt checks and memory management of ComfyUI."""
    bar = comfy.utils.ProgressBar(total_hint)

    def progress(done: int, total: int, preview) -> None:
        shown = ("JPEG", _to_pil(preview), PREVIEW_MAX_SIZE) if preview is not None else None
        bar.update_absolute(done, total, shown)

    def free_memory(nbytes: int, device: torch.device) -> None:
        if device.type != "cpu":
            mm.free_memory(int(nbytes * 1.1), device)

    return RunHooks(progress=progress, check_cancel=mm.throw_exception_if_processing_interrupted,
                    free_memory=free_memory, empty_cache=mm.soft_empty_cache)
