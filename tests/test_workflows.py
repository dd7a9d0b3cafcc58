"""Shipped workflows, checked against our node schemas and a recorded snapshot of core's (no ComfyUI)."""

import copy
import json
from pathlib import Path

import pytest

from self_forcing.sf_model import weights
from self_forcing.nodes.toy import TOY_MODELS
from self_forcing.sf_model.checkpoint import load_model
from self_forcing.workflows import build
from self_forcing.workflows.check import check_api, ui_to_api
from self_forcing.workflows.schemas import all_schemas, core_schemas

REPO = Path(__file__).resolve().parent.parent
API = sorted((REPO / "workflows" / "api").glob("*.json"))
UI = sorted((REPO / "example_workflows").glob("*.json"))
SCHEMAS = all_schemas()


def load(path):
    return json.loads(path.read_text())


def by_class(prompt, class_type):
    return [n for n in prompt.values() if n["class_type"] == class_type]


def test_the_core_snapshot_is_a_real_object_info_recording():
    core = core_schemas()
    assert {"VAEDecode", "CreateVideo", "SaveVideo", "CLIPLoader", "CLIPTextEncode", "VAEEncode"} <= set(core)
    assert "wan" in core["CLIPLoader"]["input"]["required"]["type"][0]
    assert core["VAEDecode"]["output"] == ["IMAGE"] and core["CreateVideo"]["output"] == ["VIDEO"]


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_is_valid(path):
    assert check_api(load(path), SCHEMAS) == []


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_uses_the_real_file_names_and_saves_something(path):
    prompt = load(path)
    for n in by_class(prompt, "SelfForcingModelLoader"):
        assert n["inputs"]["model_name"] == weights.SELF_FORCING.name
    for n in by_class(prompt, "SelfForcingToyModelLoader"):
        assert n["inputs"]["model_name"] in TOY_MODELS and (REPO / "assets" / n["inputs"]["model_name"]).is_file()
    for n in by_class(prompt, "VAELoader"):
        assert n["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    for n in by_class(prompt, "CLIPLoader"):
        assert n["inputs"]["clip_name"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors" and n["inputs"]["type"] == "wan"
    assert by_class(prompt, "SaveVideo") or by_class(prompt, "SelfForcingSaveTextEmbeds")


def test_the_required_workflows_are_shipped():
    prompts = {p.stem: load(p) for p in API}
    t2v = prompts["self_forcing_t2v_stream_81f"]
    assert by_class(t2v, "SelfForcingSampler")[0]["inputs"]["length"] == 81
    long = prompts["self_forcing_long_video_rolling_30s"]
    assert by_class(long, "SelfForcingLongVideoOptions")[0]["inputs"]["cache"] == "rolling"
    fps = by_class(long, "CreateVideo")[0]["inputs"]["fps"]
    assert by_class(long, "SelfForcingSampler")[0]["inputs"]["length"] / fps >= 29.5
    ext = prompts["self_forcing_extend_video"]
    assert by_class(ext, "LoadVideo") and by_class(ext, "VAEEncode") and by_class(ext, "SelfForcingExtendVideo")
    i2v = prompts["self_forcing_image_to_video"]
    assert by_class(i2v, "LoadImage") and by_class(i2v, "SelfForcingExtendVideo")[0]["inputs"]["history_frames"] == 1
    assert {p.stem for p in UI} == set(prompts)
    assert "self_forcing_toy_demo" in prompts


def test_the_toy_demo_runs_the_bundled_model_as_the_cli_does():
    prompt = load(REPO / "workflows" / "api" / "self_forcing_toy_demo.json")
    meta = load_model(str(REPO / "assets" / TOY_MODELS[0])).meta
    model = node(prompt, "SelfForcingToyModelLoader")
    encode, decode = by_class(prompt, "SelfForcingToyTextEncode")[0], by_class(prompt, "SelfForcingToyDecode")[0]
    sampler_id = node(prompt, "SelfForcingSampler")
    sampler = prompt[sampler_id]["inputs"]
    assert encode["inputs"]["model"] == decode["inputs"]["model"] == sampler["model"] == [model, 0]
    assert prompt[sampler["positive"][0]]["class_type"] == "SelfForcingToyTextEncode"
    assert decode["inputs"]["latent"] == [sampler_id, 0]
    size = meta["toy"]["size"]
    assert (sampler["width"], sampler["height"], sampler["length"]) == (size, size, 45)
    # the sampling settings the checkpoint's metadata carries (what self-forcing generate uses)
    assert sampler["frames_per_block"] == meta["frames_per_block"] and sampler["shift"] == meta["shift"]
    assert [int(s) for s in sampler["steps"].split(",")] == list(meta["steps"])
    assert sampler["context_noise"] == meta["context_noise"]
    # past the training clip the CLI uses a rolling cache of the training clip length, no sink
    opts = prompt[sampler["options"][0]]["inputs"]
    assert (opts["cache"], opts["window"], opts["sink"], opts["routing_topk"]) == (
        "rolling", meta["toy"]["train_frames"], 0, 0)
    video = by_class(prompt, "CreateVideo")[0]["inputs"]
    assert video["fps"] == meta["toy"]["fps"] and prompt[video["images"][0]]["class_type"] == "SelfForcingToyDecode"
    assert not by_class(prompt, "VAEDecode") and not by_class(prompt, "CLIPLoader")


def test_the_stream_decode_workflow_feeds_the_sampler_images_to_create_video():
    prompt = load(REPO / "workflows" / "api" / "self_forcing_t2v_stream_decode.json")
    sampler_id = node(prompt, "SelfForcingSampler")
    sampler = prompt[sampler_id]["inputs"]
    assert prompt[sampler["vae"][0]]["class_type"] == "VAELoader"
    assert prompt[sampler["live_frames"][0]]["class_type"] == "SelfForcingLiveFrames"
    assert by_class(prompt, "CreateVideo")[0]["inputs"]["images"] == [sampler_id, 1]  # the IMAGE output
    assert not by_class(prompt, "VAEDecode")  # nothing is decoded twice
    for name in ("self_forcing_t2v_stream_81f", "self_forcing_long_video_rolling_30s"):
        plain = load(REPO / "workflows" / "api" / f"{name}.json")  # the plain graphs stay as they were
        assert "vae" not in by_class(plain, "SelfForcingSampler")[0]["inputs"] and by_class(plain, "VAEDecode")


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_ui_workflow_converts_to_its_api_twin(path):
    ui = load(path)
    twin = load(REPO / "workflows" / "api" / path.name)
    converted = ui_to_api(ui, SCHEMAS)
    # "format.codec" style keys exist only for newer cores' dynamic combos; a 0.3.64 UI file has no slot for them
    strip = lambda d: {k: {"class_type": v["class_type"],  # noqa: E731
                           "inputs": {n: x for n, x in v["inputs"].items() if "." not in n}} for k, v in d.items()}
    assert strip(converted) == strip(twin)
    for link in ui["links"]:  # every UI link's type is the source output's and the target input's type
        link_id, src, src_slot, dst, dst_slot, typ = link
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert src_node["outputs"][src_slot]["type"] == typ
        assert dst_node["inputs"][dst_slot]["type"] == typ and dst_node["inputs"][dst_slot]["link"] == link_id


def test_shipped_files_match_their_definitions():
    rendered = build.render_all(SCHEMAS)
    assert set(rendered) == set(API) | set(UI)
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m self_forcing.workflows.build"


# -- the checker itself catches broken workflows ----------------------------------------------------
def t2v():
    return copy.deepcopy(load(REPO / "workflows" / "api" / "self_forcing_t2v_stream_81f.json"))


def node(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


@pytest.mark.parametrize("mutate, expect", [
    (lambda p: p[node(p, "VAEDecode")].update(class_type="VAEDecodeTypo"), "unknown node class"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].update(widht=832), "unknown input 'widht'"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].pop("seed"), "required input 'seed' is missing"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].update(width="832"), "not an integer"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].update(width=8192), "above the maximum"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].update(length=80), "use 77 or 81"),
    (lambda p: p[node(p, "CLIPLoader")]["inputs"].update(type="wan2"), "is not one of"),
    (lambda p: p[node(p, "SelfForcingModelLoader")]["inputs"].update(dtype="int8"), "is not one of"),
    (lambda p: p[node(p, "SelfForcingSampler")]["inputs"].update(positive=[node(p, "VAELoader"), 0]),
     "expects CONDITIONING but node"),
    (lambda p: p[node(p, "VAEDecode")]["inputs"].update(samples=["99", 0]), "missing node 99"),
    (lambda p: p[node(p, "VAEDecode")]["inputs"].update(samples=[node(p, "SelfForcingSampler"), 2]),
     "which has 2 outputs"),
    (lambda p: p[node(p, "VAEDecode")]["inputs"].update(samples=[node(p, "SelfForcingSampler"), 1]),
     "expects LATENT but node"),
    (lambda p: p[node(p, "SaveVideo")]["inputs"].update(video=12), "must be linked"),
])
def test_checker_reports_broken_workflows(mutate, expect):
    prompt = t2v()
    mutate(prompt)
    problems = check_api(prompt, SCHEMAS)
    assert len(problems) == 1 and expect in problems[0], problems


