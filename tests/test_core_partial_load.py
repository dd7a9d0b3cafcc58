"""A partially loaded core MODEL: linear layers whose weights ComfyUI left on its offload device are streamed to
the compute device one layer at a time (sf_model.weight_cast, nodes.core_model.bind), and core_loader lets
ComfyUI load partially only models without patches (nodes.comfy). CPU only: a second device is played by
'meta' (bind's decision) or by a device the weights are not on ('cuda' need not exist to be compared against).
"""

import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from self_forcing.nodes.core_model import bind, core_state_dict, describe_bound, skeleton_for, unbind
from self_forcing.nodes.long_video import LongVideoOptions
from self_forcing.nodes.sampling import run_bytes, run_options
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.weight_cast import (CastLinear, cast_linears, check_not_cast, linear_weight,
                                               parameter_kinds, uncast_linears)

CUDA = torch.device("cuda")  # compared against, never used: the weights below are not on it


def linear64(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(8, 5).to(torch.float64)


def test_a_linear_off_the_compute_device_is_moved_and_cast_per_call_storage_untouched():
    layer = linear64()
    want = nn.Linear(8, 5)
    want.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    storage = layer.weight.data_ptr()
    assert cast_linears(layer, torch.float32, device=CUDA) == 1 and isinstance(layer, CastLinear)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), want(x))  # computed on x's device in float32
    assert layer.weight.dtype == torch.float64 and layer.weight.data_ptr() == storage  # no copy kept
    assert parameter_kinds(layer) == {(CUDA, torch.float32)}  # counted where it computes
    with pytest.raises(ValueError, match="streamed"):
        check_not_cast(layer, "the fused trunk")
    uncast_linears(layer)
    assert type(layer) is nn.Linear and "compute_device" not in layer.__dict__


def test_layers_already_on_the_device_stay_plain_and_others_follow_the_input():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    assert cast_linears(model, torch.float32, device=torch.device("cpu")) == 0  # all on the device: untouched
    assert all(type(m) is nn.Linear for m in model)
    assert cast_linears(model, torch.float32, device=torch.device("meta")) == 2
    out = model(torch.randn(2, 8, device="meta"))  # each layer's weight moved to the input's device
    assert out.device.type == "meta" and out.shape == (2, 4)
    assert linear_weight(model[0]).device.type == "meta"  # no input: the compute device


def test_a_float8_layer_off_the_device_is_scaled_after_the_move_and_scales_only_fit_float8():
    fp8 = torch.float8_e4m3fn
    layer = linear64()
    layer.weight.data, layer.bias.data = layer.weight.data.to(fp8), layer.bias.data.float()
    scale = torch.tensor(0.5)
    assert cast_linears(layer, torch.float32, {"": scale}, device=CUDA) == 1
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight.float() * 0.5, layer.bias))
    assert layer.weight.dtype == fp8
    with pytest.raises(ValueError, match="not float8"):
        cast_linears(nn.Sequential(linear64()), torch.float64, {"0": scale}, device=CUDA)


def test_a_model_of_streamed_linears_generates_what_the_plain_model_generates(tiny_model):
    from self_forcing.sf_model.sampler import StreamOptions, generate

    stored = copy.deepcopy(tiny_model)
    for m in stored.modules():  # the linear weights in another dtype, as an offload storage might hold them
        if isinstance(m, nn.Linear):
            m.to(torch.float64)
    want_model = copy.deepcopy(stored)
    for m in want_model.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.float32)
    cast_linears(stored, torch.float32, device=CUDA)
    for m in stored.modules():  # computed where the input is (CPU here: the only device a CPU test has)
        if isinstance(m, CastLinear):
            m.compute_device = None
    ctx = torch.randn(1, 6, TINY.text_dim, generator=torch.Generator().manual_seed(1))
    opts = StreamOptions(frames_per_block=1, steps=(1000, 500))
    kw = dict(num_frames=3, height=4, width=4, seed=3, options=opts)
    assert torch.equal(generate(stored, ctx, **kw), generate(want_model, ctx, **kw))


def core_module(model, dtype=torch.float32):
    module = copy.deepcopy(model).to(dtype)
    module.num_heads, module.text_len = TINY.num_heads, TINY.text_len
    return module


