"""Node schemas for the workflow tools: ours from ``nodes.catalogue``, core's from a recorded /object_info.

No ComfyUI import. ``tests/object_info_core.json`` is GET /object_info of a real ComfyUI 0.3.64,
trimmed to the core nodes the workflows use.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..nodes.catalogue import ALL_NODES
from ..nodes.core_model import as_in_comfy
from ..nodes.schema import object_info

REPO = Path(__file__).resolve().parent.parent
CORE_SNAPSHOT = REPO / "tests" / "object_info_core.json"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")


def core_schemas(path: Path = CORE_SNAPSHOT) -> dict:
    """Recorded core schemas; combos listing installation files get their names in ``_file_inputs``."""
    data = json.loads(Path(path).read_text())
    schemas = {k: dict(v) for k, v in data.items() if not k.startswith("_")}
    for node, names in data.get("_file_inputs", {}).items():
        if node in schemas:
            schemas[node]["_file_inputs"] = list(names)
    return schemas


def our_schemas() -> dict:
    """Our nodes' /object_info as ComfyUI shows it (the samplers' model socket also takes a core MODEL)."""
    out = {}
    for spec in ALL_NODES:
        info = as_in_comfy(spec.node_id, object_info(spec))
        info["_file_inputs"] = [i.name for i in spec.inputs if i.options_source]
        out[spec.node_id] = info
    return out


def all_schemas(core_path: Path = CORE_SNAPSHOT) -> dict:
    schemas = core_schemas(core_path)
    ours = our_schemas()
    clash = set(schemas) & set(ours)
    if clash:
        raise ValueError(f"node ids clash with core: {sorted(clash)}")
    schemas.update(ours)
    return schemas


def ordered_inputs(schema: dict) -> list[tuple[str, list, str]]:
    """(name, [type, options], section) in the order the frontend builds them: required, then optional."""
    order = schema.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        table = schema.get("input", {}).get(section) or {}
        for name in order.get(section) or list(table):
            if name in table:
                out.append((name, table[name], section))
    return out


def input_type(spec: list):
    """'INT', 'LATENT', ... or 'COMBO' for a list-style combo."""
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec: list) -> list:
    t = spec[0]
    return list(t) if isinstance(t, list) else list(input_options(spec).get("options") or [])


def is_widget(spec: list) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def widget_slots(schema: dict) -> list[tuple[str | None, int]]:
    """The widgets_values layout of a UI node: (input name, slots it takes); None = an upload button.

    An INT with ``control_after_generate`` (or a legacy input named seed/noise_seed) takes a second
    slot for the control mode; a required combo with an upload flag adds one upload-button slot after
    the last required widget.
    """
    slots: list[tuple[str | None, int]] = []
    uploads, placed = 0, False
    for name, spec, section in ordered_inputs(schema):
        if section == "optional" and not placed:
            if uploads:
                slots.append((None, uploads))
            placed = True
        if not is_widget(spec):
            continue
        opts, n = input_options(spec), 1
        if input_type(spec) == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
            n += 1
        if input_type(spec) == "COMBO" and section == "required" and any(opts.get(f) for f in UPLOAD_FLAGS):
            uploads += 1
        slots.append((name, n))
    if not placed and uploads:
        slots.append((None, uploads))
    return slots
