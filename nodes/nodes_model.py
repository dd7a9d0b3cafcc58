"""Loader and long-video options nodes (thin: schema from specs, logic in logic_*)."""

from __future__ import annotations

import os

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..sf_model import weights
from .comfy_glue import build_schema, ensure_folders, log
from .logic_model import describe, load_handle
from .logic_paths import model_choices
from .logic_sampling import LongVideoOptions
from .logic_validate import validate_long_video
from .specs import LOADER, OPTIONS

MODEL_FOLDER = "diffusion_models"


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
        raise ValueError(weights.manual_instructions([official], lambda f: folder, "the file is missing")
                         + "\nOr switch on download_if_missing, or run: self-forcing download")
    weights.ensure_files([official], lambda f: weights.preferred_dir(folder_paths.get_folder_paths(f.folder), f.folder),
                         log=log.info)
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        raise ValueError(f"'{name}' was downloaded but ComfyUI cannot find it in {folder}")
    return path


class SelfForcingModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        files = folder_paths.get_filename_list(MODEL_FOLDER)
        return build_schema(LOADER, {"model_name": model_choices(files, weights.official_names(MODEL_FOLDER))})

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto", attention: str = "auto", device: str = "default",
                keep_loaded: bool = False, download_if_missing: bool = False) -> io.NodeOutput:
        path = _model_path(model_name, download_if_missing)
        load_device = torch.device("cpu") if device == "cpu" else mm.get_torch_device()
        offload_device = torch.device("cpu") if device == "cpu" else mm.unet_offload_device()
        rest = load_device if keep_loaded else offload_device
        if rest.type != "cpu":
            mm.free_memory(int(os.path.getsize(path) * 1.2), rest)
        mm.soft_empty_cache()
        handle = load_handle(path, model_name, dtype=dtype, attention=attention, load_device=load_device,
                             offload_device=offload_device, keep_loaded=keep_loaded,
                             supports_bf16=mm.should_use_bf16(load_device))
        info = describe(handle)
        log.info("Self Forcing model %s:\n%s", model_name, info)
        return io.NodeOutput(handle, info, ui=ui.PreviewText(info))


class SelfForcingLongVideoOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(OPTIONS)

    @classmethod
    def validate_inputs(cls, cache=None, window=None, sink=None, routing_topk=None):
        return validate_long_video(cache, window, sink, routing_topk)

    @classmethod
    def execute(cls, cache: str = "rolling", window: int = 21, sink: int = 3, routing_topk: int = 0) -> io.NodeOutput:
        return io.NodeOutput(LongVideoOptions(cache=cache, window=window, sink=sink, routing_topk=routing_topk))
