"""Self-contained toy model nodes: loader, text encode, decode (thin: schema from specs, work in logic_toy)."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from .comfy_glue import build_schema, log
from .logic_model import load_handle
from .logic_toy import decode_toy_latent, describe_toy, encode_toy_prompt, require_toy, toy_model_path
from .specs import TOY_DECODE, TOY_ENCODE, TOY_LOADER


class SelfForcingToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TOY_LOADER)

    @classmethod
    def execute(cls, model_name: str, device: str = "default") -> io.NodeOutput:
        path = toy_model_path(model_name)
        load_device = torch.device("cpu") if device == "cpu" else mm.get_torch_device()
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
