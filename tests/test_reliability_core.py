"""Reliability of sf_model against bad inputs: every test here failed on the code before its fix."""

import math

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.resample import resample_history
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.window import CachePolicy

CTX = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))


def recording_caches(model):
    """Wrap ``model.new_cache`` to remember the slots (capacity) of every cache it builds."""
    sizes, build = [], model.new_cache

    def new_cache(*args, **kwargs):
        cache = build(*args, **kwargs)
        sizes.append(cache.capacity)
        return cache

    model.new_cache = new_cache
    return sizes


# -- item 2: the KV cache never holds more slots than the run has frames --------------------------------
def test_a_window_longer_than_the_video_allocates_only_the_video_and_gives_the_same_latents(make_tiny):
    model = make_tiny(TINY, seed=3)
    sizes = recording_caches(model)
    huge = StreamOptions(frames_per_block=3, window=1024, sink=64, extend_positions=True)
    exact = StreamOptions(frames_per_block=3, window=3, extend_positions=True)
    a = generate(model, CTX, num_frames=3, height=4, width=6, seed=1, options=huge)
    b = generate(model, CTX, num_frames=3, height=4, width=6, seed=1, options=exact)
    c = generate(model, CTX, num_frames=3, height=4, width=6, seed=1)  # the fixed cache
    assert torch.equal(a, b) and torch.equal(a, c)
    assert sizes == [3, 3, 3]  # was 1088 slots for window 1024 + sink 64


def test_a_bounded_cache_keeps_routing_and_sink_results_and_a_wrapping_ring_is_unchanged(make_tiny):
    model = make_tiny(TINY, seed=5)
    sizes = recording_caches(model)
    # 9 frames, sink 2, routing top 2: a ring of 1000 never wraps, so it is the ring of the 7 frames after the sink
    big = StreamOptions(frames_per_block=3, window=1000, sink=2, routing_topk=2, extend_positions=True)
    fit = StreamOptions(frames_per_block=3, window=7, sink=2, routing_topk=2, extend_positions=True)
    assert torch.equal(generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=big),
                       generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=fit))
    # a sink longer than the video: sink slots only
    sink_only = StreamOptions(frames_per_block=3, window=3, sink=100, extend_positions=True)
    plain = StreamOptions(frames_per_block=3, window=9, extend_positions=True)
    assert torch.equal(generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=sink_only),
                       generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=plain))
    ring = StreamOptions(frames_per_block=3, window=6, sink=1, extend_positions=True)
    generate(model, CTX, num_frames=24, height=4, width=6, seed=2, options=ring)
    assert sizes == [9, 9, 9, 9, 7]  # the ring that wraps keeps its window + sink


def test_resampling_history_allocates_no_more_than_the_history(make_tiny):
    model = make_tiny(TINY, seed=6)
    sizes = recording_caches(model)
    history = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(2))
    opts = StreamOptions(frames_per_block=3, window=4096, sink=64, extend_positions=True)
    out = resample_history(model, CTX, history, frames=3, strength=0.5, options=opts)
    ref = resample_history(model, CTX, history, frames=3, strength=0.5,
                           options=StreamOptions(frames_per_block=3, window=6, extend_positions=True))
    assert torch.equal(out, ref) and sizes == [6, 6]


ABSURD_POLICIES = [
    (dict(window=math.nan), "rolling window must be a whole number.*nan"),
    (dict(window=6.5), "rolling window must be a whole number.*6.5"),
    (dict(window="12"), "rolling window must be a whole number"),
    (dict(window=True), "rolling window must be a whole number"),
    (dict(window=6, sink=math.nan), "sink must be a whole number"),
    (dict(window=None, sink=math.nan), "sink must be a whole number"),  # not silently dropped by a fixed cache
    (dict(window=6, sink=1e9), "sink must be a whole number"),
    (dict(frames_per_block=2.0), "frames_per_block must be a whole number"),
    (dict(window=12, routing_topk=math.inf), "routing_topk must be a whole number"),
    (dict(window=-1), "rolling window must be >= 1"),
    (dict(window=6, sink=-2), "sink must be >= 0"),
]


def test_cache_policy_and_stream_options_refuse_absurd_inputs_with_a_clear_message():
    for kwargs, match in ABSURD_POLICIES:
        for build in (CachePolicy, StreamOptions):
            with pytest.raises(ValueError, match=match):
                build(**{"frames_per_block": 3, **kwargs})


