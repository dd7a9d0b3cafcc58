"""The V3 extension: ComfyUI awaits ``comfy_entrypoint`` (package root), which returns this."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .comfy_glue import ensure_folders
from .nodes_model import SelfForcingLongVideoOptions, SelfForcingModelLoader
from .nodes_sampling import SelfForcingExtendVideo, SelfForcingLiveFrames, SelfForcingSampler
from .nodes_text import SelfForcingLoadTextEmbeds, SelfForcingSaveTextEmbeds
from .nodes_toy import SelfForcingToyDecode, SelfForcingToyModelLoader, SelfForcingToyTextEncode

NODES: list[type[io.ComfyNode]] = [
    SelfForcingModelLoader,
    SelfForcingSampler,
    SelfForcingExtendVideo,
    SelfForcingLongVideoOptions,
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
