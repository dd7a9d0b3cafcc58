"""The sampler / extend / loader node logic, run with tiny random causal Wan models (no ComfyUI)."""

import gc
import warnings

import pytest
import torch

from self_forcing.nodes.long_video import LongVideoOptions
from self_forcing.nodes.model import ModelHandle, describe, load_handle, resolve_dtype
from self_forcing.nodes.sampling import RunHooks, extend_video, run_bytes, run_options, sample_video
from self_forcing.sf_model.memory import kv_cache_bytes
from self_forcing.sf_model.window import cache_slots
from self_forcing.sf_model.checkpoint import LoadedModel, save_model
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.latent_format import to_model_space, to_raw
from self_forcing.sf_model.resample import resample_history
from self_forcing.sf_model.sampler import StreamOptions, generate

STEPS = "1000, 750, 500, 250"


def handle_for(model, offload=torch.device("cpu"), meta=None):
    return ModelHandle(LoadedModel(model, model.config, "test layout", dict(meta or {})), "tiny.safetensors",
                       torch.device("cpu"), offload, torch.float32)


def prompt(seed=0, tokens=6):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, TINY.text_dim, generator=g), {"pooled_output": None}]]


class Recorder:
    def __init__(self, cancel_after=None, error=None):
        self.events, self.passes, self.cancel_after, self.error = [], 0, cancel_after, error

    def progress(self, done, total, preview):  # keeps only a description of previews (no tensors)
        self.events.append((done, total, None if preview is None else (tuple(preview.shape), preview.dtype)))

    def check(self):
        self.passes += 1
        if self.cancel_after is not None and self.passes > self.cancel_after:
            raise self.error or RuntimeError("Processing interrupted")

    def hooks(self):
        return RunHooks(progress=self.progress, check_cancel=self.check)


# -- text to video ----------------------------------------------------------------------------------
def test_t2v_returns_core_wan21_latent_equal_to_the_model_sampler(tiny_model):
    h = handle_for(tiny_model)
    out = sample_video(h, prompt(), width=64, height=32, length=25, seed=3, steps=STEPS, shift=5.0)
    assert out.shape == (1, 16, 7, 4, 8) and out.dtype == torch.float32 and out.device.type == "cpu"
    opts = StreamOptions(frames_per_block=3, steps=(1000, 750, 500, 250), shift=5.0, partial_last_chunk=True)
    ref = generate(tiny_model, prompt()[0][0], num_frames=7, height=4, width=8, seed=3, options=opts)
    assert torch.equal(out, to_raw(ref))  # raw VAE latents: the model's output with Wan 2.1 mean/std undone
    again = sample_video(h, prompt(), width=64, height=32, length=25, seed=3)
    assert torch.equal(out, again)
    assert not torch.equal(out, sample_video(h, prompt(), width=64, height=32, length=25, seed=4))


def test_progress_counts_denoising_passes_across_chunks_with_a_preview_per_chunk(tiny_model):
    rec = Recorder()
    sample_video(handle_for(tiny_model), prompt(), width=64, height=32, length=25, seed=0, steps="1000, 500",
                 hooks=rec.hooks())
    chunks = 3  # 7 latent frames in blocks of 3: 3 + 3 + 1
    assert rec.events[0][:2] == (0, chunks * 2)
    dones = [e[0] for e in rec.events]
    assert dones == sorted(dones) and dones[-1] == chunks * 2
    assert all(e[1] == chunks * 2 for e in rec.events)
    previews = [e[2] for e in rec.events if e[2] is not None]
    assert len(previews) == chunks
    assert all(dtype == torch.uint8 and len(shape) == 3 and shape[-1] == 3 for shape, dtype in previews)
    assert [e[0] for e in rec.events if e[2] is not None] == [2, 4, 6]  # sent when each chunk finishes