# -- item 4: NaN/Inf weights, text contexts and schedule numbers are refused ------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_weights_with_nan_or_inf_are_refused_at_load_naming_the_tensor(make_tiny, tmp_path, bad):
    from self_forcing.sf_model.checkpoint import CheckpointError, load_model, save_model

    model = make_tiny(TINY, seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.ffn.0.weight"][5, 7] = bad  # one value in the middle of a later tensor
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        path = tmp_path / f"bad_{dtype}.safetensors"
        save_model(path, sd, TINY, dtype=dtype)
        with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.ffn\.0\.weight' holds NaN or Inf"):
            load_model(path)
    pt = tmp_path / "bad.pt"  # a training checkpoint layout: the name is the bare Wan name
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, pt)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.ffn\.0\.weight' holds NaN or Inf"):
        load_model(pt)
    save_model(tmp_path / "good.safetensors", model, TINY)
    assert load_model(tmp_path / "good.safetensors").config == TINY


def test_a_vae_with_nan_weights_is_refused(tmp_path):
    from self_forcing.sf_model.vae import load_vae
    from self_forcing.sf_model.vae.checkpoint import VAECheckpointError, save_vae
    from self_forcing.sf_model.vae.model import WanVAE, WanVAEConfig

    vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    name = next(k for k, v in vae.state_dict().items() if v.is_floating_point() and v.numel() > 4)
    with torch.no_grad():
        vae.state_dict()[name].view(-1)[3] = math.nan
    save_vae(tmp_path / "vae.safetensors", vae)
    with pytest.raises(VAECheckpointError, match=f"'{name}' holds NaN or Inf"):
        load_vae(tmp_path / "vae.safetensors")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_inf_text_context_is_refused_before_sampling(make_tiny, bad):
    model = make_tiny(TINY, seed=2)
    ctx = CTX.clone()
    ctx[0, 4, 9] = bad
    with pytest.raises(ValueError, match="text context holds NaN or Inf"):
        generate(model, ctx, num_frames=3, height=4, width=6)
    history = torch.randn(1, 16, 6, 4, 6)
    with pytest.raises(ValueError, match="text context holds NaN or Inf"):
        resample_history(model, ctx, history, frames=3, strength=0.5)


def test_non_finite_shift_steps_and_context_noise_are_refused():
    from self_forcing.sf_model.schedule import make_steps

    for shift in (math.nan, math.inf, "abc", None):
        with pytest.raises(ValueError, match="shift must be a (finite )?number"):
            StreamOptions(shift=shift)
        with pytest.raises(ValueError, match="shift must be a (finite )?number"):
            make_steps((1000, 500), shift)
    with pytest.raises(ValueError, match="every step must be a finite number"):
        StreamOptions(steps=(1000, math.nan))
    with pytest.raises(ValueError, match="steps must be a list of timesteps"):
        StreamOptions(steps="1000, 500")
    for noise in (math.nan, "x"):
        with pytest.raises(ValueError, match="context_noise must be a (finite )?number"):
            StreamOptions(context_noise=noise)


# -- item 6: checkpoint metadata is checked, not trusted ---------------------------------------------------
def write_with_meta(path, model, info):
    """A safetensors file with the model's weights and ``info`` as the self_forcing metadata (any JSON)."""
    import json

    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"self_forcing": json.dumps(info)})
    return path


@pytest.mark.parametrize("change, message", [
    ({"rope_max_frames": 1e12}, r"rope_max_frames must be an integer, got 1000000000000\.0"),
    ({"rope_max_frames": 10 ** 12}, r"rope_max_frames must be in \[1, 65536\], got 1000000000000"),
    ({"num_heads": 0}, r"num_heads must be in \[1, 1024\], got 0"),
    ({"dim": "abc"}, r"dim must be an integer, got 'abc'"),
    ({"qk_norm": "yes"}, r"qk_norm must be true or false"),
    ({"eps": float("nan")}, r"eps must be a finite number"),
    ({"patch_size": [1, 2]}, r"patch_size must be three integers"),
    ({"freq_dim": 31}, r"freq_dim 31 must be even"),
])
def test_bad_model_config_metadata_raises_the_loaders_error_naming_the_field(make_tiny, tmp_path, change, message):
    from self_forcing.sf_model.checkpoint import CheckpointError, load_model

    path = write_with_meta(tmp_path / "m.safetensors", make_tiny(TINY), {"model": {**TINY.to_dict(), **change}})
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


