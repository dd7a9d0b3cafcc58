"""The pack inside ComfyUI: every node class, the V3 extension, and the few ComfyUI services they use.

Imported only inside ComfyUI (the package root's ``comfy_entrypoint`` returns ``SelfForcingExtension``).
Each node class is thin: its schema is built from its spec and ``execute`` calls the plain functions of the
node's subject module (``model``, ``long_video``, ``sampling``, ``live``, ``text``, ``toy``); its
``validate_inputs`` is ``schema.validate_node`` of the spec (``check_inputs``, raised so that ComfyUI reports it
once). Uses the public V3 API (``comfy_api.latest``) and long-stable modules: ``comfy.model_management``,
``comfy.utils.ProgressBar``, ``folder_paths``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui

try:  # ModelPatcher's callback types (ComfyUI >= 0.3.10); without them kept speed-up memory goes at the next run
    from comfy.patcher_extension import CallbacksMP
    DETACH = CallbacksMP.ON_DETACH
except (ImportError, AttributeError):
    DETACH = None

from ..sf_model import weights
from ..sf_model.latent_format import SPATIAL_STRIDE, TEMPORAL_STRIDE, latent_frames
from ..sf_model.schedule import DEFAULT_STEPS_TEXT
from .core_model import CORE_DTYPES, CORE_LOADER, core_model_from_file, describe_core, model_handle
from .core_run import core_run_bytes, release_on_detach
from .decode import StreamDecode, VaeViews, check_wan21_state_dict
from .latent import latent_space
from .live import EVENT, LIVE, LiveFrameOptions, LiveFrameSender
from .long_video import OPTIONS, SCHEDULE, LongVideoOptions, add_prompt
from .model import (LOADER, LORA_FOLDER, MODEL_FOLDER, NO_LORA, describe, load_handle, loader_key, lora_choices,
                    missing_model_message, model_choices, resolve_devices, wants_lora)
from .sampling import EXTEND, SAMPLER, RunHooks, extend_video, sample_video
from .schema import InputSpec, NodeSpec, OutputSpec, check_values, validate_node
from .text import (LOAD_EMBEDS, SAVE_EMBEDS, TEXT_EMBEDS, conditioning_from_context, read_embeds,
                   register_text_embeds_folder, save_embeds, save_folder, tensor_of)
from .toy import (TOY_DECODE, TOY_ENCODE, TOY_LOADER, decode_toy_latent, describe_toy, encode_toy_prompt, require_toy,
                  toy_model_path)

log = logging.getLogger("self_forcing")
PREVIEW_MAX_SIZE = 512

_CUSTOM = {}


def socket(io_type: str):
    """The io class of a socket type: core types where core has one, ``io.Custom`` otherwise."""
    core = {"LATENT": io.Latent, "CONDITIONING": io.Conditioning, "STRING": io.String, "INT": io.Int,
            "FLOAT": io.Float, "BOOLEAN": io.Boolean, "IMAGE": io.Image, "VIDEO": io.Video, "VAE": io.Vae,
            "MODEL": io.Model}
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


def accept_core_model(schema: io.Schema) -> io.Schema:
    """The sampler's 'model' socket also takes a core MODEL (UNETLoader, LoRA nodes): type
    'SELF_FORCING_MODEL,MODEL', so saved workflows' links keep validating."""
    schema.inputs = [io.MultiType.Input(i, types=[io.Model]) if i.id == "model" else i for i in schema.inputs]
    return schema


