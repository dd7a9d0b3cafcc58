"""Node schemas: stable ids, append-only inputs, tooltips with ranges, V3-only registration."""

import ast
from pathlib import Path

from self_forcing.nodes import catalogue, live, long_video, model, sampling, schema, text, toy
from self_forcing.nodes.schema import check_inputs

REPO = Path(__file__).resolve().parent.parent

# Inputs and outputs as first released. Saved workflows depend on them (widgets_values are positional):
# ids never change and new inputs are only ever appended, so each list must stay a prefix of the current one.
FROZEN = {
    "SelfForcingModelLoader": (["model_name", "dtype", "attention", "device", "keep_loaded", "download_if_missing"],
                               ["SELF_FORCING_MODEL", "STRING"]),
    "SelfForcingLongVideoOptions": (["cache", "window", "sink", "routing_topk"], ["SELF_FORCING_OPTIONS"]),
    "SelfForcingSampler": (["model", "positive", "width", "height", "length", "seed", "frames_per_block", "steps",
                            "shift", "context_noise", "options"], ["LATENT"]),
    "SelfForcingExtendVideo": (["model", "positive", "latent", "extend_frames", "history_frames",
                                "resample_strength", "seed", "frames_per_block", "steps", "shift", "context_noise",
                                "output", "options"], ["LATENT"]),
    "SelfForcingLiveFrames": (["send", "every_nth", "max_size", "format", "quality"], ["SELF_FORCING_LIVE_FRAMES"]),
    "SelfForcingSaveTextEmbeds": (["conditioning", "filename_prefix", "folder"], ["STRING"]),
    "SelfForcingLoadTextEmbeds": (["embeds_name"], ["CONDITIONING"]),
    "SelfForcingToyModelLoader": (["model_name", "device"], ["SELF_FORCING_MODEL", "STRING"]),
    "SelfForcingToyTextEncode": (["model", "text"], ["CONDITIONING"]),
    "SelfForcingToyDecode": (["model", "latent"], ["IMAGE"]),
}


def test_node_ids_are_stable_and_inputs_only_appended():
    assert set(catalogue.NODES_BY_ID) >= set(FROZEN)
    for node_id, (inputs, outputs) in FROZEN.items():
        spec = catalogue.NODES_BY_ID[node_id]
        assert [i.name for i in spec.inputs][:len(inputs)] == inputs, node_id
        assert [o.type for o in spec.outputs][:len(outputs)] == outputs, node_id
        appended = spec.inputs[len(inputs):]
        assert all(i.optional for i in appended), f"{node_id}: new inputs must be optional"


def test_one_category_root_and_core_types_where_core_has_them():
    for spec in catalogue.ALL_NODES:
        assert spec.category.startswith(schema.ROOT + "/"), spec.node_id
        assert spec.node_id.startswith("SelfForcing") and spec.display_name and spec.description
    sockets = {i.type for s in catalogue.ALL_NODES for i in s.inputs if not i.is_widget}
    sockets |= {o.type for s in catalogue.ALL_NODES for o in s.outputs}
    # Only the model handle and the two options bundles are our own types; prompts, VAEs, images use core's.
    assert sockets - {"LATENT", "CONDITIONING", "STRING", "VAE", "IMAGE", "MODEL"} == {schema.MODEL_TYPE, schema.OPTIONS_TYPE,
                                                                              schema.LIVE_TYPE}


def test_toy_nodes_sit_together_and_take_the_model_first():
    nodes = [toy.TOY_LOADER, toy.TOY_ENCODE, toy.TOY_DECODE]
    assert all(s.category == schema.CAT_TOY for s in nodes)
    assert [i.type for i in toy.TOY_ENCODE.inputs] == [schema.MODEL_TYPE, "STRING"]
    assert [i.type for i in toy.TOY_DECODE.inputs] == [schema.MODEL_TYPE, "LATENT"]
    assert toy.TOY_ENCODE.input("text").multiline and toy.TOY_ENCODE.input("text").default == toy.TOY_PROMPT
    assert toy.TOY_LOADER.input("model_name").options == toy.TOY_MODELS  # static: files shipped with the pack
    assert not toy.TOY_LOADER.input("model_name").options_source