@pytest.mark.parametrize("info, message", [
    ([1, 2, 3], "metadata must be a JSON object, got list"),
    ({"model": [1, 2]}, "model config must be a JSON object of fields, got list"),
    ({"frames_per_block": "abc"}, "frames_per_block must be an integer"),
    ({"sink": -1}, r"sink must be in \[0, 65536\]"),
    ({"shift": float("nan")}, "shift must be a finite number"),
    ({"bundle": "toy_text"}, "'bundle' must be a list of part names"),
    ({"toy": [1]}, "'toy' must be a JSON object"),
])
def test_metadata_of_the_wrong_shape_raises_the_loaders_error(make_tiny, tmp_path, info, message):
    from self_forcing.sf_model.checkpoint import CheckpointError, load_model

    path = write_with_meta(tmp_path / "m.safetensors", make_tiny(TINY), info)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_a_config_built_in_code_is_checked_by_the_same_table():
    with pytest.raises(ValueError, match=r"num_heads must be in \[1, 1024\], got 0"):
        TINY.replace(num_heads=0)
    with pytest.raises(ValueError, match="num_layers must be an integer"):
        TINY.replace(num_layers=2.5)
    assert TINY.replace(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)


# -- item 5: one memory estimate, checked against the device's total memory before allocating ---------------
def test_the_cache_term_of_the_estimate_is_the_cache_the_sampler_allocates(make_tiny):
    from self_forcing.sf_model.memory import estimate_run_bytes, kv_cache_bytes
    from self_forcing.sf_model.sampler import stream

    model = make_tiny(TINY, seed=1)
    caches, build = [], model.new_cache

    def new_cache(*args, **kwargs):
        caches.append(build(*args, **kwargs))
        return caches[-1]

    model.new_cache = new_cache
    for opts, frames in ((StreamOptions(frames_per_block=3), 9),
                         (StreamOptions(frames_per_block=3, window=6, sink=1, routing_topk=2, extend_positions=True), 24),
                         (StreamOptions(frames_per_block=3, window=1024, sink=64, extend_positions=True), 3)):
        before = len(caches)
        stream_sizes = []
        for _ in stream(model, CTX, num_frames=frames, height=4, width=6, options=opts):
            stream_sizes.append(caches[-1].nbytes())  # measured while the cache is alive
        assert len(caches) == before + 1
        real = stream_sizes[0]
        assert kv_cache_bytes(TINY, opts, frames, 4, 6, 1, torch.float32) == real
        whole = estimate_run_bytes(TINY, opts, frames, 4, 6, 1, torch.float32)
        assert real < whole < real + 2 * 1024 ** 2  # cache + weights + a small chunk: the same order


def test_the_weight_term_counts_the_models_parameters_from_its_config():
    from self_forcing.sf_model.config import WAN_1_3B
    from self_forcing.sf_model.memory import dit_parameters
    from self_forcing.sf_model.model import CausalWanModel

    for cfg in (TINY, TINY.replace(qk_norm=False, cross_attn_norm=False, patch_size=(1, 1, 1)), WAN_1_3B):
        with torch.device("meta"):
            model = CausalWanModel(cfg)
        assert dit_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_check_fits_refuses_what_exceeds_the_devices_total_memory():
    import os

    from self_forcing.sf_model.memory import check_fits, device_total_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device_total_bytes("cpu") == physical
    check_fits(physical // 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"this request needs ~[\d,.]+ GB on cpu, which has [\d,.]+ GB in total; "
                                         r"lower the size/length/window"):
        check_fits(physical + 1, torch.device("cpu"))


