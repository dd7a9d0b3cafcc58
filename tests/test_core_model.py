"""Core MODEL input (nodes.core_model) without ComfyUI: a patcher-shaped object around a Wan module.

The real-ComfyUI check (core UNETLoader -> LoraLoaderModelOnly -> our sampler) is tests/comfy_core_model_e2e.py.
"""

import copy

import pytest
import torch

from self_forcing.nodes.core_model import (_SKELETONS, borrowed_handle, core_meta, core_model_from_file,
                                          is_core_model, model_handle)
from self_forcing.nodes.model import ModelHandle
from self_forcing.nodes.sampling import extend_video, sample_video
from self_forcing.sf_model.checkpoint import CheckpointError, LoadedModel, save_model
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.weight_cast import CastLinear, held_bytes


class Inner:
    def __init__(self, module, cast=None):
        self.diffusion_model = module
        self.manual_cast_dtype = cast


class Patcher:
    """What core_model reads of a ModelPatcher: .model.diffusion_model, .load_device, .model_dtype()."""

    def __init__(self, module, cast=None):
        self.model = Inner(module, cast)
        self.load_device = torch.device("cpu")
        self.loads = 0

    def model_dtype(self):
        return next(self.model.diffusion_model.parameters()).dtype


def core_module(model, dtype=torch.float32):
    """A Wan module as core holds it: bare Wan names, num_heads / text_len as attributes."""
    module = copy.deepcopy(model).to(dtype)
    module.num_heads, module.text_len = TINY.num_heads, TINY.text_len
    return module


def ours(model):
    return ModelHandle(LoadedModel(model, model.config, "test", {}), "tiny", torch.device("cpu"),
                       torch.device("cpu"), torch.float32)


def load(patcher):
    patcher.loads += 1


def prompt():
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 6, TINY.text_dim, generator=g), {}]]


KW = dict(width=64, height=32, length=13, seed=3, frames_per_block=1, steps="1000,500", shift=5.0)


def test_a_core_model_samples_like_our_handle_on_the_same_weights_without_copying(tiny_model):
    patcher = Patcher(core_module(tiny_model))
    assert is_core_model(patcher) and not is_core_model(ours(tiny_model))
    with borrowed_handle(patcher, load=load) as handle:
        assert patcher.loads == 1 and handle.keep_loaded and handle.load_device == handle.offload_device
        shared = dict(patcher.model.diffusion_model.named_parameters())
        assert all(p.data_ptr() == shared[n].data_ptr() for n, p in handle.model.named_parameters())
        got = sample_video(handle, prompt(), **KW)
        ext = extend_video(handle, prompt(), {"samples": got}, extend_frames=4, history_frames=1,
                           resample_strength=0.3, seed=1, frames_per_block=1, steps="1000,500")
    want = sample_video(ours(tiny_model), prompt(), **KW)
    assert torch.equal(got, want)
    assert torch.equal(ext, extend_video(ours(tiny_model), prompt(), {"samples": want}, extend_frames=4,
                                         history_frames=1, resample_strength=0.3, seed=1, frames_per_block=1,
                                         steps="1000,500"))
    # released after the run: no parameter of ours holds memory; the skeleton is reused, new weights are seen
    skeleton = _SKELETONS[patcher.model.diffusion_model]
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    with torch.no_grad():
        patcher.model.diffusion_model.head.head.weight.mul_(2.0)  # as core patching weights would
    with model_handle(patcher, load=load) as handle:
        assert handle.model is skeleton.model and patcher.loads == 2
        changed = sample_video(handle, prompt(), **KW)
    assert not torch.equal(changed, got)


def test_our_handle_passes_through_unchanged(tiny_model):
    h = ours(tiny_model)
    with model_handle(h, load=load) as got:
        assert got is h


def test_weights_stored_narrower_are_cast_to_the_compute_dtype(tiny_model):
    patcher = Patcher(core_module(tiny_model, torch.bfloat16), cast=torch.float32)
    with borrowed_handle(patcher, load=load) as handle:
        assert handle.dtype == torch.float32 and handle.model.dtype == torch.float32
        got = sample_video(handle, prompt(), **KW)
    ref = copy.deepcopy(tiny_model).to(torch.bfloat16).to(torch.float32)
    assert torch.equal(got, sample_video(ours(ref), prompt(), **KW))