def core_loader(hooks: RunHooks, run: dict | None = None):
    """How a core MODEL is loaded for a run (``core_model.borrowed_handle``). Without patches ComfyUI decides,
    asked once for the run's memory (``core_run_bytes``): it loads what fits, the other linear layers stay on its
    offload device, streamed per layer (``core_model.bind``); nothing is asked later (ComfyUI could move bound
    weights). With patches (LoRA) or no estimate: fully loaded, then memory for the run freed, as before."""

    def load(patcher) -> None:
        need = None if getattr(patcher, "patches", None) else core_run_bytes(patcher, run)
        release_on_detach(patcher, DETACH)
        if need is not None:
            mm.load_models_gpu([patcher], memory_required=int(need * 1.1))
            hooks.free_memory = None  # asked for above
            return
        mm.load_models_gpu([patcher], force_full_load=True)

        def free_memory(nbytes: int, device: torch.device) -> None:
            if device.type != "cpu":
                mm.load_models_gpu([patcher], memory_required=int(nbytes * 1.1), force_full_load=True)

        hooks.free_memory = free_memory

    return load


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


# -- the nodes ------------------------------------------------------------------------------------------
def _model_path(name: str, download: bool) -> str:
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is not None:
        return path
    official = weights.official_file(name)
    folder = weights.preferred_dir(folder_paths.get_folder_paths(MODEL_FOLDER), MODEL_FOLDER)
    if official is None:
        raise ValueError(f"model '{name}' was not found in {folder}; put the checkpoint there (or pick another "
                         "file) and refresh")
    if not download:
        raise ValueError(missing_model_message(official, folder))
    weights.ensure_files([official], lambda f: weights.preferred_dir(folder_paths.get_folder_paths(f.folder), f.folder),
                         log=log.info)
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        raise ValueError(f"'{name}' was downloaded but ComfyUI cannot find it in {folder}")
    return path


def _lora_path(name: str) -> str:
    path = folder_paths.get_full_path(LORA_FOLDER, name)
    if path is None:
        raise ValueError(f"LoRA '{name}' was not found in {', '.join(folder_paths.get_folder_paths(LORA_FOLDER))}; "
                         "put it there (or pick another file, or none) and refresh")
    return path


class SelfForcingModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        files = folder_paths.get_filename_list(MODEL_FOLDER)
        return build_schema(LOADER, {"model_name": model_choices(files, weights.official_names(MODEL_FOLDER)),
                                     "lora_name": lora_choices(folder_paths.get_filename_list(LORA_FOLDER))})

    @classmethod
    def validate_inputs(cls, device=None, lora_strength=None):
        return validate_node(LOADER, device=device, lora_strength=lora_strength)

    @classmethod
    def fingerprint_inputs(cls, model_name: str = "", lora_name: str = NO_LORA, lora_strength: float = 1.0,
                           **settings):
        # With the inputs, ComfyUI's cache key: a kept handle is reused only for the same model and LoRA files
        # (a file rewritten under its name reloads) at the same strength.
        lora = None
        if wants_lora(lora_name, lora_strength):
            lora = folder_paths.get_full_path(LORA_FOLDER, lora_name) or lora_name
        model = folder_paths.get_full_path(MODEL_FOLDER, model_name) or model_name
        return loader_key(model, lora, lora_strength, **settings)

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto", attention: str = "auto", device: str = "default",
                keep_loaded: bool = False, download_if_missing: bool = False, lora_name: str = NO_LORA,
                lora_strength: float = 1.0) -> io.NodeOutput:
        check_values(LOADER, lora_strength=lora_strength)
        load_device, offload_device = resolve_devices(device, mm.get_torch_device(), mm.unet_offload_device())
        lora = _lora_path(lora_name) if wants_lora(lora_name, lora_strength) else None
        path = _model_path(model_name, download_if_missing)
        rest = load_device if keep_loaded else offload_device
        if rest.type != "cpu":
            mm.free_memory(int(os.path.getsize(path) * 1.2), rest)
        mm.soft_empty_cache()
        handle = load_handle(path, model_name, dtype=dtype, attention=attention, load_device=load_device,
                             offload_device=offload_device, keep_loaded=keep_loaded,
                             supports_bf16=mm.should_use_bf16(load_device), lora=lora, lora_strength=lora_strength,
                             lora_name=lora_name)
        info = describe(handle)
        log.info("Self Forcing model %s:\n%s", model_name, info)
        return io.NodeOutput(handle, info, ui=ui.PreviewText(info))


class SelfForcingCoreModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        return build_schema(CORE_LOADER, {"model_name": folder_paths.get_filename_list(MODEL_FOLDER)})

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        # Our reader (every layout), then core's public builder: one copy of the weights, core's.
        import comfy.sd  # core's model builder, needed by this node only

        patcher = core_model_from_file(_model_path(model_name, False), build=comfy.sd.load_diffusion_model_state_dict,
                                       dtype=CORE_DTYPES[weight_dtype])
        info = describe_core(patcher)
        log.info("Self Forcing model %s as core MODEL:\n%s", model_name, info)
        return io.NodeOutput(patcher, info, ui=ui.PreviewText(info))


class SelfForcingLongVideoOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(OPTIONS)

    @classmethod
    def validate_inputs(cls, cache=None, window=None, sink=None, routing_topk=None, positions=None, kv_fp8=None):
        return validate_node(OPTIONS, cache=cache, window=window, sink=sink, routing_topk=routing_topk,
                             positions=positions, kv_fp8=kv_fp8)

    @classmethod
    def execute(cls, cache: str = "rolling", window: int = 21, sink: int = 3, routing_topk: int = 0,
                positions: str = "absolute", kv_fp8: bool = False) -> io.NodeOutput:
        return io.NodeOutput(LongVideoOptions(cache=cache, window=window, sink=sink, routing_topk=routing_topk,
                                              positions=positions, kv_fp8=kv_fp8).check())


class SelfForcingPromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SCHEDULE)

    @classmethod
    def validate_inputs(cls, start_frame=None, switch=None):
        return validate_node(SCHEDULE, start_frame=start_frame, switch=switch)

    @classmethod
    def execute(cls, previous, conditioning, start_frame: int = 40, switch: str = "recache") -> io.NodeOutput:
        check_values(SCHEDULE, start_frame=start_frame, switch=switch)  # linked values never reached validate_inputs
        return io.NodeOutput(add_prompt(previous, conditioning, int(start_frame), switch))


def _latent(samples, model) -> dict:
    """The LATENT dict in the model's format (toy latents are tagged as such)."""
    return latent_space(model).wrap(samples.to(mm.intermediate_device()))


