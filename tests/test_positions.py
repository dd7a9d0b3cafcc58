"""Bounded positions (sf_model.positions): re-rotating cached keys, rebased == absolute inside the trained range,
the rebased rule is 'the sink right before the window', and memory stays flat over 10 000 latent frames."""

import gc
import sys

import pytest
import torch

from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.prompt_schedule import PromptSchedule, PromptSwitch
from self_forcing.sf_model.rope import Rope3D, apply_rope
from self_forcing.sf_model.sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk, generate, stream
from self_forcing.sf_model.schedule import make_steps


def ctx(seed=0):
    return torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p, delta", [(0, 5), (3, -3), (7, 10_000), (12_345, -12_000)])
def test_rotating_a_rotated_key_by_a_delta_gives_the_key_of_the_new_position(p, delta):
    rope = Rope3D(head_dim=16, split=(4, 2, 2), theta=10000.0, max_frames=32)
    k = torch.randn(1, 3 * 2 * 2, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
    at_p = apply_rope(k, *rope.cos_sin(p, 3, 2, 2, torch.device("cpu")))
    moved = apply_rope(at_p, *rope.temporal_shift(delta, torch.device("cpu")))
    direct = apply_rope(k, *rope.cos_sin(p + delta, 3, 2, 2, torch.device("cpu")))
    assert torch.allclose(moved, direct, atol=2e-5)
    assert not torch.allclose(at_p, direct, atol=1e-2)  # the rotation did move it
    cos, sin = rope.temporal_shift(delta, torch.device("cpu"))
    assert torch.equal(cos[4:], torch.ones(4)) and torch.equal(sin[4:], torch.zeros(4))  # height/width untouched


def rolling(positions, **kw):
    base = dict(frames_per_block=3, steps=(1000, 500), window=6, sink=3, positions=positions)
    base.update(kw)
    return StreamOptions(**base)


def test_rebased_equals_absolute_until_the_window_slides_past_the_sink_then_differs(tiny_model):
    # sink 3 + window 6: chunks ending at frame <= 9 see the sink right before the window under both rules
    a = generate(tiny_model, ctx(), num_frames=18, height=4, width=6, seed=1, options=rolling("absolute"))
    r = generate(tiny_model, ctx(), num_frames=18, height=4, width=6, seed=1, options=rolling("rebased"))
    assert torch.equal(a[:, :, :9], r[:, :, :9])  # the same computation, bit for bit
    assert not torch.allclose(a[:, :, 9:], r[:, :, 9:], atol=1e-4)  # the sink is seen elsewhere afterwards
    plain = generate(tiny_model, ctx(), num_frames=18, height=4, width=6, seed=1,
                     options=StreamOptions(frames_per_block=3, steps=(1000, 500), window=6, sink=3))
    assert torch.equal(a, plain)  # 'absolute' is the default path


def test_without_a_sink_the_two_rules_are_the_same(tiny_model):
    a = generate(tiny_model, ctx(), num_frames=18, height=4, width=6, seed=2, options=rolling("absolute", sink=0))
    r = generate(tiny_model, ctx(), num_frames=18, height=4, width=6, seed=2, options=rolling("rebased", sink=0))
    assert torch.equal(a, r)


def sink_keys_at(model, text, sink_latents, position, frame_tokens, opts):
    """K/V of the sink chunk recomputed from its latents at temporal positions [position, position + S) in a cache of
    its own (an independent way to put the sink elsewhere: no key rotation involved)."""
    s = sink_latents.shape[2]
    side = model.new_cache(1, frame_tokens, window=s, sink=0)
    side.frames_written = position  # the side cache starts at that frame (its ring holds just the sink)
    commit_chunk(model, text, side, position, sink_latents, opts)
    order = [(position + j) % s for j in range(s)]  # ring slot of sink frame j
    pick = lambda buf: torch.cat([buf[:, :, o * frame_tokens:(o + 1) * frame_tokens] for o in order], 2)  # noqa
    return pick(side.k), pick(side.v)


def test_rebased_positions_put_the_sink_right_before_the_window(tiny_model):
    """The rule, checked against a loop that recomputes the sink at positions window_start - S .. window_start - 1
    before each chunk (attention only sees differences, so that is the sink at 0..S-1 and the window at S..S+W-1)."""
    opts = rolling("rebased")
    out = generate(tiny_model, ctx(), num_frames=24, height=4, width=6, seed=3, options=opts)
    text = tiny_model.encode_text(ctx())
    ft, s, w = 6, 3, 6
    steps = make_steps(opts.steps, opts.shift)
    cache = tiny_model.new_cache(1, ft, window=w, sink=s)
    ref = []
    with torch.no_grad():
        for ci, (start, n) in enumerate(chunk_plan(0, 24, 3)):
            lo = max(s, start + n - w)
            if start >= s:
                k, v = sink_keys_at(tiny_model, text, out[:, :, :s], lo - s, ft, opts)
                cache.k[:, :, :s * ft] = k
                cache.v[:, :, :s * ft] = v
            x0 = denoise_chunk(tiny_model, text, cache, start, chunk_noise(3, ci, 2, (1, 16, n, 4, 6), "cpu"), steps,
                               opts)
            commit_chunk(tiny_model, text, cache, start, x0, opts)
            ref.append(x0)
    ref = torch.cat(ref, 2)
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
    absolute = generate(tiny_model, ctx(), num_frames=24, height=4, width=6, seed=3, options=rolling("absolute"))
    assert (absolute - ref).abs().max() > 100 * (out - ref).abs().max()


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_memory_is_flat_over_10000_latent_frames_of_the_toy_model():
    """The bundled toy model streams 10 000 latent frames (rolling window 20 + sink 10, rebased positions, a prompt
    switch with a re-cache near the start; chunks of 10 frames and one step to keep the test short): the live tensor
    bytes, the Python heap and the objects the garbage collector tracks are the same at frame ~400 and at frame
    10 000 (nothing grows with the frame index: cache, latents kept for re-caching, RoPE tables, sink keys)."""
    from self_forcing.nodes.toy import TOY_MODELS, toy_model_path
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.toy.bundle import encode_prompt

    loaded = load_model(toy_model_path(TOY_MODELS[0]))
    model = loaded.model.eval().requires_grad_(False)
    a = encode_prompt(loaded, "a red circle bouncing on a black background", "cpu")
    b = encode_prompt(loaded, "a green square bouncing on a black background", "cpu")
    schedule = PromptSchedule([PromptSwitch(0, a), PromptSwitch(100, b, "recache")])
    opts = StreamOptions(frames_per_block=10, steps=(1000,), window=20, sink=10, extend_positions=True,
                         positions="rebased")
    total = 10_000
    marks = []
    for chunk in stream(model, schedule, num_frames=total, height=2, width=2, seed=0, options=opts):
        if chunk.index in (40, total // 10 - 1):  # frame 400 and the last chunk
            gc.collect()
            marks.append((live_tensor_bytes(), sys.getallocatedblocks(), len(gc.get_objects()),
                          sum(e[1].shape[0] for e in model.rope._temporal.values())))
        last = chunk.start_frame + chunk.latents.shape[2]
        del chunk
    assert last == total
    (t0, py0, obj0, rows0), (t1, py1, obj1, rows1) = marks
    assert t1 == t0, (t0, t1)                 # the same tensors, byte for byte
    assert rows1 == rows0 == 1024              # one temporal RoPE table of the model's size
    assert abs(py1 - py0) < 1000, (py0, py1)   # Python heap blocks: no growth per chunk (960 chunks in between)
    assert abs(obj1 - obj0) < 100, (obj0, obj1)


def test_the_gpu_check_script_runs_tiny_on_the_cpu(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "long_video_gpu.py"
    spec = importlib.util.spec_from_file_location("long_video_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lv.json"
    bench.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--frames", "120",
                "--span", "15", "--switch-every", "45", "--steps", "1000", "--at", "60,200", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["windows"]) == {"frame_100", "frame_60", "last"} and result["all_chunks"]["count"] == 40
    assert result["windows"]["frame_60"]["frames"] == [45, 60] and result["windows"]["frame_60"]["chunks"] == 4
    assert result["windows"]["last"]["frames"] == [105, 120] and result["all_chunks"]["after_switch_median_ms"] > 0


def test_the_long_video_benchmark_leaves_gradient_mode_alone(tmp_path):
    """Running the benchmark in-process must not switch autograd off for whatever runs next."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "long_video_gpu.py"
    spec = importlib.util.spec_from_file_location("long_video_gpu_grad", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert torch.is_grad_enabled()
    mod.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--frames", "60", "--span", "6",
              "--out", str(tmp_path / "b.json")])
    assert torch.is_grad_enabled()
