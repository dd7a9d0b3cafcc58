"""Text embeddings to and from disk, so the umT5 encoder need not stay loaded."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from .comfy_glue import build_schema, ensure_folders
from .logic_paths import TEXT_EMBEDS, save_folder
from .logic_text import conditioning_from_context, load_text_embeds, next_embed_path, save_text_embeds, tensor_of
from .specs import LOAD_EMBEDS, SAVE_EMBEDS


class SelfForcingSaveTextEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ensure_folders()
        return build_schema(SAVE_EMBEDS)

    @classmethod
    def execute(cls, conditioning, filename_prefix: str = "prompt", folder: str = TEXT_EMBEDS) -> io.NodeOutput:
        ensure_folders()
        path, rel = next_embed_path(save_folder(folder_paths, folder), filename_prefix)
        save_text_embeds(path, tensor_of(conditioning), meta={"saved_by": "SelfForcingSaveTextEmbeds"})
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
        tensor, _ = load_text_embeds(path)
        return io.NodeOutput(conditioning_from_context(tensor))
