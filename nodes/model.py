"""'Load Self Forcing Model': its spec, and loading a checkpoint for the nodes (no ComfyUI import): dtype
choice, devices, the model dropdown, the report."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from ..sf_model.attention import resolve_backend
from ..sf_model.checkpoint import LoadedModel, load_model
from ..sf_model.config import WanConfig, size_name
from ..sf_model.speed import use_cuda_graphs, use_fused_kernels
from ..sf_model.speed.graphs import unsupported_reason
from .schema import CAT_LOADERS, MODEL_TYPE, InputSpec, NodeSpec, OutputSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")
FP8_STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn}  # linear weights stored in float8, computed in bf16
ATTENTION = ("auto", "sdpa", "flash3", "flash2")
DEVICES = ("default", "cpu")  # the loaders' device input
MODEL_FOLDER = "diffusion_models"
LORA_FOLDER = "loras"  # ComfyUI's LoRA folder (models/loras), the one core's LoRA loaders list
NO_LORA = "none"

LOADER = NodeSpec(
    node_id="SelfForcingModelLoader",
    display_name="Load Self Forcing Model",
    category=CAT_LOADERS,
    description="Loads a Self Forcing / causal Wan 2.1 checkpoint (official .pt, converted safetensors, "
                "Wan/ComfyUI or diffusers layout) from models/diffusion_models and reports what it found.",
    inputs=(
        InputSpec("model_name", "COMBO",
                  "Checkpoint file in models/diffusion_models. Any layout the loader knows: the official "
                  "self_forcing_dmd.pt, its safetensors conversion, Wan/ComfyUI bare keys or diffusers names. "
                  "The official file name is listed even when missing (see download_if_missing).",
                  options_source=MODEL_FOLDER),
        InputSpec("dtype", "COMBO",
                  "Weight and compute precision. auto: bf16 where the device supports it, else fp16 on GPUs "
                  "and fp32 on the CPU. fp32 needs twice the memory of bf16/fp16. fp8_e4m3fn: the linear "
                  "layers' weights stored in float8 (about half of bf16's memory, e.g. a 14B model in ~15 GB), "
                  "each cast to bf16 when it runs: slower (no fused kernels) and slightly less exact.",
                  default="auto", options=DTYPE_CHOICES),
        InputSpec("attention", "COMBO",
                  "Attention kernel. auto: flash-attn 3 or 2 if installed on a CUDA device, else PyTorch SDPA. "
                  "flash3/flash2 fail at load time when the flash-attn package is not installed.",
                  default="auto", options=ATTENTION),
        InputSpec("device", "COMBO",
                  "Where the model runs. default: ComfyUI's main device (GPU); cpu: the CPU (very slow, for "
                  "tests).", default="default", options=DEVICES),
        InputSpec("keep_loaded", "BOOLEAN",
                  "Keep the weights on the GPU between runs (faster re-runs, but ComfyUI cannot free that "
                  "memory for other models such as the VAE). Off: weights go back to ComfyUI's offload "
                  "device after every run.", default=False),
        InputSpec("download_if_missing", "BOOLEAN",
                  "If the chosen file is one of the official ones and is missing, download it from Hugging "
                  "Face (resumable, checksum-checked; the .pt is converted to safetensors once). Offline "
                  "this fails at once with a message saying where to put the file by hand.",
                  default=False),
        InputSpec("lora_name", "COMBO",
                  "A LoRA from models/loras merged into the weights at load (ComfyUI, peft or diffusers keys, "
                  "e.g. LongLive's lora.pt next to longlive_base.pt). none: no LoRA.",
                  default=NO_LORA, options_source=LORA_FOLDER, optional=True),
        InputSpec("lora_strength", "FLOAT",
                  "How much of the LoRA is merged: W + strength * alpha / rank * up @ down. 1 = as trained, "
                  "0 = not merged, negative values subtract it.",
                  default=1.0, min=-10.0, max=10.0, step=0.01, optional=True),
    ),
    outputs=(
        OutputSpec(MODEL_TYPE, "model", "The loaded causal Wan model with its devices and dtype."),
        OutputSpec("STRING", "info", "What was detected: size (1.3B/14B), layout, frames per block, dtype, the "
                                     "LoRA merged."),
    ),
    search_aliases=("self forcing", "causal wan", "wan streaming"),
)


def missing_model_message(official, folder: str) -> str:
    """What to do when an official checkpoint (a ``weights.OfficialFile``) is not in ``folder`` and the loader
    may not download it: where to get it and where to put it, then the two ways to have it fetched."""
    size = f", {official.size / 1e9:.1f} GB" if official.size else ""
    models_dir = os.path.dirname(os.path.normpath(folder))
    lines = [f"The model file '{official.name}' is missing from {folder}. Put it there by hand:",
             f"  - {official.name} ({official.description}{size})",
             f"      from: {official.url}",
             f"      into: {folder}"]
    if official.convert:
        pt = os.path.basename(official.repo_path)
        lines.append(f"      (the download is {pt}: keep it as it is, the loader reads .pt files too (pick it after a "
                     f"refresh), or convert it once with 'self-forcing download --models-dir {models_dir} "
                     f"--from-file {pt}')")
    if official.sha256:
        lines.append(f"      sha256 of the download: {official.sha256}")
    lines.append("Or have it fetched: switch on download_if_missing on this node (downloads and checks it), or run "
                 f"'self-forcing download --models-dir {models_dir} --only {official.key}'.")
    return "\n".join(lines)


def model_choices(files: list[str], official_names: list[str]) -> list[str]:
    """Dropdown of the loader: files present, then official names that are not (downloadable)."""
    present = set(files)
    return list(files) + sorted(n for n in official_names if n not in present)


def lora_choices(files: list[str]) -> list[str]:
    """The loader's LoRA dropdown: 'none' first, then the files of the LoRA folder."""
    return [NO_LORA] + [f for f in files if f != NO_LORA]