def test_non_wan_models_are_refused_with_a_message(tiny_model):
    with pytest.raises(CheckpointError, match="not a Wan 2.1"):
        with borrowed_handle(Patcher(torch.nn.Sequential(torch.nn.Linear(4, 4))), load=load):
            pass


def test_our_reader_makes_a_core_model_carrying_our_metadata(tiny_model, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    save_model(path, tiny_model, TINY, meta={"frames_per_block": 1, "shift": 4.0})
    built = {}

    def build(sd, model_options):  # stands in for comfy.sd.load_diffusion_model_state_dict
        built.update(sd=sd, options=model_options)
        module = core_module(tiny_model)
        module.load_state_dict(sd)
        patcher = Patcher(module)
        patcher.model_options = {}
        return patcher

    patcher = core_model_from_file(path, build=build, dtype=torch.float32)
    assert built["options"] == {"dtype": torch.float32} and "blocks.0.self_attn.q.weight" in built["sd"]
    assert core_meta(patcher)["frames_per_block"] == 1 and core_meta(Patcher(core_module(tiny_model))) == {}
    with borrowed_handle(patcher, load=load) as handle:
        assert handle.meta["shift"] == 4.0
        got = sample_video(handle, prompt(), **KW)
    assert torch.equal(got, sample_video(ours(tiny_model), prompt(), **KW))
    with pytest.raises(CheckpointError, match="did not recognise"):
        core_model_from_file(path, build=lambda sd, model_options: None)


# -- weights core stores in float8 (UNETLoader weight_dtype fp8_e4m3fn, scaled-fp8 files) ------------------------

F8 = torch.float8_e4m3fn


def fp8_core(model, scaled=False):
    """A core module as UNETLoader fp8_e4m3fn makes it: every parameter float8 (core's manual-cast ops cast them
    when they run); ``scaled``: each linear weight stored as weight / scale with ``scale_weight`` (and an unused
    ``scale_input``) beside it, as core's scaled-fp8 ops hold them."""
    module = core_module(model)
    with torch.no_grad():
        for i, (name, layer) in enumerate(m for m in module.named_modules() if isinstance(m[1], torch.nn.Linear)):
            if scaled:
                scale = torch.tensor(0.01 * (i % 5 + 1))
                layer.weight.div_(scale)
                layer.scale_weight = torch.nn.Parameter(scale, requires_grad=False)
                layer.scale_input = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        for p in module.parameters():
            if p.dim() > 0:
                p.data = p.data.to(F8)
    return module


def upcast_reference(core, dtype):
    """Our plain model with core's float8 values upcast to ``dtype`` by hand (scales applied as core does)."""
    ref = copy.deepcopy(core)
    for m in ref.modules():
        scale = m._parameters.pop("scale_weight", None)
        m._parameters.pop("scale_input", None)
        for name, p in list(m.named_parameters(recurse=False)):
            w = p.data.to(dtype)
            if name == "weight" and scale is not None:
                w = w * scale.to(dtype)
            setattr(m, name, torch.nn.Parameter(w, requires_grad=False))
    from self_forcing.sf_model.model import CausalWanModel

    out = CausalWanModel(TINY, attn_backend="sdpa").eval().requires_grad_(False)
    out.load_state_dict(ref.state_dict())
    return out.to(dtype)


def linear_bytes(module):
    return sum(p.numel() * p.element_size() for m in module.modules() if isinstance(m, torch.nn.Linear)
               for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias"))


@pytest.mark.parametrize("scaled", [False, True])
def test_float8_core_weights_are_bound_as_they_are_and_cast_per_layer(tiny_model, scaled):
    core = fp8_core(tiny_model, scaled)
    patcher = Patcher(core, cast=torch.float32)
    with borrowed_handle(patcher, load=load) as handle:
        model = handle.model
        assert handle.dtype == torch.float32 and model.dtype == torch.float32
        shared = dict(core.named_parameters())
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert layers and all(type(m) is CastLinear and m.weight.dtype == F8 for m in layers)
        for name, p in model.named_parameters():  # linear weights share core's float8 storage: no copy
            if p.dtype == F8:
                assert p.data_ptr() == shared[name].data_ptr()
        # held: core's float8 linear tensors (+ scalar scales) and the small rest in float32, no float32 copy
        rest = sum(p.numel() for p in model.parameters() if p.dtype != F8)
        scales = 4 * len(layers) if scaled else 0
        assert held_bytes(model) == linear_bytes(core) + 4 * rest + scales
        got = sample_video(handle, prompt(), **KW)
        assert all(m.weight.dtype == F8 for m in model.modules() if isinstance(m, CastLinear))
    assert torch.equal(got, sample_video(ours(upcast_reference(core, torch.float32)), prompt(), **KW))
    skeleton = _SKELETONS[core]
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    assert not any(isinstance(m, CastLinear) for m in skeleton.model.modules())  # plain again after the run


def test_bind_counts_only_the_small_non_linear_parameters_as_copied(tiny_model):
    from self_forcing.nodes.core_model import bind, core_state_dict, skeleton_for, unbind

    core = fp8_core(tiny_model, scaled=True)
    sd, scales = core_state_dict(core)
    skeleton = skeleton_for(core, sd, "auto")
    bound = bind(skeleton, sd, torch.device("cpu"), torch.bfloat16, scales)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in skeleton.model.modules())
    rest = sum(t.numel() for k, t in sd.items() if t.dtype != F8 or k.rpartition(".")[0] not in
               {n for n, m in skeleton.model.named_modules() if isinstance(m, torch.nn.Linear)})
    assert bound.float8_layers == n_linear == len(scales)
    assert bound.copied == 2 * rest  # the non-linear parameters, upcast to bf16; no linear weight copied
    assert bound.held == linear_bytes(core) + 2 * rest + 4 * n_linear
    unbind(skeleton)


# -- CUDA speed-ups on the core path (fused trunk + CUDA graphs), exercised on the CPU ---------------------------
#
# The decision is injected (``speedups``: what ``cuda_speedups`` says on a CUDA device) and the recorder is a
# stand-in that behaves like a CUDA graph where it matters here: a graph reads tensors BY ADDRESS, so a replay
# whose tensors (parameters, the fused QKV copies) no longer live where they did at recording would read freed
# or foreign memory: the stand-in refuses such a replay (AssertionError) instead.

from self_forcing.nodes.core_model import (Bound, cuda_speedups, fused_qkv_bytes, release_speedups,  # noqa: E402
                                          skeleton_for)
from self_forcing.sf_model.speed import ChunkGraphs, FusedTrunk, use_fused_kernels  # noqa: E402
from self_forcing.sf_model.speed.graphs import _with_text  # noqa: E402


def reads(model):
    """Where the tensors a recorded forward of ``model`` reads live (name -> address, shape)."""
    seen = {n: (t.data_ptr(), tuple(t.shape)) for n, t in model.state_dict(keep_vars=True).items()}
    for i, blk in enumerate(model.blocks):
        if blk.self_attn.fused is not None:
            seen[f"{i}.fused"] = tuple(t.data_ptr() for t in blk.self_attn.fused)
    return seen


class AddressGraphs(ChunkGraphs):
    """Records by running the forward on the static inputs; a replay runs the forward of the current call (its
    cache is at the recorded address: the situation key says so) on the static inputs, after checking that every
    tensor the model reads is still at its recorded address."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.stale = 0

    def accepts(self, x):
        return True

    def run(self, key, forward, x, t, rope, text):
        self.current = forward
        return super().run(key, forward, x, t, rope, text)

    def _capture(self, forward, static):
        seen = reads(self.model)
        out = forward(static[0], static[1], (static[2], static[3]))

        def replay():
            if reads(self.model) != seen:
                self.stale += 1
                raise AssertionError("a recorded graph replayed on tensors that moved (stale recording)")
            out.copy_(_with_text(self.current, self._text, static[0], static[1], (static[2], static[3])))
        return replay, out


def as_on_cuda(device, bound):  # cuda_speedups' answer on a CUDA load device
    return cuda_speedups(torch.device("cuda"), bound)


def never(device, bound):
    return False


def recorder_for(patcher):
    """The skeleton of ``patcher``'s core model with an address-checking recorder, and each run's new K/V cache in
    the storage of the first run's (as CUDA's caching allocator hands back a freed block of the same size), so a
    second run can replay the first run's recordings."""
    core = patcher.model.diffusion_model
    skeleton = skeleton_for(core, core_state_dict_of(core), "auto")
    graphs = AddressGraphs(skeleton.model)
    made, original = {}, skeleton.model.new_cache

    def new_cache(*args, **kw):
        cache = original(*args, **kw)
        key = (args, tuple(sorted(kw.items())))
        if key in made:
            cache.k, cache.v = made[key]
        else:
            made[key] = (cache.k, cache.v)
        return cache
    skeleton.model.new_cache = new_cache
    return skeleton, graphs