def test_checker_allows_newer_dynamic_combo_sub_inputs_only_on_known_combos():
    prompt = t2v()
    save = prompt[node(prompt, "SaveVideo")]["inputs"]
    assert "format.codec" in save and check_api(prompt, SCHEMAS) == []
    save["video.codec"] = "x"  # 'video' is a socket, not a combo
    assert check_api(prompt, SCHEMAS) == [f"node {node(prompt, 'SaveVideo')} (SaveVideo): unknown input 'video.codec'"]


# -- long video and interaction (issue 17) ---------------------------------------------------------------
def test_the_long_video_workflows_switch_prompts_and_roll_a_minute():
    from self_forcing.sf_model.window import to_official

    minute = load(REPO / "workflows" / "api" / "self_forcing_long_video_rolling_60s.json")
    fps = by_class(minute, "CreateVideo")[0]["inputs"]["fps"]
    sampler = by_class(minute, "SelfForcingSampler")[0]["inputs"]
    assert sampler["length"] / fps >= 59.5 and (sampler["length"] - 1) % 4 == 0
    opts = by_class(minute, "SelfForcingLongVideoOptions")[0]["inputs"]
    assert opts["positions"] == "rebased" and to_official(opts["window"], opts["sink"]) == 21  # the training length
    for name in ("self_forcing_long_video_rolling_60s", "self_forcing_toy_prompt_switch"):
        p = load(REPO / "workflows" / "api" / f"{name}.json")
        sampler = by_class(p, "SelfForcingSampler")[0]["inputs"]
        schedule = p[sampler["positive"][0]]
        assert schedule["class_type"] == "SelfForcingPromptSchedule"  # a chain of two switches feeds positive
        assert p[schedule["inputs"]["previous"][0]]["class_type"] == "SelfForcingPromptSchedule"
        starts = [n["inputs"]["start_frame"] for n in by_class(p, "SelfForcingPromptSchedule")]
        assert len(starts) == 2 and max(starts) < sampler["length"]


