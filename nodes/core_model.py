"""Core MODEL input: run our stream sampler on the Wan 2.1 diffusion model inside a ComfyUI core MODEL
(a ``ModelPatcher``, e.g. from core UNETLoader, with LoRAs from core LoraLoaderModelOnly), no ComfyUI import.

ComfyUI loads and patches the weights (``comfy.model_management.load_models_gpu``: LoRA patches are merged into
the diffusion model's weights, and its memory manager accounts for them); this module then *borrows* them for
one run: a ``CausalWanModel`` skeleton (built once per core diffusion model, on the meta device) is bound to the
core model's current tensors, sharing their storage (no copy when dtype and device already match), and
unbound again when the run ends, so nothing of ours keeps the weights alive after the run. Bare Wan names are
ComfyUI's names for the Wan diffusion model (``blocks.0.self_attn.q.weight``, ...), so the keys match one to one.

Weights core stores in float8 (UNETLoader weight_dtype fp8_e4m3fn/fp8_e5m2, or a scaled-fp8 file) are bound as
they are: our linear layers keep them in float8 and cast one layer at a time when it runs, applying a scaled-fp8
file's ``scale_weight`` then (``sf_model.weight_cast``), so the run holds no bf16 copy of the model; only the
small non-linear parameters (patch embedding, norms, modulation) are cast to the compute dtype for the run.

On CUDA with plain (not float8) weights a run gets our loader's speed-ups (``speed_up``): the fused inference
trunk (its fused QKV is a copy of q/k/v, ours) and CUDA graphs of the chunk forwards. A graph reads tensors by
address, so recordings are kept across runs only while every tensor they read is where it was when they were
recorded (``fingerprint``: name, address, shape, dtype, device of every bound parameter; the fused QKV copies
are refilled in place at every bind, so values core patched in place are seen); anything else drops them.

What is read from the patcher is public and long-stable: ``patcher.model.diffusion_model`` (the torch module),
``patcher.load_device``, ``patcher.model_dtype()`` and ``patcher.model.manual_cast_dtype`` (the compute dtype of
weights stored in fp8). The ComfyUI call that loads and patches is passed in (``load``), from ``nodes.comfy``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..sf_model.checkpoint import CheckpointError, LoadedModel, check_compatible, load_state_dict_file
from ..sf_model.config import infer_config
from ..sf_model.speed import ChunkGraphs, FusedTrunk, fuse_gelu, use_cuda_graphs, use_fused_kernels
from ..sf_model.weight_cast import (castable, cast_linears, has_cast_layers, held_bytes, is_float8, linear_param_names,
                                    split_scales, streamed_layers, uncast_linears)
from .model import MODEL_FOLDER, ModelHandle
from .schema import CAT_LOADERS, MODEL_TYPE, InputSpec, NodeSpec, OutputSpec

CORE_LAYOUT = "core MODEL (ComfyUI ModelPatcher, weights borrowed from ComfyUI)"
CORE_MODEL_TYPE = "MODEL"
META_KEY = "self_forcing"  # our checkpoint metadata on a core MODEL: patcher.model_options[META_KEY]["meta"]
# The nodes whose 'model' socket takes a core MODEL too: in ComfyUI its type is the union below (V3 MultiType,
# nodes.comfy); their specs keep MODEL_TYPE, so the shipped workflow files and their checks are unchanged.
CORE_MODEL_NODES = ("SelfForcingSampler", "SelfForcingExtendVideo")
UNION_TYPE = f"{MODEL_TYPE},{CORE_MODEL_TYPE}"
CORE_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
log = logging.getLogger("self_forcing")

CORE_LOADER = NodeSpec(
    node_id="SelfForcingCoreModelLoader",
    display_name="Load Self Forcing Model (core MODEL)",
    category=CAT_LOADERS,
    description="Reads a Self Forcing / causal Wan 2.1 checkpoint in any layout 'Load Self Forcing Model' knows "
                "(official .pt, safetensors, Wan/ComfyUI or diffusers names) and outputs a core MODEL: for core "
                "LoRA nodes (LoraLoaderModelOnly) and then the Self Forcing samplers.",
    inputs=(
        InputSpec("model_name", "COMBO", "Checkpoint file in models/diffusion_models (any layout the Self Forcing "
                  "loader knows).", options_source=MODEL_FOLDER),
        InputSpec("weight_dtype", "COMBO", "Weight dtype of the core MODEL. default: ComfyUI picks it for the "
                  "device (as UNETLoader's default).", default="default", options=tuple(CORE_DTYPES)),
    ),
    outputs=(
        OutputSpec(CORE_MODEL_TYPE, "model", "A core MODEL (ComfyUI ModelPatcher) holding the Wan model; the "
                   "checkpoint's sampling metadata rides along for the Self Forcing samplers."),
        OutputSpec("STRING", "info", "What was read: layout, size, weight dtype."),
    ),
    search_aliases=("self forcing", "causal wan", "core model", "lora"),
)


def as_in_comfy(node_id: str, info: dict) -> dict:
    """A spec's object_info (``schema.object_info``) as ComfyUI shows it: the union model type on the
    samplers (what a live /object_info comparison must expect)."""
    if node_id in CORE_MODEL_NODES:
        info = copy.deepcopy(info)
        for group in info["input"].values():
            if "model" in group:
                group["model"] = [UNION_TYPE, *list(group["model"])[1:]]
    return info


def is_core_model(obj) -> bool:
    """Whether a socket value is a core MODEL (a ModelPatcher around a model with a diffusion model), as opposed
    to our ``ModelHandle``."""
    if isinstance(obj, ModelHandle):
        return False
    inner = getattr(obj, "model", None)
    return (inner is not None and isinstance(getattr(inner, "diffusion_model", None), torch.nn.Module)
            and hasattr(obj, "load_device") and callable(getattr(obj, "model_dtype", None)))


def compute_dtype(patcher) -> torch.dtype:
    """The dtype core computes in: the manual-cast dtype for weights stored narrower (fp8), else the weights'."""
    cast = getattr(patcher.model, "manual_cast_dtype", None)
    return cast if cast is not None else patcher.model_dtype()