def core_state_dict_of(core):
    from self_forcing.nodes.core_model import core_state_dict

    return core_state_dict(core)[0]


def fused_ours(model):
    """Our loader's path on the same weights: the fused trunk (no graphs: the same math)."""
    return ours(use_fused_kernels(copy.deepcopy(model)))


def run_core(patcher, graphs, speedups=as_on_cuda):
    with borrowed_handle(patcher, load=load, speedups=speedups, make_graphs=lambda: graphs) as handle:
        return sample_video(handle, prompt(), **KW), handle.model


def core_storages(core):
    return {p.untyped_storage().data_ptr() for p in core.parameters()}


def test_cuda_speedups_only_for_plain_weights_on_cuda():
    assert cuda_speedups(torch.device("cuda", 0), Bound(copied=0, held=1, float8_layers=0))
    assert not cuda_speedups(torch.device("cuda", 0), Bound(copied=0, held=1, float8_layers=3))
    assert not cuda_speedups(torch.device("cpu"), Bound(copied=0, held=1, float8_layers=0))


def test_trunk_and_graphs_on_the_core_path_match_eager_and_replay_while_the_storages_stay(tiny_model):
    patcher = Patcher(core_module(tiny_model))
    core = patcher.model.diffusion_model
    q_ptr, q_before = core.blocks[0].self_attn.q.weight.data_ptr(), core.blocks[0].self_attn.q.weight.clone()
    skeleton, graphs = recorder_for(patcher)
    got, model = run_core(patcher, graphs)
    assert isinstance(model.inference_trunk, FusedTrunk) and model.chunk_graphs is graphs
    # 4 chunks of 1 latent frame x (2 denoising passes + 1 cache pass), minus the skipped last cache pass
    assert (graphs.recorded, graphs.replayed, graphs.stale) == (4, 7, 0)
    eager, _ = run_core(Patcher(core_module(tiny_model)), None, speedups=never)
    assert torch.equal(got, sample_video(fused_ours(tiny_model), prompt(), **KW))  # our loader's CUDA path
    assert ((got - eager).abs().max() / eager.abs().max()).item() <= 1e-5  # the fused trunk's tolerance
    assert not torch.equal(got, torch.zeros_like(got))
    # after the run: no parameter holds memory; the fused QKV copies kept for the recordings are ours, not core's
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    kept = [t for blk in skeleton.model.blocks for t in blk.self_attn.fused]
    assert kept and not {t.untyped_storage().data_ptr() for t in kept} & core_storages(core)
    assert sum(t.numel() * t.element_size() for t in kept) == fused_qkv_bytes(TINY, torch.float32)
    attn = core.blocks[0].self_attn  # core's own weights untouched by the fusing
    assert attn.q.weight.data_ptr() == q_ptr and torch.equal(attn.q.weight, q_before)
    again, _ = run_core(patcher, graphs)  # the same storages: every forward replays
    assert torch.equal(again, got) and (graphs.recorded, graphs.replayed, graphs.stale) == (4, 18, 0)
    assert release_speedups(core) and not release_speedups(torch.nn.Linear(1, 1))  # e.g. ComfyUI unloads it
    assert all(blk.self_attn.fused is None for blk in skeleton.model.blocks) and not graphs.graphs
    third, _ = run_core(patcher, graphs)  # rebuilt: recorded anew, same latents
    assert torch.equal(third, got) and (graphs.recorded, graphs.stale) == (8, 0)


