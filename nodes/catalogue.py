"""Every node spec of the pack, in one list (plain data, no ComfyUI import): what ``comfy`` registers, what the
tests freeze and what ``workflows/`` checks the shipped workflows against."""

from __future__ import annotations

from .core_model import CORE_LOADER
from .live import LIVE
from .long_video import OPTIONS, SCHEDULE
from .model import LOADER
from .sampling import EXTEND, SAMPLER
from .schema import NodeSpec
from .text import LOAD_EMBEDS, SAVE_EMBEDS
from .toy import TOY_DECODE, TOY_ENCODE, TOY_LOADER

ALL_NODES: tuple[NodeSpec, ...] = (LOADER, OPTIONS, SAMPLER, EXTEND, LIVE, SAVE_EMBEDS, LOAD_EMBEDS, TOY_LOADER,
                                   TOY_ENCODE, TOY_DECODE, SCHEDULE, CORE_LOADER)
NODES_BY_ID = {n.node_id: n for n in ALL_NODES}