def test_execute_time_errors_say_how_to_fix(tiny_model):
    h = handle_for(tiny_model)
    with pytest.raises(ValueError, match="length 80 is not 4k\\+1.*use 77 or 81"):
        sample_video(h, prompt(), width=64, height=32, length=80, seed=0)
    with pytest.raises(ValueError, match="width 72 is not a multiple of 16; use 64 or 80"):
        sample_video(h, prompt(), width=72, height=32, length=5, seed=0)
    with pytest.raises(ValueError, match="umT5-XXL"):
        sample_video(h, [[torch.zeros(1, 4, 4096), {}]], width=64, height=32, length=5, seed=0)
    with pytest.raises(ValueError, match="Long-Video Options"):
        sample_video(h, prompt(), width=64, height=32, length=4 * 1100 + 1, seed=0,
                     long_video=LongVideoOptions("fixed", window=21, sink=0))
    with pytest.raises(ValueError, match="raise the window to 3"):
        sample_video(h, prompt(), width=64, height=32, length=25, seed=0,
                     long_video=LongVideoOptions("rolling", window=2, sink=0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_video(h, prompt(), width=64, height=32, length=5, seed=0, steps="250, 500")


def test_long_video_options_map_to_a_rolling_cache(tiny_model):
    opts = run_options(3, STEPS, 5.0, 0.0, LongVideoOptions("rolling", window=6, sink=1, routing_topk=2),
                       total_frames=12, meta={})
    assert (opts.window, opts.sink, opts.routing_topk, opts.extend_positions) == (6, 1, 2, True)
    fixed = run_options(3, STEPS, 5.0, 0.0, LongVideoOptions("fixed", window=6, sink=1, routing_topk=0),
                        total_frames=12, meta={})
    assert (fixed.window, fixed.sink, fixed.routing_topk) == (None, 0, None)
    h = handle_for(tiny_model)
    rolled = sample_video(h, prompt(), width=32, height=32, length=45, seed=1,
                          long_video=LongVideoOptions("rolling", window=3, sink=1, routing_topk=0))
    ref = generate(tiny_model, prompt()[0][0], num_frames=12, height=4, width=4, seed=1,
                   options=StreamOptions(window=3, sink=1, extend_positions=True, partial_last_chunk=True))
    assert rolled.shape[2] == 12 and torch.equal(rolled, to_raw(ref))
    full = sample_video(h, prompt(), width=32, height=32, length=45, seed=1)
    assert torch.equal(rolled[:, :, :3], full[:, :, :3])  # the first chunk sees the same context
    assert not torch.equal(rolled, full)  # later chunks do not


# -- extend / image to video ------------------------------------------------------------------------
def history(frames=6, seed=5, dtype=torch.float32, batch=1):
    g = torch.Generator().manual_seed(seed)
    return {"samples": (torch.randn(batch, 16, frames, 4, 8, generator=g) * 2).to(dtype)}


def test_extend_frame_counts_and_bit_identical_history(tiny_model):
    h, hist = handle_for(tiny_model), history()
    kw = dict(extend_frames=12, history_frames=2, resample_strength=0.4, seed=9)
    joined = extend_video(h, prompt(), hist, **kw)
    assert joined.shape == (1, 16, 9, 4, 8)
    assert torch.equal(joined[:, :, :6], hist["samples"])  # the whole input, untouched
    new_only = extend_video(h, prompt(), hist, **kw, output="new frames only")
    assert new_only.shape[2] == 3 and torch.equal(new_only, joined[:, :, 6:])
    resampled = extend_video(h, prompt(), hist, **kw, output="joined, resampled history")
    assert resampled.shape[2] == 9
    assert torch.equal(resampled[:, :, :4], hist["samples"][:, :, :4])  # frames before the resampled ones
    assert not torch.allclose(resampled[:, :, 4:6], hist["samples"][:, :, 4:6], atol=1e-3)
    assert torch.equal(resampled[:, :, 6:], joined[:, :, 6:])


def test_extend_continues_from_the_resampled_history(tiny_model):
    h, hist = handle_for(tiny_model), history()
    new = extend_video(h, prompt(), hist, extend_frames=12, history_frames=2, resample_strength=0.4, seed=9,
                       output="new frames only")
    ctx = prompt()[0][0]
    opts = StreamOptions(partial_last_chunk=True)
    prefix = resample_history(tiny_model, ctx, to_model_space(hist["samples"]), frames=2, strength=0.4, seed=9,
                              options=opts)
    ref = generate(tiny_model, ctx, num_frames=3, height=4, width=8, seed=9, options=opts, prefix=prefix)
    assert torch.equal(new, to_raw(ref))
    plain = extend_video(h, prompt(), hist, extend_frames=12, history_frames=2, resample_strength=0.0, seed=9,
                         output="new frames only")
    assert not torch.equal(plain, new)  # strength 0 continues from the history as it is
    other = history(seed=6)
    assert not torch.equal(new, extend_video(h, prompt(), other, extend_frames=12, history_frames=2,
                                             resample_strength=0.4, seed=9, output="new frames only"))


def test_strength_zero_keeps_every_history_frame(tiny_model):
    h, hist = handle_for(tiny_model), history(dtype=torch.float16)
    out = extend_video(h, prompt(), hist, extend_frames=8, history_frames=3, resample_strength=0.0, seed=1,
                       output="joined, resampled history")
    assert out.dtype == torch.float16 and torch.equal(out[:, :, :6], hist["samples"])


def test_image_to_video_is_the_one_frame_case(tiny_model):
    h = handle_for(tiny_model)
    image = history(frames=1)
    out = extend_video(h, prompt(), image, extend_frames=80, history_frames=1, resample_strength=0.2, seed=0)
    assert out.shape[2] == 21 and torch.equal(out[:, :, :1], image["samples"])  # 81 video frames


def test_extend_batch_and_input_errors(tiny_model):
    h = handle_for(tiny_model)
    out = extend_video(h, prompt(), history(batch=2), extend_frames=4, history_frames=1, resample_strength=0.3, seed=0)
    assert out.shape == (2, 16, 7, 4, 8)
    with pytest.raises(ValueError, match="use 8 or 12"):
        extend_video(h, prompt(), history(), extend_frames=10, history_frames=1, resample_strength=0.3, seed=0)
    with pytest.raises(ValueError, match="VAEEncode"):
        extend_video(h, prompt(), {"samples": torch.zeros(1, 4, 2, 8, 8)}, extend_frames=4, history_frames=1,
                     resample_strength=0.3, seed=0)
    with pytest.raises(ValueError, match="ImageScale"):
        extend_video(h, prompt(), {"samples": torch.zeros(1, 16, 2, 5, 8)}, extend_frames=4, history_frames=1,
                     resample_strength=0.3, seed=0)


# -- interrupt / OOM leave nothing allocated ---------------------------------------------------------
def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor):
                    continue
                storage = obj.untyped_storage()
            except Exception:
                continue
            if storage.device.type == "meta" or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("error", [RuntimeError("Processing interrupted"), torch.OutOfMemoryError("CUDA out of memory")])
@pytest.mark.parametrize("which", ["sample", "extend"])
def test_interrupt_and_oom_leave_nothing_allocated(tiny_model, error, which):
    h = handle_for(tiny_model)
    ctx, hist = prompt(), history(frames=6)

    def run(hooks):
        if which == "sample":
            return sample_video(h, ctx, width=64, height=32, length=45, seed=0, hooks=hooks)
        return extend_video(h, ctx, hist, extend_frames=24, history_frames=3, resample_strength=0.5, seed=0,
                            hooks=hooks)

    run(RunHooks())  # warm-up: lazily built tables exist from now on
    baseline = live_tensor_bytes()
    rec = Recorder(cancel_after=7, error=error)
    with pytest.raises(type(error)) as caught:
        run(rec.hooks())
    assert rec.passes == 8  # it really stopped in the middle
    # ComfyUI keeps the exception (and its traceback) around to report it: the caches and activations
    # of the failed run must not stay reachable through it.
    assert caught.value.__traceback__ is not None
    assert live_tensor_bytes() <= baseline
    del caught


def test_weights_go_back_to_the_offload_device_even_on_interrupt(make_tiny):
    model = make_tiny()
    h = handle_for(model, offload=torch.device("meta"))
    rec = Recorder(cancel_after=1)
    with pytest.raises(RuntimeError):
        sample_video(h, prompt(), width=32, height=32, length=25, seed=0, hooks=rec.hooks())
    assert model.device.type == "meta"


def test_free_memory_is_asked_before_moving_weights_to_the_load_device(make_tiny):
    model = make_tiny()
    h = handle_for(model)
    h.load_device = torch.device("cpu")
    model.to("meta")  # resting elsewhere: the run must move it (here: a meta->cpu move is refused by torch)
    asked = []
    with pytest.raises(NotImplementedError):
        sample_video(h, prompt(), width=32, height=32, length=5, seed=0,
                     hooks=RunHooks(free_memory=lambda n, d: asked.append((n, d))))
    n_params = sum(p.numel() for p in model.parameters())
    opts = run_options(3, STEPS, 5.0, 0.0, None, total_frames=2, meta={})
    extra = run_bytes(model.config, opts, 2, 4, 4, 1, torch.float32)
    assert asked == [(n_params * 4 + extra, torch.device("cpu"))]  # room for the weights and the run


@pytest.mark.parametrize("long_video, total", [(None, 7), (LongVideoOptions("rolling", 3, 1, 0), 40),
                                               (LongVideoOptions("rolling", 6, 2, 2), 40)])
def test_cache_size_estimate_is_exact(tiny_model, long_video, total):
    opts = run_options(3, STEPS, 5.0, 0.0, long_video, total_frames=total, meta={})
    window, sink = cache_slots(opts.window, opts.sink, total)  # what stream() allocates for this run
    cache = tiny_model.new_cache(2, 2 * 4, window=window, sink=sink, key_means=opts.routing_topk is not None)
    assert kv_cache_bytes(tiny_model.config, opts, total, 4, 8, 2, torch.float32) == cache.nbytes()


# -- loading ----------------------------------------------------------------------------------------
def test_loader_reads_a_saved_checkpoint_and_reports_it(tmp_path, tiny_model):
    path = tmp_path / "tiny.safetensors"
    save_model(path, tiny_model, TINY, meta={"frames_per_block": 3})
    h = load_handle(str(path), "tiny.safetensors", dtype="auto", attention="auto", load_device=torch.device("cpu"),
                    offload_device=torch.device("cpu"), keep_loaded=False, supports_bf16=False)
    assert h.dtype == torch.float32 and h.model.dtype == torch.float32
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(h.model.state_dict()[k], v)
    text = describe(h)
    assert "custom (dim 64, 2 layers)" in text and "frames per block: 3" in text and "layout:" in text
    bf = load_handle(str(path), "tiny", dtype="bf16", attention="sdpa", load_device=torch.device("cpu"),
                     offload_device=torch.device("cpu"), keep_loaded=True, supports_bf16=False)
    assert bf.model.dtype == torch.bfloat16 and "kept loaded" in describe(bf)
    with pytest.raises(ValueError, match="flash-attn"):
        load_handle(str(path), "tiny", dtype="auto", attention="flash3", load_device=torch.device("cpu"),
                    offload_device=torch.device("cpu"), keep_loaded=False, supports_bf16=False)


def test_the_loader_keeps_linear_weights_in_fp8_and_samples_in_bf16_on_request(tmp_path, tiny_model):
    """dtype 'fp8_e4m3fn': the linear layers' parameters stay float8 (cast per layer when they run), computed in
    bf16; the video equals the one of a bf16 model holding the same fp8-rounded weights."""
    from self_forcing.sf_model.weight_cast import linear_param_names

    path = tmp_path / "tiny.safetensors"
    save_model(path, tiny_model, TINY, meta={"frames_per_block": 3})
    kw = dict(attention="sdpa", load_device=torch.device("cpu"), offload_device=torch.device("cpu"),
              keep_loaded=False, supports_bf16=True)
    h = load_handle(str(path), "tiny", dtype="fp8_e4m3fn", **kw)
    params = dict(h.model.named_parameters())
    fp8 = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
    assert fp8 and fp8 == set(linear_param_names(h.model))  # weights and biases, as ComfyUI's fp8_e4m3fn
    assert h.dtype == torch.bfloat16 and "float8_e4m3fn linear weights, bf16 compute" in describe(h)
    ref = load_handle(str(path), "tiny", dtype="bf16", **kw)
    original = tiny_model.state_dict()
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            if n in fp8:  # rounded from the file's float32 values, as the loader rounds them
                p.copy_(original[n].to(torch.float8_e4m3fn).to(torch.bfloat16))
                assert torch.equal(p, params[n].to(torch.bfloat16))
    run = dict(width=64, height=32, length=9, seed=3, steps=STEPS, shift=5.0)
    out, want = sample_video(h, prompt(), **run), sample_video(ref, prompt(), **run)
    assert torch.equal(out, want)
    assert {n for n, p in h.model.named_parameters() if p.dtype == torch.float8_e4m3fn} == fp8  # still fp8
    plain = sample_video(load_handle(str(path), "tiny", dtype="bf16", **kw), prompt(), **run)
    assert not torch.equal(out, plain)  # the fp8 rounding is really there


def test_auto_dtype():
    assert resolve_dtype("auto", torch.device("cuda"), True) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda"), False) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), False) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu"), False) == torch.float16
    assert resolve_dtype("fp8_e4m3fn", torch.device("cuda"), True) == torch.float8_e4m3fn
    with pytest.raises(ValueError):
        resolve_dtype("int8", torch.device("cpu"), False)


def test_a_request_that_can_never_fit_is_refused_before_anything_is_freed(tiny_model):
    """100000x100000 asked ComfyUI to free 61 TB (unloading every model first); now: one clear error, nothing
    freed or allocated."""
    h = handle_for(tiny_model)
    asked = []
    with pytest.raises(ValueError, match=r"needs ~[\d,.]+ GB on cpu, which has [\d,.]+ GB in total"):
        sample_video(h, prompt(), width=100000, height=100000, length=5, seed=0,
                     hooks=RunHooks(free_memory=lambda n, d: asked.append((n, d))))
    assert asked == []