def test_weights_patched_in_place_are_seen_by_the_kept_recordings(tiny_model):
    patcher = Patcher(core_module(tiny_model))
    core = patcher.model.diffusion_model
    _, graphs = recorder_for(patcher)
    first, _ = run_core(patcher, graphs)
    with torch.no_grad():  # as a LoRA merged into the same storage: q (in the fused copy) and the head change
        core.blocks[0].self_attn.q.weight.mul_(1.5)
        core.head.head.weight.mul_(2.0)
    patched, _ = run_core(patcher, graphs)
    assert graphs.recorded == 4 and graphs.stale == 0  # same addresses: the recordings were kept and replayed
    ref = core_module(tiny_model)
    with torch.no_grad():
        ref.blocks[0].self_attn.q.weight.mul_(1.5)
        ref.head.head.weight.mul_(2.0)
    want = sample_video(fused_ours(upcast_reference(ref, torch.float32)), prompt(), **KW)
    assert torch.equal(patched, want) and not torch.equal(patched, first)


def replace_storages(core, scale=1.5):
    """As core's LoRA patching does (``set_attr_param``): new tensors (new storage) for some weights, here the
    FFN and output projections and the head, scaled; q/k/v keep their storage."""
    with torch.no_grad():
        for name, p in list(core.named_parameters()):
            if ".ffn." in name or ".o.weight" in name or name.startswith("head."):
                owner = core.get_submodule(name.rpartition(".")[0])
                setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(p * scale, requires_grad=False))