def test_the_toy_prompt_switch_workflow_runs_as_the_core_stream():
    """The toy switch graph through the nodes' plain functions (shortened to 33 frames) equals the core sampler fed
    with the same PromptSchedule, and its first chunks equal a run of the first prompt alone."""
    import torch

    from self_forcing.nodes.long_video import LongVideoOptions, add_prompt
    from self_forcing.nodes.model import load_handle
    from self_forcing.nodes.sampling import sample_video
    from self_forcing.nodes.toy import encode_toy_prompt, toy_model_path
    from self_forcing.sf_model.prompt_schedule import PromptSchedule, PromptSwitch
    from self_forcing.sf_model.sampler import StreamOptions, generate
    from self_forcing.toy.bundle import encode_prompt

    p = load(REPO / "workflows" / "api" / "self_forcing_toy_prompt_switch.json")
    cpu = torch.device("cpu")
    name = p[node(p, "SelfForcingToyModelLoader")]["inputs"]["model_name"]
    toy = load_handle(toy_model_path(name), name, dtype="fp32", attention="sdpa", load_device=cpu, offload_device=cpu,
                      keep_loaded=True, supports_bf16=False)
    texts = {k: v["inputs"]["text"] for k, v in p.items() if v["class_type"] == "SelfForcingToyTextEncode"}
    conds = {k: encode_toy_prompt(toy, t) for k, t in texts.items()}
    schedules = {}
    for k in sorted((k for k, v in p.items() if v["class_type"] == "SelfForcingPromptSchedule"), key=int):
        i = p[k]["inputs"]
        prev = conds.get(i["previous"][0]) or schedules[i["previous"][0]]
        schedules[k] = add_prompt(prev, conds[i["conditioning"][0]], i["start_frame"] // 2, i["switch"])
    s = p[node(p, "SelfForcingSampler")]["inputs"]
    opts_in = p[node(p, "SelfForcingLongVideoOptions")]["inputs"]
    options = LongVideoOptions(**opts_in)
    out = sample_video(toy, schedules[s["positive"][0]], width=32, height=32, length=33, seed=s["seed"],
                       long_video=options)
    order = [p[k]["inputs"] for k in sorted(schedules, key=int)]
    enc = {k: encode_prompt(toy.loaded, t, device="cpu") for k, t in texts.items()}
    schedule = PromptSchedule([PromptSwitch(0, enc[order[0]["previous"][0]])] + [
        PromptSwitch(i["start_frame"] // 2, enc[i["conditioning"][0]], i["switch"]) for i in order])
    opts = StreamOptions.from_policy(options.policy(3, toy.meta), steps=tuple(toy.meta["steps"]),
                                     shift=float(toy.meta["shift"]), partial_last_chunk=True)
    assert torch.equal(out, generate(toy.model, schedule, num_frames=33, height=16, width=16, seed=s["seed"],
                                     options=opts))
    alone = generate(toy.model, schedule.entries[0].context, num_frames=12, height=16, width=16, seed=s["seed"],
                     options=opts)
    assert torch.equal(out[:, :, :12], alone) and not torch.allclose(out[:, :, 12:15], generate(
        toy.model, schedule.entries[0].context, num_frames=15, height=16, width=16, seed=s["seed"],
        options=opts)[:, :, 12:])
