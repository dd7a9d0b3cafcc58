"""The few ComfyUI services the nodes use, and the spec -> ``io.Schema`` builder.

Imported only inside ComfyUI. Uses the public V3 API (``comfy_api.latest``) and long-stable modules:
``comfy.model_management``, ``comfy.utils.ProgressBar``, ``folder_paths``.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from .logic_decode import StreamDecode, VaeViews, check_wan21_state_dict
from .logic_live import EVENT, LiveFrameOptions, LiveFrameSender
from .logic_paths import register_text_embeds_folder
from .logic_sampling import RunHooks
from .specs import InputSpec, NodeSpec, OutputSpec

log = logging.getLogger("self_forcing")
PREVIEW_MAX_SIZE = 512

_CUSTOM = {}


def socket(io_type: str):
    """The io class of a socket type: core types where core has one, ``io.Custom`` otherwise."""
    core = {"LATENT": io.Latent, "CONDITIONING": io.Conditioning, "STRING": io.String, "INT": io.Int,
            "FLOAT": io.Float, "BOOLEAN": io.Boolean, "IMAGE": io.Image, "VIDEO": io.Video, "VAE": io.Vae}
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


# -- decode as you go ---------------------------------------------------------------------------------
_VAE_VIEWS = VaeViews()  # our WanVAE per core VAE object (weak keys), bound to its weights for each run


def _vae_state_dict(vae) -> dict:
    """The core VAE's weights: ``VAE.get_sd()`` (ComfyUI 0.3.64 and later), else its first_stage_model."""
    get_sd = getattr(vae, "get_sd", None)
    if callable(get_sd):
        return get_sd()
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ValueError("the 'vae' input is not a loaded VAE; connect VAELoader with wan_2.1_vae.safetensors")
    return model.state_dict()


def _executing(node_id: str | None) -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node being executed."""
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None:
            return ctx.prompt_id, ctx.node_id
    except ImportError:  # cores before the execution context existed
        pass
    import server

    return getattr(server.PromptServer.instance, "last_prompt_id", None), node_id


def live_sender(options: LiveFrameOptions | None, node_id: str | None = None) -> LiveFrameSender | None:
    """Sends each decoded chunk to the client that queued the prompt (never broadcast: no client id, no
    events)."""
    options = (options or LiveFrameOptions()).check()
    if not options.send:
        return None
    import server

    instance = server.PromptServer.instance
    sid = instance.client_id
    if sid is None:
        return None
    prompt_id, node = _executing(node_id)
    return LiveFrameSender(lambda data: instance.send_sync(EVENT, data, sid), options, prompt_id=prompt_id,
                           node=node)


def stream_decode(vae, *, batch: int, frames_per_block: int, latent_height: int, latent_width: int,
                  live: LiveFrameOptions | None) -> StreamDecode:
    """Decode-as-you-go settings for a core VAE (checked to be a Wan 2.1 VAE before anything runs)."""
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    check_wan21_state_dict(_vae_state_dict(vae))
    shape = (batch, 16, frames_per_block, latent_height, latent_width)
    try:  # core's Wan 2.1 estimate (generous: it covers about 3 latent frames at once), per started 3 frames
        reserve = int(vae.memory_used_decode(shape, vae.vae_dtype)) * -(-frames_per_block // 3)
    except Exception:  # noqa: BLE001 - an estimate only
        reserve = 0

    @contextmanager
    def open_vae(device: torch.device):
        same = torch.device(vae.device) == device
        if same and device.type != "cpu":  # let ComfyUI load it (and account for it) like VAEDecode does
            mm.load_models_gpu([vae.patcher], memory_required=reserve,
                               force_full_load=getattr(vae, "disable_offload", False))
        dtype = torch.float32 if device.type == "cpu" else vae.vae_dtype
        with _VAE_VIEWS.bind(vae, _vae_state_dict(vae), device, dtype) as ours:
            yield ours

    return StreamDecode(open_vae, reserve_bytes=reserve, sender=live_sender(live))


def image_output_blocked(node_name: str, toy: bool = False):
    """What the IMAGE output holds without a VAE: any node using it stops with this message."""
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ImportError:  # older cores
        from comfy_execution.graph import ExecutionBlocker
    if toy:
        return ExecutionBlocker(f"the IMAGE output of '{node_name}' stays empty for a self-contained toy model; "
                                "decode its LATENT output with 'Self Forcing Toy Decode' (same model) instead")
    return ExecutionBlocker(f"the IMAGE output of '{node_name}' is filled only when a VAE is connected to its "
                            "'vae' input (decode as it goes); connect VAELoader (wan_2.1_vae.safetensors) there, "
                            "or decode its LATENT output with VAE Decode")
