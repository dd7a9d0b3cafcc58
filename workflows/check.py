"""Static checks of workflows against node schemas (no ComfyUI needed).

``check_api(prompt, schemas)`` returns a list of problems (empty = valid): unknown classes, missing
required inputs, unknown input names, values of the wrong type / outside min-max / not in a combo's
options, dangling links, and links whose output type does not match the input type. For our own nodes
it also runs what their ``validate_inputs`` runs (``nodes.schema.check_inputs``: the spec's ranges and the
node's cross-field rules). ``ui_to_api(workflow, schemas)``
converts an editor (UI) file to API format, following the frontend's widget layout rules.

Two deliberate allowances: combos that list installation files (model folders, the input folder;
named in the schemas' ``_file_inputs``) only need a non-empty string; an input named ``X.Y`` where ``X`` is
a known combo input is a sub-input of a newer core's dynamic combo (e.g. SaveVideo's ``format.codec``
since 2026), which 0.3.64 ignores.
"""

from __future__ import annotations

from ..nodes.catalogue import NODES_BY_ID
from ..nodes.schema import check_inputs
from .schemas import FRONTEND_ONLY, combo_values, input_options, input_type, ordered_inputs, widget_slots


def _types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool({t.strip() for t in str(out_type).split(",")} & {t.strip() for t in str(in_type).split(",")})


def _check_value(where: str, name: str, spec: list, value, file_input: bool = False) -> list[str]:
    t, opts = input_type(spec), input_options(spec)
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {name} = {value!r} is not an integer"]
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: {name} = {value!r} is not a number"]
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return [f"{where}: {name} = {value!r} is not a boolean"]
    elif t == "STRING":
        if not isinstance(value, str):
            return [f"{where}: {name} = {value!r} is not a string"]
    elif t == "COMBO":
        options = [] if file_input else combo_values(spec)
        if options and value not in options:
            return [f"{where}: {name} = {value!r} is not one of {options[:12]}"]
        if not options and not (isinstance(value, str) and value):
            return [f"{where}: {name} = {value!r} must name a file"]
    else:
        return [f"{where}: {name} is a {t} socket and must be linked, got the value {value!r}"]
    if t in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return [f"{where}: {name} = {value} is below the minimum {opts['min']}"]
        if "max" in opts and value > opts["max"]:
            return [f"{where}: {name} = {value} is above the maximum {opts['max']}"]
    return []


def check_api(prompt: dict, schemas: dict) -> list[str]:
    problems: list[str] = []
    if not isinstance(prompt, dict) or not prompt:
        return ["the workflow is empty or not an API-format object"]
    if "nodes" in prompt:
        return ["this is a UI (editor) workflow, not API format"]
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        before = len(problems)
        schema = schemas.get(node.get("class_type"))
        if schema is None:
            problems.append(f"{where}: unknown node class")
            continue
        inputs = node.get("inputs") or {}
        known = {name: (spec, section) for name, spec, section in ordered_inputs(schema)}
        for name, (spec, section) in known.items():
            if section == "required" and name not in inputs:
                problems.append(f"{where}: required input '{name}' is missing")
        for name, value in inputs.items():
            if name not in known:
                base = name.split(".", 1)[0]
                if "." in name and base in known and input_type(known[base][0]) == "COMBO":
                    continue  # a newer core's dynamic-combo sub-input
                problems.append(f"{where}: unknown input '{name}'")
                continue
            spec = known[name][0]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: input '{name}' links to missing node {value[0]}")
                    continue
                src_schema = schemas.get(src.get("class_type"))
                if src_schema is None:
                    continue  # reported for the source node
                outs = src_schema.get("output") or []
                if not 0 <= value[1] < len(outs):
                    problems.append(f"{where}: input '{name}' links to output {value[1]} of node {value[0]}, "
                                    f"which has {len(outs)} outputs")
                    continue
                want = input_type(spec)
                if not _types_match(outs[value[1]], want):
                    problems.append(f"{where}: input '{name}' expects {want} but node {value[0]} "
                                    f"({src['class_type']}) output {value[1]} is {outs[value[1]]}")
                continue
            problems.extend(_check_value(where, name, spec, value, name in schema.get("_file_inputs", ())))
        ours = NODES_BY_ID.get(node.get("class_type"))
        if ours is not None and len(problems) == before:  # cross-field checks need well-typed values
            values = {i.name: inputs.get(i.name) if not isinstance(inputs.get(i.name), list) else None
                      for i in ours.inputs if i.is_widget}
            verdict = check_inputs(ours, **values)
            if verdict is not True:
                problems.append(f"{where}: {verdict}")
    return problems


def ui_to_api(workflow: dict, schemas: dict) -> dict:
    """An editor workflow (nodes + links) as an API prompt; frontend-only nodes are dropped."""
    links = {}
    for link in workflow.get("links") or []:
        link_id, src, src_slot, dst, dst_slot = link[:5]
        links[link_id] = (src, src_slot)
    out = {}
    for node in workflow.get("nodes") or []:
        if node.get("type") in FRONTEND_ONLY or node.get("mode") in (2, 4):
            continue
        schema = schemas.get(node["type"])
        if schema is None:
            raise ValueError(f"node {node['id']}: unknown node class {node['type']}")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        pos = 0
        for name, count in widget_slots(schema):
            if pos < len(values) and name is not None:
                inputs[name] = values[pos]
            pos += count
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None:
                src, src_slot = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        order = [name for name, _, _ in ordered_inputs(schema)]
        out[str(node["id"])] = {"class_type": node["type"],
                                "inputs": {k: inputs[k] for k in order if k in inputs}}
    return out
