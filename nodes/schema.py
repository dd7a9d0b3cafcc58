"""How a node is declared: plain-data specs (no ComfyUI import), their tooltips and their checks.

Each node's ``NodeSpec`` sits beside its logic in the module of its subject (``sampling``, ``long_video``,
``live``, ``model``, ``text``, ``toy``); ``catalogue`` lists them all. ``comfy`` builds the ``io.Schema``
from a spec, and the CI tests check the shipped API workflows against the specs without ComfyUI. Node ids
are stable and inputs are only ever appended (a test compares against a frozen record), so saved workflows
keep working.

A value's range is written once, as the input's ``min``/``max``: the tooltip's "Range a-b." and
``check_inputs`` (the nodes' ``validate_inputs``, which switches off core's own min/max check for the
inputs it names) are derived from it. Cross-field rules are attached to the node as ``rules``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ROOT = "Self Forcing"
CAT_LOADERS = f"{ROOT}/loaders"
CAT_SAMPLING = f"{ROOT}/sampling"
CAT_CONDITIONING = f"{ROOT}/conditioning"
CAT_TOY = f"{ROOT}/toy"

# Custom socket types: our model is not a core MODEL (ModelPatcher), and the options bundles have no core twin.
MODEL_TYPE = "SELF_FORCING_MODEL"
OPTIONS_TYPE = "SELF_FORCING_OPTIONS"
LIVE_TYPE = "SELF_FORCING_LIVE_FRAMES"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_MAX = 0xFFFFFFFFFFFFFFFF

# A cross-field rule: the values named in a node's validate_inputs (None = linked or not given) -> error or None.
Rule = Callable[[Mapping[str, Any]], "str | None"]


def is_number(value) -> bool:
    """An int or float (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value) -> str:
    if value == SEED_MAX:
        return "2^64-1"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket type (LATENT, ...)
    help: str  # the tooltip without its range (see ``tooltip``)
    default: Any = None
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    options: tuple = ()  # static COMBO options
    options_source: str | None = None  # dynamic COMBO options: a model folder name (files listed at runtime)
    optional: bool = False
    multiline: bool = False
    control_after_generate: bool = False
    display_name: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def bounds(self) -> str:
        """'a-b' (or 'a to b' when a bound is written with a '-') from min/max; '' without both."""
        if self.min is None or self.max is None:
            return ""
        lo, hi = _number(self.min), _number(self.max)
        return f"{lo} to {hi}" if "-" in lo + hi else f"{lo}-{hi}"

    @property
    def range_text(self) -> str:
        return f"Range {self.bounds}." if self.bounds else ""

    @property
    def tooltip(self) -> str:
        return f"{self.help} {self.range_text}" if self.range_text else self.help

    def check(self, value) -> str | None:
        """The value against this input's own limits (range, NaN, static options); None when fine or None."""
        if value is None:
            return None
        if self.type in ("INT", "FLOAT"):
            if not is_number(value):
                return f"{self.name} must be a number, got {value!r}"
            if isinstance(value, float) and math.isnan(value):
                return f"{self.name} is not a number (NaN); use a value in {self.bounds or 'its range'}"
            if self.min is not None and value < self.min:
                return f"{self.name} {value} is below the minimum {self.min}"
            if self.max is not None and value > self.max:
                return f"{self.name} {value} is above the maximum {self.max}"
            if self.type == "INT" and not isinstance(value, numbers.Integral) and not float(value).is_integer():
                return f"{self.name} must be a whole number, got {value}"
        elif self.type == "COMBO" and self.options and value not in self.options:
            return f"{self.name} '{value}' is not one of: {', '.join(map(str, self.options))}"
        return None


@dataclass(frozen=True)
class OutputSpec:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    is_output_node: bool = False
    search_aliases: tuple[str, ...] = field(default_factory=tuple)
    rules: tuple[Rule, ...] = field(default=(), compare=False, repr=False)

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"{self.node_id} has no input '{name}'")

    @property
    def defaults(self) -> dict[str, Any]:
        """The widgets' defaults by name."""
        return {i.name: i.default for i in self.inputs if i.is_widget}