def core_state_dict(diffusion_model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The diffusion model's current tensors under bare Wan names (shared, not copied), and the ``scale_weight``
    of each layer of core's scaled fp8 layout by layer name (``scale_input`` is not needed: dropped)."""
    return split_scales({k: v.detach() for k, v in diffusion_model.state_dict(keep_vars=True).items()})


@dataclass
class Skeleton:
    """Our model's structure for one core diffusion model: parameters on the meta device between runs."""

    model: torch.nn.Module
    config: object
    fingerprint: tuple | None = None  # of the tensors the kept CUDA-graph recordings read (see speed_up)
    runs: int = 0  # runs on it now (borrowed_handle); release_speedups during one only marks the release
    release_pending: bool = False  # release_speedups was asked during a run: done when the last run ends


_SKELETONS: "weakref.WeakKeyDictionary[torch.nn.Module, Skeleton]" = weakref.WeakKeyDictionary()


def _int_attr(module: torch.nn.Module, name: str) -> int | None:
    """What the weights do not show (head count, text length): core's Wan module keeps them as attributes
    ('num_heads', 'text_len'); without them Wan's head_dim 128 and text length 512 are assumed."""
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def skeleton_for(diffusion_model: torch.nn.Module, sd: dict[str, torch.Tensor], attention: str) -> Skeleton:
    """The cached skeleton of a core diffusion model (built on first use; a new core model, e.g. another
    UNETLoader file, gets its own). Raises ``CheckpointError`` naming missing/unexpected keys for non-Wan models."""
    from ..sf_model.model import CausalWanModel

    found = _SKELETONS.get(diffusion_model)
    if found is not None and found.model.attn_backend_request == attention:
        return found
    try:
        config = infer_config(sd, num_heads=_int_attr(diffusion_model, "num_heads"))
        text_len = _int_attr(diffusion_model, "text_len")
        if text_len is not None:
            config = dataclasses.replace(config, text_len=text_len)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"the core MODEL is not a Wan 2.1 text-to-video diffusion model ({e}); connect a "
                              "Wan 2.1 model (UNETLoader) or 'Load Self Forcing Model'") from e
    with torch.device("meta"):
        model = CausalWanModel(config, attn_backend=attention)
    check_compatible(model, sd, source="core MODEL")
    found = Skeleton(model.eval().requires_grad_(False), config)
    _SKELETONS[diffusion_model] = found
    return found


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` ('cuda' without an index matches any CUDA tensor's current device)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


@dataclass
class Bound:
    """What ``bind`` did: bytes copied (cast or moved) for the run, bytes the bound skeleton holds (parameters,
    buffers, weight scales), the number of linear layers kept in float8 (cast per layer when they run), and the
    linear layers whose weights stay where ComfyUI's partial loading left them (moved per layer when they run):
    how many, their bytes, and the device(s) they stay on."""

    copied: int
    held: int
    float8_layers: int
    streamed_layers: int = 0
    streamed_bytes: int = 0
    streamed_from: str = ""


def bind(skeleton: Skeleton, sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
         scales: dict[str, torch.Tensor] | None = None) -> Bound:
    """Point the skeleton's parameters at ``sd``'s tensors, moved/cast only where they are not already on
    ``device`` in ``dtype`` (those are the only copies). Float8 weights (and biases) of linear layers stay
    float8 (moved if needed, never upcast) and are cast per layer at run time, times their ``scales`` entry
    (scaled fp8). A scale of any other tensor is folded into it here (a copy). A linear layer whose weight is
    not on ``device`` (ComfyUI loaded the model partially: the rest stays on its offload device) keeps its
    weight and bias where they are, as they are, and moves them to ``device`` one layer at a time when it runs
    (unless its weight is scaled but not float8: folded and moved here)."""
    scales = dict(scales or {})
    keep = castable(skeleton.model, sd)
    stay = set()  # linear weights/biases left where they are
    for name in linear_param_names(skeleton.model):
        layer = name.rpartition(".")[0]
        if not _on(sd[f"{layer}.weight"], device) and (f"{layer}.weight" in keep or layer not in scales):
            stay.add(name)
    copied = streamed = 0
    ready = {}
    for name, t in sd.items():
        base, _, leaf = name.rpartition(".")
        if name in stay:  # left on the offload device by ComfyUI: no copy
            streamed += t.numel() * t.element_size()
            ready[name] = torch.nn.Parameter(t, requires_grad=False)
            continue
        if name in keep:
            target = t.dtype
        elif leaf == "weight" and base in scales:  # a scaled weight not kept in float8: folded here
            t = t.to(device=device, dtype=dtype) * scales.pop(base).to(device=device, dtype=dtype)
            copied += t.numel() * t.element_size()
            target = dtype
        else:
            target = dtype
        if not _on(t, device) or t.dtype != target:
            t = t.to(device=device, dtype=target)
            copied += t.numel() * t.element_size()
        ready[name] = torch.nn.Parameter(t, requires_grad=False)
    skeleton.model.load_state_dict(ready, strict=True, assign=True)
    on_device = {k: (v if _on(v, device) else v.to(device)) for k, v in scales.items()}
    cast_linears(skeleton.model, dtype, on_device, device=device)
    layers = sum(1 for m in skeleton.model.modules() if isinstance(m, torch.nn.Linear) and is_float8(m.weight.dtype))
    where = sorted({str(sd[n].device) for n in stay})
    return Bound(copied=copied, held=held_bytes(skeleton.model), float8_layers=layers,
                 streamed_layers=streamed_layers(skeleton.model, device), streamed_bytes=streamed,
                 streamed_from=", ".join(where))


def describe_bound(bound: Bound, dtype: torch.dtype) -> str:
    """One log line of what a run borrowed (ComfyUI's log: how much the run added to core's weights)."""
    mib = 2 ** 20
    kept = (f"{bound.float8_layers} linear layers kept in float8 (cast to {str(dtype).replace('torch.', '')} "
            "one layer at a time)") if bound.float8_layers else "no float8 layers"
    if bound.streamed_layers:
        kept += (f"; {bound.streamed_layers} linear layers streamed from {bound.streamed_from} "
                 f"({bound.streamed_bytes / mib:.1f} MiB, moved one layer at a time: ComfyUI loaded it partially)")
    return f"core MODEL bound: {kept}; {bound.copied / mib:.1f} MiB copied for the run, {bound.held / mib:.1f} MiB held"


def cuda_speedups(device: torch.device, bound: Bound) -> bool:
    """Whether a bound run gets our loader's CUDA speed-ups (``speed_up``): on a CUDA load device with no layer
    kept in float8 (the fused trunk reads plain weights: it refuses float8 layers), as our loader decides. (A
    model with any cast layer, float8 or streamed, runs eagerly whatever this says: ``borrowed_handle``.)"""
    return device.type == "cuda" and bound.float8_layers == 0


def fused_qkv_bytes(config, dtype: torch.dtype) -> int:
    """Memory the CUDA speed-ups add to a core-MODEL run (``speed_up``): the fused QKV copies (q, k, v weights and
    biases of every block) in ``dtype``, ours, not counted by ComfyUI; kept between runs while CUDA-graph
    recordings that read them are kept (``unbind``)."""
    return config.num_layers * 3 * config.dim * (config.dim + 1) * torch.empty((), dtype=dtype).element_size()


def fingerprint(model: torch.nn.Module) -> tuple:
    """(name, address, shape, dtype, device) of every parameter and buffer: what a CUDA graph recorded on the
    model reads (the q/k/v parameters are views of the fused QKV copy once fused)."""
    return tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, t.device)
                 for name, t in model.state_dict(keep_vars=True).items())


def _refuse_qkv(model: torch.nn.Module) -> None:
    """Fused QKV of every self-attention from its bound q/k/v weights: copied into the fused buffers kept from
    the last run where they fit (same addresses: recorded graphs stay valid), else into new ones."""
    with torch.no_grad():
        for blk in model.blocks:
            attn = blk.self_attn
            lins = (attn.q, attn.k, attn.v)
            rows = sum(lin.weight.shape[0] for lin in lins)
            w, b = attn.fused if attn.fused is not None else (None, None)
            fits = w is not None and all(
                t.shape[0] == rows and t.shape[1:] == s.shape[1:] and t.dtype == s.dtype and t.device == s.device
                for t, s in ((w, attn.q.weight), (b, attn.q.bias)))
            if not fits:
                attn.fused = None
                attn.fuse_qkv()
                continue
            start = 0
            for lin in lins:
                n = lin.weight.shape[0]
                w[start:start + n].copy_(lin.weight)
                b[start:start + n].copy_(lin.bias)
                lin.weight.data, lin.bias.data = w[start:start + n], b[start:start + n]
                start += n


def speed_up(skeleton: Skeleton, make_graphs: Callable[[], ChunkGraphs] = ChunkGraphs) -> bool:
    """Our loader's CUDA speed-ups on a bound skeleton: the fused trunk (with fused QKV and the GELU-epilogue
    GEMM) and CUDA graphs (a ``make_graphs()`` recorder, kept on the skeleton). The fused QKV copies are
    refilled from the bound weights now; recordings are dropped unless every tensor they read is where it was
    when they were recorded (``fingerprint``). Returns whether the kept recordings stay usable."""
    model = skeleton.model
    if isinstance(model.inference_trunk, FusedTrunk) and not model.inference_trunk.fp8:
        _refuse_qkv(model)
    else:
        use_fused_kernels(model)  # fuses QKV (new copies) and drops any recording
    if model.chunk_graphs is None:
        use_cuda_graphs(model, graphs=make_graphs())
    now = fingerprint(model)
    kept = now == skeleton.fingerprint
    if not kept:
        model.chunk_graphs.clear()
        skeleton.fingerprint = now
    return kept


def _drop_speedups(skeleton: Skeleton, *, switch_off: bool) -> None:
    """Drop the fused QKV copies and the recordings (``switch_off``: also the trunk, the GELU epilogue and the
    recorder itself, for an eager run)."""
    model = skeleton.model
    for blk in model.blocks:
        blk.self_attn.fused = None
    if model.chunk_graphs is not None:
        model.chunk_graphs.clear()
    skeleton.fingerprint = None
    skeleton.release_pending = False
    if switch_off:
        model.inference_trunk = None
        fuse_gelu(model, False)
        model.chunk_graphs = None


def release_speedups(diffusion_model: torch.nn.Module) -> bool:
    """Drop what the CUDA speed-ups keep between runs for a core diffusion model (the fused QKV copies and the
    CUDA-graph recordings with their memory pool), e.g. when ComfyUI unloads that model. During a run on it
    (ComfyUI may unload the model while the run loads the VAE, say) the run still reads them: they are dropped
    when the run ends. The next run rebuilds them. Returns whether there was a skeleton."""
    found = _SKELETONS.get(diffusion_model)
    if found is not None and found.runs > 0:
        found.release_pending = True
    elif found is not None:
        _drop_speedups(found, switch_off=False)
    return found is not None


def _recordings_in_use(model: torch.nn.Module) -> bool:
    graphs = model.chunk_graphs
    return graphs is not None and graphs.failed is None and len(graphs.graphs) > 0


def unbind(skeleton: Skeleton) -> None:
    """Drop every reference to the borrowed tensors (parameters back on the meta device, float8 layers plain
    again). The fused QKV copies (ours) stay only while CUDA-graph recordings that read them are kept (they are
    refilled at the next bind, ``speed_up``); else they go too."""
    if not _recordings_in_use(skeleton.model):
        _drop_speedups(skeleton, switch_off=False)
    uncast_linears(skeleton.model)
    for module in skeleton.model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False))


def core_meta(patcher) -> dict:
    """Our checkpoint metadata (frames per block, steps, shift, trained window) riding on a core MODEL made by
    ``core_model_from_file`` (kept through core's clones, e.g. LoRA nodes); {} for core UNETLoader models."""
    options = getattr(patcher, "model_options", None)
    ours = options.get(META_KEY) if isinstance(options, dict) else None
    return dict(ours.get("meta", {})) if isinstance(ours, dict) else {}


def core_model_from_file(path: str, *, build: Callable, dtype: torch.dtype | None = None):
    """A core MODEL from any checkpoint layout our loader reads (official .pt training checkpoints, FSDP
    wrappers, diffusers names, Wan/ComfyUI names), for core LoRA nodes and our sampler: the file is read and
    normalised to bare Wan names here, then ``build(state_dict, model_options=...)`` - core's public
    ``comfy.sd.load_diffusion_model_state_dict`` - makes the ModelPatcher (one copy of the weights, core's).
    ``dtype`` None lets core pick the weight dtype. Our metadata rides along (``core_meta``)."""
    sd, _config, layout, meta, extras = load_state_dict_file(path)
    if extras:
        raise CheckpointError(f"{path}: a self-contained model with bundled parts ({layout}) is not a core "
                              "MODEL; load it with 'Load Self Forcing Toy Model'")
    patcher = build(sd, model_options={"dtype": dtype} if dtype is not None else {})
    del sd
    if patcher is None:
        raise CheckpointError(f"{path}: ComfyUI did not recognise the weights ({layout}) as a diffusion model")
    patcher.model_options[META_KEY] = {"meta": dict(meta), "layout": layout}
    return patcher


def describe_core(patcher) -> str:
    """The info text of 'Load Self Forcing Model (core MODEL)'."""
    ours = patcher.model_options.get(META_KEY, {})
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    meta = ours.get("meta", {})
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    lines = [f"core MODEL: {type(patcher.model).__name__} ({count} parameters), "
             f"weights {str(patcher.model_dtype()).replace('torch.', '')}",
             f"layout: {ours.get('layout', 'unknown')}"]
    lines += [f"{key} (from the file): {meta[key]}" for key in ("frames_per_block", "steps", "shift") if key in meta]
    return "\n".join(lines)


@contextmanager
def borrowed_handle(patcher, *, load: Callable[[object], None], attention: str = "auto", name: str = "core MODEL",
                    speedups: Callable[[torch.device, Bound], bool] = cuda_speedups,
                    make_graphs: Callable[[], ChunkGraphs] = ChunkGraphs):
    """A ``ModelHandle`` for one run on a core MODEL's (patched) weights.

    ``load(patcher)`` must make ComfyUI load the model on its load device with its patches (LoRA) applied,
    fully (``comfy.model_management.load_models_gpu([patcher], force_full_load=True)``). The handle rests and
    runs on the patcher's load device and is never moved by us (``keep_loaded``): ComfyUI owns the weights.
    ``speedups(device, bound)`` decides whether the run gets the fused trunk and CUDA graphs (``speed_up``, with
    ``make_graphs`` as the recorder); otherwise it runs eagerly.
    """
    load(patcher)
    diffusion_model = patcher.model.diffusion_model
    sd, scales = core_state_dict(diffusion_model)
    skeleton = skeleton_for(diffusion_model, sd, attention)
    device, dtype = torch.device(patcher.load_device), compute_dtype(patcher)
    skeleton.runs += 1  # ComfyUI's detach during the run only marks the speed-ups for release (release_speedups)
    try:
        try:
            bound = bind(skeleton, sd, device, dtype, scales)
            if speedups(device, bound) and not has_cast_layers(skeleton.model):
                kept = speed_up(skeleton, make_graphs)
                failed = skeleton.model.chunk_graphs.failed
                how = (f"fused trunk, CUDA graphs off ({failed})" if failed else
                       f"fused trunk + CUDA graphs ({'recordings kept' if kept else 'recorded anew'})")
                how += f", fused QKV copy {fused_qkv_bytes(skeleton.config, dtype) / 2 ** 20:.1f} MiB"
            else:
                _drop_speedups(skeleton, switch_off=True)
                how = "eager"
            log.info(f"{describe_bound(bound, dtype)}; {how}")
        except BaseException:
            unbind(skeleton)
            raise
        del sd, scales
        handle = ModelHandle(loaded=LoadedModel(model=skeleton.model, config=skeleton.config, layout=CORE_LAYOUT,
                                                meta=core_meta(patcher)),
                             name=name, load_device=device, offload_device=device, dtype=dtype, keep_loaded=True)
        try:
            yield handle
        finally:
            unbind(skeleton)
    finally:
        skeleton.runs -= 1
        if skeleton.runs == 0 and skeleton.release_pending:
            _drop_speedups(skeleton, switch_off=False)


@contextmanager
def model_handle(model, *, load: Callable[[object], None], attention: str = "auto"):
    """What the sampler nodes run on: our ``ModelHandle`` as it is, or a core MODEL's borrowed handle."""
    if not is_core_model(model):
        yield model
        return
    with borrowed_handle(model, load=load, attention=attention) as handle:
        yield handle