def test_bind_leaves_offloaded_linear_weights_where_they_are(tiny_model):
    module = core_module(tiny_model)
    sd, scales = core_state_dict(module)
    meta = torch.device("meta")  # the compute device; the CPU plays the offload device
    loaded = {n: t.to(meta) for n, t in sd.items() if n.startswith("blocks.0.")}  # as if ComfyUI loaded block 0
    sd = {**sd, **loaded}
    skeleton = skeleton_for(module, sd, "auto")
    bound = bind(skeleton, sd, meta, torch.float32, scales)
    linears = {n: m for n, m in skeleton.model.named_modules() if isinstance(m, nn.Linear)}
    off = {n for n in linears if not n.startswith("blocks.0.")}
    assert bound.streamed_layers == len(off) > 0 and bound.streamed_from == "cpu"
    for name, m in linears.items():
        if name in off:  # same storage, same dtype, on the CPU, cast per call on the compute device
            assert isinstance(m, CastLinear) and m.compute_device == meta
            assert m.weight.data_ptr() == sd[f"{name}.weight"].data_ptr() and m.weight.device.type == "cpu"
        else:
            assert type(m) is nn.Linear and m.weight.device == meta
    streamed = sum(t.numel() * t.element_size() for n, t in sd.items() if n.rpartition(".")[0] in off)
    assert bound.streamed_bytes == streamed
    moved = sum(t.numel() * t.element_size() for n, t in sd.items() if n.rpartition(".")[0] not in off
                and t.device.type == "cpu")
    assert bound.copied == moved  # only the non-linear tensors left on the CPU were copied
    assert all(p.device == meta for n, p in skeleton.model.named_parameters() if n.rpartition(".")[0] not in off)
    assert f"{len(off)} linear layers streamed from cpu" in describe_bound(bound, torch.float32)
    unbind(skeleton)
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    assert not any(isinstance(m, CastLinear) for m in skeleton.model.modules())


def test_bind_on_the_device_streams_nothing(tiny_model):
    module = core_module(tiny_model)
    sd, scales = core_state_dict(module)
    skeleton = skeleton_for(module, sd, "auto")
    bound = bind(skeleton, sd, torch.device("cpu"), torch.float32, scales)
    assert bound.streamed_layers == 0 and bound.copied == 0 and "streamed" not in describe_bound(bound, torch.float32)
    unbind(skeleton)