def test_decode_as_you_go_is_appended_to_both_samplers():
    for spec in (sampling.SAMPLER, sampling.EXTEND):
        names = [i.name for i in spec.inputs]
        assert names[-3:] == ["options", "vae", "live_frames"], spec.node_id  # appended after the old last input
        assert spec.input("vae").type == "VAE" and spec.input("vae").optional
        assert spec.input("live_frames").type == schema.LIVE_TYPE and spec.input("live_frames").optional
        assert [o.type for o in spec.outputs] == ["LATENT", "IMAGE"]
        info = schema.object_info(spec)
        assert info["input_order"]["optional"] == ["options", "vae", "live_frames"]
        assert info["output_name"] == ["latent", "images"]
        # widgets_values of saved UI workflows are positional: sockets take no slot, so nothing shifts
        assert all(not i.is_widget for i in spec.inputs[len(FROZEN[spec.node_id][0]):])


def test_every_input_has_a_tooltip_with_its_range():
    for spec in catalogue.ALL_NODES:
        for i in spec.inputs:
            assert i.tooltip and len(i.tooltip) >= 30, (spec.node_id, i.name)
            if i.type in ("INT", "FLOAT") and i.min is not None and i.max is not None:
                assert "Range" in i.tooltip, (spec.node_id, i.name)


def test_defaults_are_valid():
    for spec in catalogue.ALL_NODES:
        for i in spec.inputs:
            if i.type in ("INT", "FLOAT") and i.default is not None:
                assert i.min <= i.default <= i.max, (spec.node_id, i.name)
            if i.type == "COMBO" and i.options:
                assert i.default in i.options, (spec.node_id, i.name)
    d = {i.name: i.default for i in sampling.SAMPLER.inputs}
    assert check_inputs(sampling.SAMPLER, **{k: d[k] for k in ("width", "height", "length", "frames_per_block",
                                                               "steps", "shift", "context_noise")}) is True
    d = {i.name: i.default for i in sampling.EXTEND.inputs}
    assert check_inputs(sampling.EXTEND, **{k: d[k] for k in ("extend_frames", "history_frames", "resample_strength",
                                                              "frames_per_block", "steps", "shift",
                                                              "context_noise")}) is True
    d = {i.name: i.default for i in long_video.OPTIONS.inputs}
    assert check_inputs(long_video.OPTIONS, **{k: d[k] for k in ("cache", "window", "sink", "routing_topk")}) is True
    d = {i.name: i.default for i in live.LIVE.inputs}
    assert check_inputs(live.LIVE, **{k: d[k] for k in ("every_nth", "max_size", "format", "quality")}) is True
    assert "format 'gif'" in check_inputs(live.LIVE, format="gif")
    assert "every_nth" in check_inputs(live.LIVE, every_nth=0)


def test_object_info_view_matches_the_spec():
    info = schema.object_info(sampling.SAMPLER)
    assert info["input_order"]["required"][:3] == ["model", "positive", "width"]
    assert info["input"]["optional"]["options"][0] == schema.OPTIONS_TYPE
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert info["output"] == ["LATENT", "IMAGE"]
    save = schema.object_info(text.SAVE_EMBEDS)
    assert save["output_node"] and set(save["input"]["hidden"]) == {"prompt", "extra_pnginfo"}
    loader = schema.object_info(model.LOADER, {"model_name": ["a.safetensors"]})
    assert loader["input"]["required"]["model_name"][1]["options"] == ["a.safetensors"]


def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_v3_entrypoint_without_node_class_mappings():
    root = _module(REPO / "__init__.py")
    names = {t.id for n in ast.walk(root) if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    assert "NODE_CLASS_MAPPINGS" not in names  # core would then skip comfy_entrypoint
    assert any(isinstance(n, ast.AsyncFunctionDef) and n.name == "comfy_entrypoint" for n in root.body)
    ext = _module(REPO / "nodes" / "comfy.py")
    assert any(isinstance(n, ast.ClassDef) and n.name == "SelfForcingExtension" for n in ext.body)
    registered = [n.value for n in ext.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "NODES"]
    listed = {e.id for e in registered[0].elts if isinstance(e, ast.Name)}
    classes = {n.name for n in ext.body if isinstance(n, ast.ClassDef) and n.name != "SelfForcingExtension"}
    assert listed == set(catalogue.NODES_BY_ID) == classes  # every spec has a class, every class is registered


def test_plain_node_modules_do_not_import_comfyui():
    comfy = {"comfy", "comfy_api", "folder_paths", "server", "nodes", "latent_preview", "execution"}
    for path in [p for p in (REPO / "nodes").glob("*.py") if p.name != "comfy.py"] + [REPO / "sf_model" / "weights.py"]:
        for n in ast.walk(_module(path)):
            if isinstance(n, ast.Import):
                mods = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                mods = [n.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in comfy for m in mods), (path.name, mods)