# -- item 15: CUDA-graph replay is safe for concurrent runs on one model -------------------------------------
def test_two_threads_with_different_prompts_on_one_graphed_model_equal_the_runs_one_after_the_other(make_tiny):
    import threading
    import time

    from self_forcing.sf_model.speed import ChunkGraphs, use_cuda_graphs

    local = threading.local()

    class ThreadGraphs(ChunkGraphs):
        """tests/test_graphs.py's stand-in recorder for a cache per thread: a replay re-runs the recorded
        forward on the static buffers (the prompt included) with the recorded cache plan; it yields the GIL
        first, as a replay queued on a GPU leaves the host free for the other thread."""

        def accepts(self, x):
            return True

        def _capture(self, forward, static):
            cache = local.cache
            plan = cache.plan
            out = forward(static[0], static[1], (static[2], static[3]))

            def replay():
                time.sleep(0.002)
                current, cache.plan = cache.plan, plan
                try:
                    out.copy_(forward(static[0], static[1], (static[2], static[3])))
                finally:
                    cache.plan = current
            return replay, out

    model = make_tiny(TINY, seed=11)
    graphs = ThreadGraphs()
    use_cuda_graphs(model, graphs=graphs)
    prompts = [torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(s)) for s in (21, 22)]
    opts = StreamOptions(frames_per_block=3)
    caches = [model.new_cache(1, 6, window=9) for _ in prompts]

    def run(i):
        local.cache = caches[i]
        return generate(model, prompts[i], num_frames=9, height=4, width=6, seed=i, options=opts, cache=caches[i])

    alone = [run(i) for i in range(2)]
    assert graphs.replayed > 0
    for _ in range(3):
        results, errors = {}, []

        def worker(i):
            try:
                results[i] = run(i)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert torch.equal(results[0], alone[0]) and torch.equal(results[1], alone[1])


# -- item 16: exported files get the usual permissions ---------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_checkpoints_embeddings_and_vaes_have_the_usual_permissions(make_tiny, tmp_path, umask):
    import os

    from self_forcing.sf_model.checkpoint import save_model
    from self_forcing.sf_model.text_embeds import save_text_embeds
    from self_forcing.sf_model.vae.checkpoint import save_vae
    from self_forcing.sf_model.vae.model import WanVAE, WanVAEConfig

    old = os.umask(umask)
    try:
        save_model(tmp_path / "m.safetensors", make_tiny(TINY), TINY)
        save_text_embeds(str(tmp_path / "e.safetensors"), CTX)
        save_vae(tmp_path / "v.safetensors", WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1,
                                                                  temporal_downsample=(False,))))
    finally:
        os.umask(old)
    for name in ("m", "e", "v"):
        assert (os.stat(tmp_path / f"{name}.safetensors").st_mode & 0o777) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "m.safetensors", "v.safetensors"]


def test_the_estimate_counts_the_fp8_cache_the_sampler_allocates(make_tiny, monkeypatch):
    from self_forcing.sf_model.memory import kv_cache_bytes
    from self_forcing.sf_model.sampler import stream
    from self_forcing.sf_model.speed.kv_fp8 import Fp8KVCache

    model = make_tiny(TINY, seed=1)
    made, build = [], Fp8KVCache.for_model.__func__
    monkeypatch.setattr(Fp8KVCache, "for_model", classmethod(lambda cls, *a, **k: made.append(build(cls, *a, **k))
                                                             or made[-1]))
    for opts, frames in ((StreamOptions(frames_per_block=3, kv_fp8=True), 9),
                         (StreamOptions(frames_per_block=3, window=6, kv_fp8=True), 15)):
        sizes = [made[-1].nbytes() for _ in stream(model, CTX, num_frames=frames, height=4, width=6, options=opts)]
        assert kv_cache_bytes(TINY, opts, frames, 4, 6, 1, torch.float32) == sizes[0]
        exact = kv_cache_bytes(TINY, StreamOptions(frames_per_block=3, window=opts.window), frames, 4, 6, 1,
                               torch.bfloat16)
        assert sizes[0] < 0.75 * exact  # about half of bf16's (one byte per element, plus the scales)


def test_the_fit_check_honours_a_per_process_memory_cap(monkeypatch):
    # a GPU capped with torch.cuda.set_per_process_memory_fraction (a 24 GB share of a bigger card) must refuse
    # what exceeds the share before allocating, not fail with an out-of-memory error inside the run
    from self_forcing.sf_model import memory

    monkeypatch.setattr(memory, "device_total_bytes", lambda device: 100 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 0.24)
    memory.check_fits(20 * 2 ** 30, "cuda:0")
    with pytest.raises(ValueError, match=r"which has 25\.8 GB this process may use \(24% of the device\).*kv_fp8"):
        memory.check_fits(30 * 2 ** 30, "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)
    memory.check_fits(30 * 2 ** 30, "cuda:0")
    with pytest.raises(ValueError, match="in total"):
        memory.check_fits(200 * 2 ** 30, "cuda:0")