def _batch_and_size(tensor, batch: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """(batch, latent height, latent width) for the decode memory estimate; the logic checks the inputs."""
    if hasattr(tensor, "shape") and len(tensor.shape) == 5:
        return int(tensor.shape[0]), int(tensor.shape[3]), int(tensor.shape[4])
    return batch, *size


def _outputs(result, node_name: str, model) -> io.NodeOutput:
    """(LATENT, IMAGE): the IMAGE is the decoded video, or blocks its users when nothing was decoded."""
    if isinstance(result, tuple):
        samples, images = result
        return io.NodeOutput(_latent(samples, model), images.to(mm.intermediate_device()))
    return io.NodeOutput(_latent(result, model), image_output_blocked(node_name, toy=latent_space(model).is_toy))


class SelfForcingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return accept_core_model(build_schema(SAMPLER))

    @classmethod
    def validate_inputs(cls, width=None, height=None, length=None, frames_per_block=None, steps=None, shift=None,
                        context_noise=None):
        # Linked inputs arrive as None; naming an input here switches off core's min/max check for it, so the
        # spec's ranges are checked here too. A problem raises (core reports a returned text once per input).
        return validate_node(SAMPLER, width=width, height=height, length=length, frames_per_block=frames_per_block,
                             steps=steps, shift=shift, context_noise=context_noise)

    @classmethod
    def execute(cls, model, positive, width: int, height: int, length: int, seed: int, frames_per_block: int = 3,
                steps: str = DEFAULT_STEPS_TEXT, shift: float = 5.0, context_noise: float = 0.0,
                options=None, vae=None, live_frames=None) -> io.NodeOutput:
        # Linked values never reached validate_inputs: the spec's limits, checked before anything uses them.
        check_values(SAMPLER, width=width, height=height, length=length, seed=seed, frames_per_block=frames_per_block,
                     shift=shift, context_noise=context_noise)
        decode = None
        if vae is not None:
            prompt = positive[0][0] if positive and positive[0] else None
            batch = int(prompt.shape[0]) if hasattr(prompt, "shape") else 1
            decode = stream_decode(vae, batch=batch, frames_per_block=frames_per_block,
                                   latent_height=height // SPATIAL_STRIDE, latent_width=width // SPATIAL_STRIDE,
                                   live=live_frames)
        hooks = run_hooks()
        prompt = positive[0][0] if positive and positive[0] else None
        run = dict(frames=latent_frames(length, TEMPORAL_STRIDE), lat_h=height // SPATIAL_STRIDE,
                   lat_w=width // SPATIAL_STRIDE, batch=int(prompt.shape[0]) if hasattr(prompt, "shape") else 1,
                   frames_per_block=frames_per_block, steps=steps, shift=shift, context_noise=context_noise,
                   options=options, decode=decode)
        with model_handle(model, load=core_loader(hooks, run)) as handle:  # ours, or a core MODEL's weights borrowed
            result = sample_video(handle, positive, width=width, height=height, length=length, seed=seed,
                                  frames_per_block=frames_per_block, steps=steps, shift=shift,
                                  context_noise=context_noise, long_video=options, hooks=hooks, decode=decode)
            return _outputs(result, SAMPLER.display_name, handle)


class SelfForcingExtendVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return accept_core_model(build_schema(EXTEND))

    @classmethod
    def validate_inputs(cls, extend_frames=None, history_frames=None, resample_strength=None, frames_per_block=None,
                        steps=None, shift=None, context_noise=None):
        return validate_node(EXTEND, extend_frames=extend_frames, history_frames=history_frames,
                             resample_strength=resample_strength, frames_per_block=frames_per_block, steps=steps,
                             shift=shift, context_noise=context_noise)

    @classmethod
    def execute(cls, model, positive, latent, extend_frames: int, history_frames: int, resample_strength: float,
                seed: int, frames_per_block: int = 3, steps: str = DEFAULT_STEPS_TEXT, shift: float = 5.0,
                context_noise: float = 0.0, output: str = "joined", options=None, vae=None,
                live_frames=None) -> io.NodeOutput:
        check_values(EXTEND, extend_frames=extend_frames, history_frames=history_frames,
                     resample_strength=resample_strength, seed=seed, frames_per_block=frames_per_block, shift=shift,
                     context_noise=context_noise, output=output)  # linked values never reached validate_inputs
        decode = None
        if vae is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else latent
            batch, h, w = _batch_and_size(samples, 1, (60, 104))
            decode = stream_decode(vae, batch=batch, frames_per_block=frames_per_block, latent_height=h,
                                   latent_width=w, live=live_frames)
        hooks = run_hooks()
        samples = latent.get("samples") if isinstance(latent, dict) else latent
        run = None if getattr(samples, "ndim", 0) != 5 else dict(
            frames=samples.shape[2] + extend_frames // TEMPORAL_STRIDE, lat_h=samples.shape[3],
            lat_w=samples.shape[4], batch=samples.shape[0], frames_per_block=frames_per_block, steps=steps,
            shift=shift, context_noise=context_noise, options=options, decode=decode)
        with model_handle(model, load=core_loader(hooks, run)) as handle:  # ours, or a core MODEL's weights borrowed
            result = extend_video(handle, positive, latent, extend_frames=extend_frames,
                                  history_frames=history_frames, resample_strength=resample_strength, seed=seed,
                                  frames_per_block=frames_per_block, steps=steps, shift=shift,
                                  context_noise=context_noise, output=output, long_video=options, hooks=hooks,
                                  decode=decode)
            return _outputs(result, EXTEND.display_name, handle)


class SelfForcingLiveFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(LIVE)

    @classmethod
    def validate_inputs(cls, every_nth=None, max_size=None, format=None, quality=None):
        return validate_node(LIVE, every_nth=every_nth, max_size=max_size, format=format, quality=quality)

    @classmethod
    def execute(cls, send: bool = True, every_nth: int = 1, max_size: int = 512, format: str = "jpeg",
                quality: int = 85) -> io.NodeOutput:
        return io.NodeOutput(LiveFrameOptions(send=send, every_nth=every_nth, max_size=max_size, format=format,
                                              quality=quality).check())


class SelfForcingSaveTextEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        return build_schema(SAVE_EMBEDS)

    @classmethod
    def execute(cls, conditioning, filename_prefix: str = "prompt", folder: str = TEXT_EMBEDS) -> io.NodeOutput:
        ensure_folders()
        path, rel = save_embeds(save_folder(folder_paths, folder), filename_prefix, tensor_of(conditioning),
                                meta={"saved_by": "SelfForcingSaveTextEmbeds"})
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel}\n({path})"))


class SelfForcingLoadTextEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        return build_schema(LOAD_EMBEDS, {"embeds_name": folder_paths.get_filename_list(TEXT_EMBEDS)})

    @classmethod
    def fingerprint_inputs(cls, embeds_name: str):
        path = folder_paths.get_full_path(TEXT_EMBEDS, embeds_name)
        return os.path.getmtime(path) if path else embeds_name

    @classmethod
    def execute(cls, embeds_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path(TEXT_EMBEDS, embeds_name)
        if path is None:
            raise ValueError(f"text embeddings '{embeds_name}' not found in "
                             f"{', '.join(folder_paths.get_folder_paths(TEXT_EMBEDS))}; save them first with "
                             "'Save Text Embeddings'")
        return io.NodeOutput(conditioning_from_context(read_embeds(path, embeds_name)))


class SelfForcingToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TOY_LOADER)

    @classmethod
    def validate_inputs(cls, device=None):
        return validate_node(TOY_LOADER, device=device)

    @classmethod
    def execute(cls, model_name: str, device: str = "default") -> io.NodeOutput:
        load_device, _ = resolve_devices(device, mm.get_torch_device(), mm.get_torch_device())
        path = toy_model_path(model_name)
        # About 12 MB of fp32 weights: kept where they run (no offloading between runs), in fp32 as trained.
        handle = load_handle(path, model_name, dtype="fp32", attention="sdpa", load_device=load_device,
                             offload_device=load_device, keep_loaded=True, supports_bf16=False)
        require_toy(handle, TOY_LOADER.display_name)
        info = describe_toy(handle)
        log.info("Self Forcing toy model %s:\n%s", model_name, info)
        return io.NodeOutput(handle, info, ui=ui.PreviewText(info))


class SelfForcingToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TOY_ENCODE)

    @classmethod
    def execute(cls, model, text: str) -> io.NodeOutput:
        return io.NodeOutput(encode_toy_prompt(model, text))


class SelfForcingToyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TOY_DECODE)

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        return io.NodeOutput(decode_toy_latent(model, latent).to(mm.intermediate_device()))


# -- the extension --------------------------------------------------------------------------------------
NODES: list[type[io.ComfyNode]] = [
    SelfForcingModelLoader,
    SelfForcingCoreModelLoader,
    SelfForcingSampler,
    SelfForcingExtendVideo,
    SelfForcingLongVideoOptions,
    SelfForcingPromptSchedule,
    SelfForcingLiveFrames,
    SelfForcingSaveTextEmbeds,
    SelfForcingLoadTextEmbeds,
    SelfForcingToyModelLoader,
    SelfForcingToyTextEncode,
    SelfForcingToyDecode,
]


class SelfForcingExtension(ComfyExtension):
    async def on_load(self) -> None:
        ensure_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Some cores build schemas (which list model files) without calling on_load first.
        ensure_folders()
        return list(NODES)