def input_errors(spec: NodeSpec, **values) -> list[str]:
    """Every problem of the given values, each once: each value against its input's range/options (from the
    spec), then the node's cross-field rules over the values that passed (a value that failed its own check is
    passed to the rules as None, so a rule never repeats it). None values (linked inputs) are skipped."""
    errors, passed = [], {}
    for name, value in values.items():
        err = spec.input(name).check(value)
        if err:
            errors.append(err)
        passed[name] = None if err else value
    for rule in spec.rules:
        err = rule(passed)
        if err and err not in errors:
            errors.append(err)
    return errors


def check_inputs(spec: NodeSpec, **values) -> bool | str:
    """True, or one text naming every problem once ('; ' between them): see ``input_errors``."""
    errors = input_errors(spec, **values)
    return "; ".join(errors) if errors else True


def validate_node(spec: NodeSpec, **values) -> bool:
    """A node's ``validate_inputs``: True, or raises ValueError with ``check_inputs``' text.

    ComfyUI attaches an error text *returned* by ``validate_inputs`` to every input named in its signature
    ('width - length 0 is below the minimum 1', 'height - length 0 ...', ...), while an exception is reported
    once for the node with its text; each problem in the text names its input.
    """
    result = check_inputs(spec, **values)
    if result is not True:
        raise ValueError(result)
    return True


def check_values(spec: NodeSpec, **values) -> None:
    """The run-time twin of ``check_inputs``' first half: every given value against its input's limits (number,
    range, static options), raising ValueError naming the input. Inputs linked from another node reach
    ``validate_inputs`` as None, so a node's ``execute`` checks the values it gets (None: not given)."""
    for name, value in values.items():
        err = spec.input(name).check(value)
        if err:
            raise ValueError(err)


# -- the /object_info view of a spec (what ComfyUI serves for our nodes) ----------------------------------
def _input_info(spec: InputSpec, options: list | None) -> list:
    opts: dict[str, Any] = {"tooltip": spec.tooltip}
    if spec.display_name:
        opts["display_name"] = spec.display_name
    if spec.type == "COMBO":
        values = list(options if options is not None else spec.options)
        if spec.default is not None and spec.default in values:
            opts["default"] = spec.default
        opts["multiselect"] = False
        opts["options"] = values
    elif spec.is_widget:
        for key in ("default", "min", "max", "step"):
            value = getattr(spec, key)
            if value is not None:
                opts[key] = value
        if spec.type == "INT" and spec.control_after_generate:
            opts["control_after_generate"] = True
        if spec.type == "STRING":
            opts["multiline"] = spec.multiline
    return [spec.type, opts]


def object_info(spec: NodeSpec, dynamic_options: dict[str, list] | None = None) -> dict:
    """The node's entry as ComfyUI's GET /object_info reports it (dynamic file lists from the argument)."""
    dynamic_options = dynamic_options or {}
    sections: dict[str, dict] = {"required": {}}
    for i in spec.inputs:
        section = "optional" if i.optional else "required"
        sections.setdefault(section, {})[i.name] = _input_info(i, dynamic_options.get(i.name))
    if spec.is_output_node:  # ComfyUI adds these hidden inputs to every V3 output node
        sections["hidden"] = {"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]}
    return {
        "input": sections,
        "input_order": {k: list(v) for k, v in sections.items()},
        "output": [o.type for o in spec.outputs],
        "output_is_list": [False for _ in spec.outputs],
        "output_name": [o.name for o in spec.outputs],
        "output_tooltips": [o.tooltip for o in spec.outputs],
        "name": spec.node_id,
        "display_name": spec.display_name,
        "description": spec.description,
        "category": spec.category,
        "output_node": spec.is_output_node,
    }
