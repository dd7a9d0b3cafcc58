"""Reliability holes of the nodes (concurrent saves, paths, clear errors, shared model handles, queue-time checks).

The node classes of ``nodes/comfy.py`` run here against small stand-ins for the few ComfyUI modules they import
(``comfy.model_management``, ``comfy.utils``, ``folder_paths``, ``comfy_api.latest``), so their ``execute`` and
``validate_inputs`` are exercised as ComfyUI calls them, on the CPU and without ComfyUI.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import threading
import types

import pytest
import torch

from self_forcing.nodes import text
from self_forcing.sf_model.text_embeds import load_text_embeds

DIM = 32


# -- stand-ins for the ComfyUI modules comfy.py imports ------------------------------------------------
class _Widget:
    io_type = "*"

    class Input:
        def __init__(self, name, **kw):
            self.name, self.kw = name, kw

    class Output:
        def __init__(self, **kw):
            self.kw = kw


def _socket(io_type):
    return type(io_type, (_Widget,), {"io_type": io_type})


@dataclasses.dataclass
class _Schema:
    node_id: str
    display_name: str = ""
    category: str = ""
    description: str = ""
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    is_output_node: bool = False


class _NodeOutput:
    def __init__(self, *values, ui=None):
        self.values, self.ui = values, ui


def _fake_comfyui(fp) -> dict:
    io = types.SimpleNamespace(ComfyNode=type("ComfyNode", (), {}), Schema=_Schema, NodeOutput=_NodeOutput,
                               Custom=_socket)
    for name in ("Int", "Float", "String", "Boolean", "Combo", "Latent", "Conditioning", "Image", "Video", "Vae"):
        setattr(io, name, _socket(name.upper()))
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io, types.SimpleNamespace(PreviewText=lambda t: t)
    latest.ComfyExtension = type("ComfyExtension", (), {})
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = mm.unet_offload_device = mm.intermediate_device = lambda: torch.device("cpu")
    mm.free_memory = mm.load_models_gpu = lambda *a, **k: None
    mm.soft_empty_cache = mm.throw_exception_if_processing_interrupted = lambda *a, **k: None
    mm.should_use_bf16 = lambda *a, **k: False
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda *a, **k: None)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    api = types.ModuleType("comfy_api")
    api.latest = latest
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "comfy_api": api,
            "comfy_api.latest": latest, "folder_paths": fp}


def fake_folder_paths(root) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = os.path.join(root, "models")
    fp.folder_names_and_paths = {"diffusion_models": ([os.path.join(fp.models_dir, "diffusion_models")], {".pt"})}
    fp.filename_list_cache = {}
    fp.get_output_directory = lambda: os.path.join(root, "output")
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])

    def get_full_path(name, filename):
        for folder in fp.get_folder_paths(name):
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.get_full_path = get_full_path
    fp.get_filename_list = lambda name: sorted(
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for folder in fp.get_folder_paths(name) for d, _, files in os.walk(folder) for f in files)
    return fp


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """``self_forcing.nodes.comfy`` imported against the stand-ins; ``comfy.fp`` is the fake folder_paths."""
    fp = fake_folder_paths(str(tmp_path))
    for name, module in _fake_comfyui(fp).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "self_forcing.nodes.comfy", raising=False)
    module = importlib.import_module("self_forcing.nodes.comfy")
    module.ensure_folders()
    module.fp = fp
    yield module
    sys.modules.pop("self_forcing.nodes.comfy", None)


def cond(seed=0, batch=1, tokens=5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, DIM, generator=g), {"pooled_output": None}]]


def embeds_dir(comfy) -> str:
    return comfy.fp.get_folder_paths(text.TEXT_EMBEDS)[0]


# -- 7: concurrent saves with one prefix ---------------------------------------------------------------
def test_concurrent_saves_with_one_prefix_each_get_their_own_file(comfy):
    node, n = comfy.SelfForcingSaveTextEmbeds, 8
    start, results, errors = threading.Barrier(n), [None] * n, []

    def save(i):
        try:
            start.wait()
            results[i] = node.execute(cond(seed=i), filename_prefix="race", folder=text.TEXT_EMBEDS).values[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == n, results  # every run names its own file
    files = sorted(f for f in os.listdir(embeds_dir(comfy)) if f.startswith("race_"))
    assert files == [f"race_{i:05d}.safetensors" for i in range(1, n + 1)], files  # no temporary files left
    for i, rel in enumerate(results):
        saved, _ = load_text_embeds(os.path.join(embeds_dir(comfy), rel))
        assert torch.equal(saved, cond(seed=i)[0][0])  # with its own content


# -- 8: a symlinked sub-folder must not lead out of the embeds folder ----------------------------------
def test_a_symlinked_subfolder_cannot_lead_outside_the_embeds_folder(comfy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = embeds_dir(comfy)
    os.makedirs(root, exist_ok=True)
    os.symlink(outside, os.path.join(root, "linkdir"))
    with pytest.raises(ValueError, match="filename_prefix 'linkdir/escaped' points outside"):
        comfy.SelfForcingSaveTextEmbeds.execute(cond(), filename_prefix="linkdir/escaped", folder=text.TEXT_EMBEDS)
    with pytest.raises(ValueError, match="points outside"):
        comfy.SelfForcingSaveTextEmbeds.execute(cond(), filename_prefix="linkdir/new/escaped", folder=text.TEXT_EMBEDS)
    assert list(outside.iterdir()) == []  # nothing written (or created) outside
    # A symlink inside the folder that stays inside is fine, and so is an embeds folder that is itself a link.
    os.makedirs(os.path.join(root, "real"))
    os.symlink(os.path.join(root, "real"), os.path.join(root, "alias"))
    saved = comfy.SelfForcingSaveTextEmbeds.execute(cond(), filename_prefix="alias/ok").values[0]
    assert saved == "alias/ok_00001.safetensors"
    linked_root = tmp_path / "linked_root"
    os.symlink(root, linked_root)
    assert text.save_embeds(str(linked_root), "sub/x", cond()[0][0])[1] == "sub/x_00001.safetensors"


# -- 11: one clear error instead of a raw traceback ----------------------------------------------------
def test_an_over_long_filename_prefix_is_refused_naming_the_input_and_the_limit(comfy):
    node = comfy.SelfForcingSaveTextEmbeds
    limit = os.pathconf(comfy.fp.models_dir if os.path.isdir(comfy.fp.models_dir) else "/", "PC_NAME_MAX")
    longest = limit - len("_00001.safetensors")
    with pytest.raises(ValueError, match=rf"filename_prefix is too long.*at most {longest} characters") as e:
        node.execute(cond(), filename_prefix="p" * 300)
    assert not isinstance(e.value, OSError)
    with pytest.raises(ValueError, match=rf"filename_prefix.*folder name.*at most {limit} characters"):
        node.execute(cond(), filename_prefix="d" * 300 + "/x")
    with pytest.raises(ValueError, match="filename_prefix .* too long"):  # each name fits, the whole path does not
        node.execute(cond(), filename_prefix="/".join(["d" * 200] * 30) + "/x")
    assert node.execute(cond(), filename_prefix="p" * longest).values[0] == "p" * longest + "_00001.safetensors"
    assert os.listdir(embeds_dir(comfy)) == ["p" * longest + "_00001.safetensors"]  # nothing else left behind


def tiny_handle(model, **kw):
    from self_forcing.nodes.model import ModelHandle
    from self_forcing.sf_model.checkpoint import LoadedModel

    fields = dict(load_device=torch.device("cpu"), offload_device=torch.device("cpu"), dtype=torch.float32)
    fields.update(kw)
    return ModelHandle(LoadedModel(model, model.config, "test layout", {}), "tiny.safetensors", **fields)


@pytest.mark.parametrize("shape, match", [((0, 5, DIM), "batch 0"), ((1, 0, DIM), "no tokens")])
def test_an_empty_conditioning_is_one_clear_error(comfy, tiny_model, shape, match):
    from self_forcing.nodes.sampling import extend_video, sample_video

    empty = [[torch.zeros(shape), {"pooled_output": None}]]
    h = tiny_handle(tiny_model)
    with pytest.raises(ValueError, match=f"positive.*{match}"):
        sample_video(h, empty, width=32, height=32, length=5, seed=0)
    with pytest.raises(ValueError, match=f"positive.*{match}"):
        extend_video(h, empty, {"samples": torch.zeros(1, 16, 2, 4, 4)}, extend_frames=4, history_frames=1,
                     resample_strength=0.3, seed=0)
    with pytest.raises(ValueError, match=f"conditioning.*{match}"):
        comfy.SelfForcingSaveTextEmbeds.execute(empty, filename_prefix="empty")
    assert not os.path.exists(embeds_dir(comfy)) or os.listdir(embeds_dir(comfy)) == []


def test_steps_inf_is_one_clear_error_at_queue_time_and_at_run_time(comfy, tiny_model):
    from self_forcing.nodes.sampling import sample_video

    for steps in ("inf", "1000, inf", "-inf", "nan", "1e400"):
        with pytest.raises(ValueError, match="steps"):
            sample_video(tiny_handle(tiny_model), cond(), width=32, height=32, length=5, seed=0, steps=steps)
        with pytest.raises(ValueError, match="steps"):
            comfy.SelfForcingSampler.validate_inputs(steps=steps)


# -- 15: one model handle used by two runs at once -----------------------------------------------------
def test_a_run_ending_does_not_park_the_model_under_another_run(make_tiny):
    """Two runs share a handle whose offload device differs from the load device ('meta' stands in for the
    offload device: parking there drops the weights, so a run that loses them fails). The second run must see
    the model on the load device all along, and the model is parked exactly once, when the last run ends."""
    from self_forcing.nodes.sampling import RunHooks, sample_video

    model = make_tiny()
    h = tiny_handle(model, offload_device=torch.device("meta"))
    moves, real_to = [], model.to

    def recording_to(*args, **kwargs):
        moves.append(torch.device(args[0]))
        return real_to(*args, **kwargs)

    model.to = recording_to
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    b_seen, errors = [], {}

    def a_check():
        if not a_in.is_set():
            a_in.set()
            assert b_in.wait(10)  # B is inside its run before A finishes

    def b_check():
        b_seen.append(model.device)
        if not b_in.is_set():
            b_in.set()
            a_done.wait(10)  # ... and goes on after A has finished

    def run(name, check, done=None):
        try:
            sample_video(h, cond(), width=32, height=32, length=25, seed=0, hooks=RunHooks(check_cancel=check))
        except Exception as e:  # noqa: BLE001 - reported below
            errors[name] = e
        finally:
            if done is not None:
                done.set()

    a = threading.Thread(target=run, args=("A", a_check, a_done))
    b = threading.Thread(target=run, args=("B", b_check))
    a.start()
    assert a_in.wait(10)
    b.start()
    a.join(30)
    b.join(30)
    assert not errors, errors
    assert len(b_seen) > 1 and all(d == torch.device("cpu") for d in b_seen), b_seen
    assert moves == [torch.device("meta")]  # parked once, by the last run to leave
    assert model.device.type == "meta"


# -- 16 d: a value above its maximum names the maximum (at queue time and at run time) -----------------
def test_a_value_above_its_maximum_reports_the_maximum_also_at_run_time(comfy, tiny_model):
    """Queue time had it; a value linked from another node only reaches execute, which reported the 4k+1 rule
    (suggesting 99997 or 100001) but not the maximum."""
    from self_forcing.nodes.sampling import EXTEND, SAMPLER
    from self_forcing.nodes.schema import check_inputs

    h = tiny_handle(tiny_model)
    sampler, extend = comfy.SelfForcingSampler, comfy.SelfForcingExtendVideo
    top = SAMPLER.input("length").max
    assert check_inputs(SAMPLER, length=100000) == f"length 100000 is above the maximum {top}"
    with pytest.raises(ValueError, match=f"^length 100000 is above the maximum {top}$"):
        sampler.execute(h, cond(), width=32, height=32, length=100000, seed=0)
    with pytest.raises(ValueError, match="frames_per_block 50 is above the maximum 21"):
        sampler.execute(h, cond(), width=32, height=32, length=5, seed=0, frames_per_block=50)
    with pytest.raises(ValueError, match="shift 0.5 is below the minimum 1"):
        sampler.execute(h, cond(), width=32, height=32, length=5, seed=0, shift=0.5)
    top = EXTEND.input("extend_frames").max
    latent = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    with pytest.raises(ValueError, match=f"extend_frames 100000 is above the maximum {top}"):
        extend.execute(h, cond(), latent, extend_frames=100000, history_frames=1, resample_strength=0.3, seed=0)
    with pytest.raises(ValueError, match="resample_strength 2 is above the maximum 1"):
        extend.execute(h, cond(), latent, extend_frames=4, history_frames=1, resample_strength=2, seed=0)
    with pytest.raises(ValueError, match="sink 100 is above the maximum 64"):
        comfy.SelfForcingLongVideoOptions.execute(cache="rolling", window=21, sink=100)


# -- 16 b: a non-number in a number field names the input and says it must be a number ----------------
def test_a_non_number_in_a_number_field_names_the_input(comfy, tiny_model):
    from self_forcing.nodes.live import LIVE
    from self_forcing.nodes.long_video import OPTIONS
    from self_forcing.nodes.sampling import SAMPLER, sample_video
    from self_forcing.nodes.schema import check_inputs

    h = tiny_handle(tiny_model)
    assert check_inputs(SAMPLER, width="abc") == "width must be a number, got 'abc'"
    assert check_inputs(OPTIONS, window=[3]) == "window must be a number, got [3]"
    assert check_inputs(LIVE, quality=True) == "quality must be a number, got True"
    assert check_inputs(SAMPLER, frames_per_block=2.5) == "frames_per_block must be a whole number, got 2.5"
    for name in ("width", "height", "length", "seed", "frames_per_block", "shift", "context_noise"):
        values = dict(width=32, height=32, length=5, seed=0)
        values[name] = "x"
        with pytest.raises(ValueError, match=f"^{name} must be a number, got 'x'$"):
            comfy.SelfForcingSampler.execute(h, cond(), **values)
    with pytest.raises(ValueError, match="window must be a number, got 'x'"):
        comfy.SelfForcingLongVideoOptions.execute(cache="rolling", window="x")
    with pytest.raises(ValueError, match="every_nth must be a number, got 'x'"):
        comfy.SelfForcingLiveFrames.execute(every_nth="x")
    # the plain function (Python callers): the size and length rules say so too instead of a TypeError
    with pytest.raises(ValueError, match="width must be a number, got '32'"):
        sample_video(h, cond(), width="32", height=32, length=5, seed=0)
    with pytest.raises(ValueError, match="length must be a number, got '5'"):
        sample_video(h, cond(), width=32, height=32, length="5", seed=0)


# -- 16 a: a queue-time problem is reported once, naming its input -------------------------------------
def queue_errors(node_cls, widgets: dict) -> list[str]:
    """The node errors ComfyUI's ``execution.validate_inputs`` makes of a node's ``validate_inputs`` (as in core
    0.3.64 up to the 2026 cores): the widgets named in its signature are passed; a returned error text becomes
    one 'custom_validation_failed' error per named input ('<input> - <text>'); an exception is one error for
    the node ('exception_during_(inner_)validation', its text as the details)."""
    fn = node_cls.validate_inputs
    given = {n: widgets[n] for n in inspect.getfullargspec(fn).args if n in widgets}
    try:
        result = fn(**given)
    except Exception as e:  # noqa: BLE001 - what core does
        return [str(e)]
    if result is True:
        return []
    return [f"{x} - {result}" if x is not None else str(result) for x in (given or (None,))]


def test_a_queue_time_problem_is_reported_once_naming_its_input(comfy):
    from self_forcing.nodes.long_video import OPTIONS
    from self_forcing.nodes.sampling import EXTEND, SAMPLER

    sampler = dict(SAMPLER.defaults)
    assert queue_errors(comfy.SelfForcingSampler, sampler) == []
    assert queue_errors(comfy.SelfForcingSampler, {**sampler, "length": 0}) == ["length 0 is below the minimum 1"]
    # two problems: each once, each naming its own input (no rule repeats a range problem)
    both = queue_errors(comfy.SelfForcingSampler, {**sampler, "width": 840, "length": 80})
    assert len(both) == 1 and both[0].count("width 840") == 1 and both[0].count("length 80") == 1, both
    assert queue_errors(comfy.SelfForcingSampler, {**sampler, "width": None, "length": 0}) == [  # width linked
        "length 0 is below the minimum 1"]
    extend = dict(EXTEND.defaults)
    assert queue_errors(comfy.SelfForcingExtendVideo, {**extend, "extend_frames": 30}) == [
        "extend_frames 30 is not a multiple of 4 (one latent frame = 4 video frames); use 28 or 32"]
    options = dict(OPTIONS.defaults)
    routing = queue_errors(comfy.SelfForcingLongVideoOptions, {**options, "routing_topk": 21})
    assert len(routing) == 1 and routing[0].startswith("routing_topk 21 is not smaller than the window 21"), routing
    assert len(queue_errors(comfy.SelfForcingLiveFrames, {"every_nth": 0, "max_size": 512, "format": "jpeg",
                                                          "quality": 85})) == 1


# -- 16 c: the loaders' device is one of the listed options -------------------------------------------
@pytest.mark.parametrize("loader", ["SelfForcingModelLoader", "SelfForcingToyModelLoader"])
def test_an_unknown_device_is_refused_naming_the_allowed_ones(comfy, loader):
    node = getattr(comfy, loader)
    message = "device 'cuda:7' is not one of: default, cpu"
    with pytest.raises(ValueError, match=message):  # queue time
        node.validate_inputs(device="cuda:7")
    assert node.validate_inputs(device="cpu") is True and node.validate_inputs(device=None) is True
    assert queue_errors(node, {"model_name": "x.safetensors", "device": "cuda:7"}) == [message]
    with pytest.raises(ValueError, match=message):  # run time (a linked value), before anything is loaded
        node.execute(model_name="self_forcing_toy.safetensors", device="cuda:7")


# -- 16 e: a file Load Text Embeddings cannot read is named in the error ------------------------------
@pytest.mark.parametrize("content", [b"this is not a safetensors file at all", b"",
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_a_garbage_embeddings_file_is_named(comfy, content):
    folder = os.path.join(embeds_dir(comfy), "sub")
    os.makedirs(folder)
    with open(os.path.join(folder, "garbage.safetensors"), "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match=r"text embeddings 'sub/garbage.safetensors' .*cannot be read") as e:
        comfy.SelfForcingLoadTextEmbeds.execute("sub/garbage.safetensors")
    assert "Save Text Embeddings" in str(e.value)


# -- 16 f: a missing official model with downloading off says where to put it ------------------------
def test_a_missing_model_with_download_off_says_where_to_put_it(comfy):
    from self_forcing.sf_model.weights import SELF_FORCING

    folder = comfy.fp.get_folder_paths("diffusion_models")[0]
    with pytest.raises(ValueError) as e:
        comfy.SelfForcingModelLoader.execute(model_name=SELF_FORCING.name, download_if_missing=False)
    text_ = str(e.value)
    assert text_.startswith(f"The model file '{SELF_FORCING.name}' is missing from {folder}"), text_
    assert "Cannot download" not in text_
    for part in (SELF_FORCING.url, f"into: {folder}", "download_if_missing", "self-forcing download"):
        assert part in text_, (part, text_)
