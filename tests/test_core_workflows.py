"""The core-MODEL workflows (core UNETLoader -> core LoraLoaderModelOnly -> our sampler; 14B in fp8): their graphs,
their check against ComfyUI's schemas (the sampler's model socket takes a core MODEL), their editor files."""

import copy
import json
from pathlib import Path

from self_forcing.nodes.core_model import UNION_TYPE
from self_forcing.sf_model import weights
from self_forcing.sf_model.layouts import release_for
from self_forcing.workflows import build
from self_forcing.workflows.check import check_api
from self_forcing.workflows.schemas import all_schemas, core_schemas

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = all_schemas()


def load(name, ui=False):
    folder = REPO / ("example_workflows" if ui else "workflows/api")
    return json.loads((folder / f"{name}.json").read_text())


def only(prompt, class_type):
    found = [(k, n) for k, n in prompt.items() if n["class_type"] == class_type]
    assert len(found) == 1, (class_type, found)
    return found[0]


def test_core_lora_graph():
    prompt = load("self_forcing_core_lora")
    unet_id, unet = only(prompt, "UNETLoader")
    lora_id, lora = only(prompt, "LoraLoaderModelOnly")
    _, sampler = only(prompt, "SelfForcingSampler")
    assert unet["inputs"] == {"unet_name": weights.SELF_FORCING.name, "weight_dtype": "default"}
    assert lora["inputs"]["model"] == [unet_id, 0] and lora["inputs"]["lora_name"] == build.CORE_LORA
    assert sampler["inputs"]["model"] == [lora_id, 0]
    assert (sampler["inputs"]["width"], sampler["inputs"]["height"], sampler["inputs"]["length"]) == (832, 480, 81)
    positive = prompt[sampler["inputs"]["positive"][0]]
    assert positive["class_type"] == "SelfForcingLoadTextEmbeds"
    _, decode = only(prompt, "VAEDecode")
    assert decode["inputs"]["samples"][0] == only(prompt, "SelfForcingSampler")[0]
    only(prompt, "SaveVideo")
    assert check_api(prompt, SCHEMAS) == []


def test_14b_low_memory_graph():
    prompt = load("self_forcing_14b_low_memory")
    unet_id, unet = only(prompt, "UNETLoader")
    _, sampler = only(prompt, "SelfForcingSampler")
    assert unet["inputs"] == {"unet_name": build.KREA_14B, "weight_dtype": "fp8_e4m3fn"}
    assert sampler["inputs"]["model"] == [unet_id, 0]
    assert (sampler["inputs"]["width"], sampler["inputs"]["height"]) == (832, 480)
    assert sampler["inputs"]["frames_per_block"] == 3  # what Krea Realtime 14B was trained with
    assert release_for(build.KREA_14B).meta["frames_per_block"] == 3
    assert not [n for n in prompt.values() if n["class_type"] == "CLIPLoader"]  # no text encoder loaded
    assert check_api(prompt, SCHEMAS) == []


def test_the_checker_needs_the_core_model_union_on_the_sampler():
    """The samplers' schema as ComfyUI shows it takes MODEL; with the plain spec type the core links are refused."""
    sampler = SCHEMAS["SelfForcingSampler"]["input"]["required"]["model"][0]
    assert sampler == UNION_TYPE
    plain = copy.deepcopy(SCHEMAS)
    plain["SelfForcingSampler"]["input"]["required"]["model"][0] = "SELF_FORCING_MODEL"
    problems = check_api(load("self_forcing_core_lora"), plain)
    assert problems and "expects SELF_FORCING_MODEL" in problems[0]
    # a LoRA node that feeds the sampler a wrong type is still caught with the union
    bad = load("self_forcing_core_lora")
    lora_id, _ = only(bad, "LoraLoaderModelOnly")
    _, sampler_node = only(bad, "SelfForcingSampler")
    sampler_node["inputs"]["model"] = [only(bad, "VAELoader")[0], 0]
    assert any("expects SELF_FORCING_MODEL,MODEL" in p for p in check_api(bad, SCHEMAS))


def test_editor_files_type_the_model_link_by_what_feeds_it():
    for name, want in (("self_forcing_core_lora", "MODEL"), ("self_forcing_14b_low_memory", "MODEL"),
                       ("self_forcing_t2v_stream_81f", "SELF_FORCING_MODEL")):
        ui = load(name, ui=True)
        sampler = next(n for n in ui["nodes"] if n["type"] == "SelfForcingSampler")
        slot = next(i for i in sampler["inputs"] if i["name"] == "model")
        link = next(l for l in ui["links"] if l[0] == slot["link"])
        assert slot["type"] == link[5] == want, name
        assert any(n["type"] == "MarkdownNote" for n in ui["nodes"])


def test_core_snapshot_has_the_lora_node_as_recorded():
    lora = core_schemas()["LoraLoaderModelOnly"]
    assert lora["input"]["required"]["model"] == ["MODEL"] and lora["output"] == ["MODEL"]
    assert "lora_name" in lora["_file_inputs"]