def test_new_core_storages_drop_the_recordings_and_give_the_new_weights_latents(tiny_model):
    patcher = Patcher(core_module(tiny_model))
    _, graphs = recorder_for(patcher)
    first, _ = run_core(patcher, graphs)
    replace_storages(patcher.model.diffusion_model)
    got, _ = run_core(patcher, graphs)
    assert graphs.recorded == 8 and graphs.stale == 0  # recorded anew, nothing stale replayed
    ref = core_module(tiny_model)
    replace_storages(ref)
    want = sample_video(fused_ours(upcast_reference(ref, torch.float32)), prompt(), **KW)
    assert torch.equal(got, want) and not torch.equal(got, first)


def test_the_stand_in_catches_stale_recordings(tiny_model, monkeypatch):
    """Without the fingerprint check the run above would replay graphs on moved tensors: the stand-in says so."""
    import self_forcing.nodes.core_model as cm

    patcher = Patcher(core_module(tiny_model))
    _, graphs = recorder_for(patcher)
    run_core(patcher, graphs)
    monkeypatch.setattr(cm, "fingerprint", lambda model: "always the same")
    run_core(patcher, graphs)  # still the same storages: fine
    replace_storages(patcher.model.diffusion_model)
    with pytest.raises(AssertionError, match="stale recording"):
        run_core(patcher, graphs)
    assert all(p.device.type == "meta" for p in _SKELETONS[patcher.model.diffusion_model].model.parameters())


def test_float8_weights_and_the_cpu_keep_the_eager_path(tiny_model):
    patcher = Patcher(core_module(tiny_model))
    core = patcher.model.diffusion_model
    skeleton, graphs = recorder_for(patcher)
    run_core(patcher, graphs)
    assert graphs.recorded == 4
    with torch.no_grad():  # the same core model, now stored in float8 (core casts to float32 when it runs)
        for p in core.parameters():
            if p.dim() > 0:
                p.data = p.data.to(F8)
    patcher.model.manual_cast_dtype = torch.float32
    got, model = run_core(patcher, graphs, speedups=lambda device, bound: True)  # cast layers: eager anyway
    assert model.inference_trunk is None and model.chunk_graphs is None
    assert all(blk.self_attn.fused is None and blk.ffn_first is None for blk in model.blocks)
    assert graphs.recorded == 4 and graphs.replayed == 7  # nothing recorded or replayed in the float8 run
    assert torch.equal(got, sample_video(ours(upcast_reference(core, torch.float32)), prompt(), **KW))
    plain = Patcher(core_module(tiny_model))  # default decision on the CPU: eager, nothing kept
    with borrowed_handle(plain, load=load) as handle:
        sample_video(handle, prompt(), **KW)
        assert handle.model.inference_trunk is None and handle.model.chunk_graphs is None


def test_a_release_during_a_run_waits_for_the_run_to_end(tiny_model):
    """ComfyUI may detach (unload) the model while a run on it still reads the fused QKV copies and recordings
    (e.g. loading the VAE for the run frees memory): the run completes as usual, the release follows its end."""
    patcher = Patcher(core_module(tiny_model))
    core = patcher.model.diffusion_model
    skeleton, graphs = recorder_for(patcher)
    want, _ = run_core(patcher, graphs)
    with borrowed_handle(patcher, load=load, speedups=as_on_cuda, make_graphs=lambda: graphs) as handle:
        assert release_speedups(core)  # mid-run: only marked
        assert all(blk.self_attn.fused is not None for blk in skeleton.model.blocks)
        got = sample_video(handle, prompt(), **KW)
    assert torch.equal(got, want) and graphs.stale == 0
    assert all(blk.self_attn.fused is None for blk in skeleton.model.blocks) and not graphs.graphs
    assert not skeleton.release_pending and skeleton.runs == 0
    again, _ = run_core(patcher, graphs)  # rebuilt at the next run
    assert torch.equal(again, want) and graphs.recorded == 8