def wants_lora(lora_name: str | None, lora_strength: float) -> bool:
    """Whether a LoRA is merged: one is picked and its strength is not 0 (0 is the model as it is, so the file
    is not even read)."""
    return lora_name not in (None, "", NO_LORA) and float(lora_strength) != 0.0


def file_stamp(path: str | None) -> tuple | None:
    """(path, size, mtime in ns) of a file, None when there is none: a replaced file gets another stamp."""
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def loader_key(model_path: str | None, lora_path: str | None, lora_strength: float, **settings) -> tuple:
    """What a loaded handle depends on (the node's ``fingerprint_inputs``, so ComfyUI reuses a kept-loaded
    model only for the same model file, the same LoRA file at the same strength, and the same settings): a
    different LoRA or strength, or a file rewritten under the same name, gives another key."""
    lora = (file_stamp(lora_path) or lora_path, float(lora_strength)) if lora_path else None
    return (file_stamp(model_path) or model_path, lora, tuple(sorted(settings.items())))


class Users:
    """How many runs are using a handle's model right now: a lock and a counter (``sampling.model_on_device``).

    A copy of a handle (``copy.deepcopy``, pickling) holds a copy of the model, so it starts with no users.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0

    def __deepcopy__(self, memo) -> "Users":
        return Users()

    def __reduce__(self):
        return (Users, ())


@dataclass
class ModelHandle:
    """What flows on the SELF_FORCING_MODEL socket: the model plus where it runs and rests.

    ``users`` counts the runs using the model at this moment (several threads may share one handle): the
    first to enter moves the weights to ``load_device``, the last to leave parks them on ``offload_device``.
    """

    loaded: LoadedModel
    name: str
    load_device: torch.device
    offload_device: torch.device
    dtype: torch.dtype
    keep_loaded: bool = False
    lora: str | None = None  # the LoRA merged at load (its name), None without one
    lora_strength: float = 0.0
    users: Users = field(default_factory=Users, init=False, repr=False, compare=False)

    @property
    def model(self):
        return self.loaded.model

    @property
    def config(self) -> WanConfig:
        return self.loaded.config

    @property
    def meta(self) -> dict:
        return self.loaded.meta


def resolve_devices(choice: str, main: torch.device, offload: torch.device) -> tuple[torch.device, torch.device]:
    """(load device, offload device) of a loader's ``device`` input: 'default' -> ComfyUI's main and offload
    devices, 'cpu' -> the CPU for both. Anything else is refused (ValueError naming the allowed values)."""
    if choice not in DEVICES:
        raise ValueError(f"device {choice!r} is not one of: {', '.join(DEVICES)}")
    if choice == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return torch.device(main), torch.device(offload)


def resolve_dtype(choice: str, device: torch.device, supports_bf16: bool) -> torch.dtype:
    """The weights' storage dtype of a loader's ``dtype`` input: 'auto' -> bf16 where supported, else fp16 on
    accelerators and fp32 on the CPU; 'fp8_e4m3fn' -> float8 (linear layers; they compute in bf16)."""
    if choice in FP8_STORAGE:
        return FP8_STORAGE[choice]
    if choice in DTYPES:
        return DTYPES[choice]
    if choice != "auto":
        raise ValueError(f"dtype '{choice}' is not one of: {', '.join(DTYPE_CHOICES)}")
    if supports_bf16:
        return torch.bfloat16
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def load_handle(path: str, name: str, *, dtype: str, attention: str, load_device: torch.device,
                offload_device: torch.device, keep_loaded: bool, supports_bf16: bool,
                lora: str | None = None, lora_strength: float = 1.0, lora_name: str | None = None) -> ModelHandle:
    """Load a checkpoint (any layout sf_model knows) and park it where it rests between runs.

    ``lora``: a LoRA file merged at load by the one loader (``load_model(..., lora=...)``) at ``lora_strength``;
    ``lora_name`` is what the report calls it (default: the file name). The attention backend is checked for
    the load device here, so a missing flash-attn fails at load time.
    """
    load_device, offload_device = torch.device(load_device), torch.device(offload_device)
    resolve_backend(attention, load_device)
    storage = resolve_dtype(dtype, load_device, supports_bf16)
    fp8 = storage in FP8_STORAGE.values()
    torch_dtype = torch.bfloat16 if fp8 else storage  # the compute dtype
    rest = load_device if keep_loaded else offload_device
    loaded = load_model(path, device=rest, dtype=storage, attn_backend=attention, lora=lora,
                        lora_strength=lora_strength)
    if load_device.type == "cuda" and not fp8:  # the fused trunk reads plain weights (it refuses float8 layers)
        # Inference trunk with fused kernels (Triton when installed, else the same math in PyTorch),
        # fused QKV and the GELU-epilogue GEMM, and block forwards replayed from CUDA graphs (same
        # numbers, less host time): ~1.7x the eager speed on an H100 (README, Benchmarks).
        use_cuda_graphs(use_fused_kernels(loaded.model))
    return ModelHandle(loaded=loaded, name=name, load_device=load_device, offload_device=offload_device,
                       dtype=torch_dtype, keep_loaded=keep_loaded,
                       lora=(lora_name or os.path.basename(lora)) if lora else None,
                       lora_strength=float(lora_strength) if lora else 0.0)


def _dtype_note(handle: ModelHandle) -> str:
    name = DTYPE_NAMES.get(handle.dtype, str(handle.dtype))
    fp8 = sorted({str(p.dtype).replace("torch.", "") for p in handle.model.parameters() if p.dtype.itemsize == 1})
    return f"{', '.join(fp8)} linear weights, {name} compute" if fp8 else name


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def describe(handle: ModelHandle) -> str:
    """One short report of what was detected, shown on the loader node."""
    cfg, meta = handle.config, handle.meta
    fpb = meta.get("frames_per_block")
    params = sum(p.numel() for p in handle.model.parameters())
    lines = [
        f"model: {size_name(cfg)} ({_count(params)} parameters, {cfg.num_layers} layers, dim {cfg.dim})",
        f"layout: {handle.loaded.layout}",
        f"frames per block: {fpb if fpb is not None else 'not stored in the file (3 for the official model)'}",
        f"dtype: {_dtype_note(handle)}, attention: {handle.model.attn_backend_request}",
        f"runs on {handle.load_device}, rests on {handle.model.device}"
        + (" (kept loaded)" if handle.keep_loaded else ""),
        f"LoRA: {handle.lora} merged at strength {handle.lora_strength:g}" if handle.lora else "LoRA: none",
    ]
    for key in ("steps", "shift"):
        if key in meta:
            lines.append(f"{key} (from the file): {meta[key]}")
    graphs = handle.model.chunk_graphs
    if graphs is not None:  # CUDA: say when the allocator keeps the recorded forwards off
        off = unsupported_reason()
        lines.append(f"CUDA graphs: off - {off}" if off else "CUDA graphs: on (block forwards replayed)")
    return "\n".join(lines)