# -- core_loader's decision, against stand-ins for ComfyUI's modules (tests/test_reliability_nodes.py) ----------
def _standins(monkeypatch):
    path = Path(__file__).with_name("test_reliability_nodes.py")
    spec = importlib.util.spec_from_file_location("_sf_reliability_standins", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    standins = _standins(monkeypatch)
    for name, module in standins._fake_comfyui(standins.fake_folder_paths(str(tmp_path))).items():
        monkeypatch.setitem(sys.modules, name, module)
    blocker = types.ModuleType("comfy_execution.graph_utils")
    blocker.ExecutionBlocker = lambda message: ("blocked", message)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.graph_utils", blocker)
    monkeypatch.delitem(sys.modules, "self_forcing.nodes.comfy", raising=False)
    module = importlib.import_module("self_forcing.nodes.comfy")
    calls = []
    module.mm.load_models_gpu = lambda models, **kw: calls.append((models, kw))
    module.calls = calls
    yield module
    sys.modules.pop("self_forcing.nodes.comfy", None)


class Patcher:
    def __init__(self, module, patches=None):
        self.model = type("Inner", (), {})()
        self.model.diffusion_model, self.model.manual_cast_dtype = module, None
        self.load_device, self.patches, self.model_options = torch.device("cpu"), patches or {}, {}

    def model_dtype(self):
        return torch.float32


RUN = dict(frames=4, lat_h=4, lat_w=8, batch=1, frames_per_block=1, steps="1000,500", shift=5.0, context_noise=0.0,
           options=None, decode=None)


def want_bytes(**change):
    run = {**RUN, **change}
    opts = run_options(1, "1000,500", 5.0, 0.0, run["options"], total_frames=run["frames"], meta={},
                       rope_max_frames=TINY.rope_max_frames)
    return run_bytes(TINY, opts, run["frames"], 4, 8, 1, torch.float32)


def test_without_patches_comfyui_decides_asked_once_for_the_runs_memory(comfy, tiny_model):
    hooks = comfy.RunHooks(free_memory=lambda n, d: None)
    patcher = Patcher(core_module(tiny_model))
    comfy.core_loader(hooks, RUN)(patcher)
    assert comfy.calls == [([patcher], {"memory_required": int(want_bytes() * 1.1)})]
    assert hooks.free_memory is None  # not asked again after the weights are bound
    comfy.calls.clear()
    comfy.core_loader(hooks, {**RUN, "options": LongVideoOptions(kv_fp8=True)})(patcher)
    fp8 = comfy.calls[0][1]["memory_required"]
    assert fp8 == int(want_bytes(options=LongVideoOptions(kv_fp8=True)) * 1.1) < int(want_bytes() * 1.1)


def test_patched_models_and_runs_without_an_estimate_load_fully_as_before(comfy, tiny_model):
    for patcher, run in ((Patcher(core_module(tiny_model), patches={"blocks.0.ffn.0.weight": [()]}), RUN),
                         (Patcher(core_module(tiny_model)), None),
                         (Patcher(core_module(tiny_model)), {**RUN, "steps": "not steps"})):  # invalid: the run says
        comfy.calls.clear()
        hooks = comfy.RunHooks()
        comfy.core_loader(hooks, run)(patcher)
        assert comfy.calls == [([patcher], {"force_full_load": True})]
        hooks.free_memory(1000, torch.device("cpu"))  # nothing to free on the CPU
        hooks.free_memory(1000, CUDA)
        assert comfy.calls[1:] == [([patcher], {"memory_required": 1100, "force_full_load": True})]


def test_the_sampler_node_asks_for_its_own_request(comfy, tiny_model):
    patcher = Patcher(core_module(tiny_model))
    positive = [[torch.randn(1, 6, TINY.text_dim, generator=torch.Generator().manual_seed(1)), {}]]
    out = comfy.SelfForcingSampler.execute(model=patcher, positive=positive, width=64, height=32, length=13, seed=3,
                                           frames_per_block=1, steps="1000,500", shift=5.0)
    assert comfy.calls == [([patcher], {"memory_required": int(want_bytes() * 1.1)})]
    assert out.values[0]["samples"].shape == (1, 16, 4, 4, 8)  # the request estimated: 4 latent frames of 4x8


def test_the_fit_check_counts_only_the_weights_a_run_holds_on_its_device(tiny_model):
    # a core MODEL partially loaded by ComfyUI keeps some linear weights off the device (streamed per layer): the
    # fit check must not count them, or a 14B that fits 24 GB with streaming is refused; our own loader's
    # weights all move to the device for the run, so all of them count
    from self_forcing.nodes.model import ModelHandle
    from self_forcing.nodes.sampling import device_weight_bytes, model_bytes
    from self_forcing.sf_model.checkpoint import LoadedModel

    model = copy.deepcopy(tiny_model)
    first = model.blocks[0].ffn[0]
    first.weight = nn.Parameter(torch.empty(first.weight.shape, dtype=first.weight.dtype, device="meta"),
                                requires_grad=False)  # "left on another device"
    off = first.weight.numel() * first.weight.element_size()

    def handle(keep):
        return ModelHandle(LoadedModel(model, model.config, "test", {}), "tiny", torch.device("cpu"),
                           torch.device("cpu"), torch.float32, keep_loaded=keep)

    assert device_weight_bytes(handle(True)) == model_bytes(model) - off
    assert device_weight_bytes(handle(False)) == model_bytes(model)


def test_a_cuda_run_on_plain_weights_also_asks_for_the_fused_qkv_copy(tiny_model):
    from self_forcing.nodes.core_model import fused_qkv_bytes
    from self_forcing.nodes.core_run import core_run_bytes

    cpu = Patcher(core_module(tiny_model))
    gpu = Patcher(core_module(tiny_model))
    gpu.load_device = CUDA  # only compared against: nothing is put on it
    assert core_run_bytes(cpu, RUN) == want_bytes()
    assert core_run_bytes(gpu, RUN) - core_run_bytes(cpu, RUN) == fused_qkv_bytes(TINY, torch.float32) > 0
    for p in (cpu, gpu):  # float8 weights (computed in float32, core's manual cast): eager, no fused copy
        p.model_dtype, p.model.manual_cast_dtype = (lambda: torch.float8_e4m3fn), torch.float32
    assert core_run_bytes(gpu, RUN) == core_run_bytes(cpu, RUN) == want_bytes()


class CallbackPatcher(Patcher):
    """ComfyUI's ModelPatcher callback registry (add/remove by key; detach runs every callback of the type)."""

    def __init__(self, module):
        super().__init__(module)
        self.callbacks = {}

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type, key):
        self.callbacks.get(call_type, {}).pop(key, None)

    def detach(self, unpatch_all=True):
        for callbacks in self.callbacks.get("on_detach_after", {}).values():
            for callback in callbacks:
                callback(self, unpatch_all)


def test_comfyui_detaching_the_model_releases_what_the_speedups_keep(tiny_model, monkeypatch):
    from self_forcing.nodes import core_run

    released = []
    monkeypatch.setattr(core_run, "release_speedups", lambda dm: released.append(dm) or True)
    patcher = CallbackPatcher(core_module(tiny_model))
    for _ in range(3):  # one registration per run: must not pile up
        assert core_run.release_on_detach(patcher, "on_detach_after")
    assert sum(len(v) for v in patcher.callbacks["on_detach_after"].values()) == 1
    assert released == []
    patcher.detach(unpatch_all=False)  # load_models_gpu's detach before (re)loading it, even mid-run: weights stay
    assert released == []
    patcher.detach()
    assert released == [patcher.model.diffusion_model]
    assert not core_run.release_on_detach(patcher, None)  # ComfyUI without callback types: nothing registered
    assert not core_run.release_on_detach(Patcher(core_module(tiny_model)), "on_detach_after")
