"""Decode as you go (sampler + extend with a VAE) and the live-frames events, with tiny random models."""

import base64
import importlib.util
import io
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from self_forcing.nodes import decode as decode_nodes
from self_forcing.nodes.decode import StreamDecode, VaeViews, check_wan21_state_dict, decode_latents
from self_forcing.nodes.live import (LiveFrameOptions, LiveFrameSender, decode_frames_event, encode_frames_event,
                                           fit_size, selected_frames)
from self_forcing.nodes.sampling import RunHooks, extend_video, sample_video
from self_forcing.sf_model.vae import TINY_VAE, WanVAE, WanVAEConfig

REPO = Path(__file__).resolve().parent.parent


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sampling = load_module("_node_sampling_helpers", REPO / "tests" / "test_nodes_sampling.py")
Recorder, handle_for, history, prompt = _sampling.Recorder, _sampling.handle_for, _sampling.history, _sampling.prompt
live_tensor_bytes = _sampling.live_tensor_bytes
TINY_WAN21_VAE = WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)  # 16 channels, x4 x8 x8


def make_vae(config=TINY_WAN21_VAE, seed=0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(config)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return vae.eval().requires_grad_(False)


class CoreVae:
    """Stands in for ComfyUI's VAE object: owns the weights, exposes them as a state dict."""

    def __init__(self, vae):
        self.model = vae

    def get_sd(self):
        return self.model.state_dict()


def decode_for(core: CoreVae, views: VaeViews, sender=None) -> StreamDecode:
    @contextmanager
    def open_vae(device):
        with views.bind(core, core.get_sd(), device, torch.float32) as vae:
            yield vae

    return StreamDecode(open_vae, reserve_bytes=0, sender=sender)


def as_image(vae: WanVAE, raw: torch.Tensor) -> torch.Tensor:
    """What core's VAEDecode gives for a whole latent: [B*N, H, W, 3] in [0, 1]."""
    video = vae.decode(raw)  # [B, 3, N, H, W] in [-1, 1]
    return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3)


def load_client():
    return load_module("live_frames_client", REPO / "examples" / "live_frames_client.py")


# -- text to video ----------------------------------------------------------------------------------
def test_t2v_decoded_frames_equal_decoding_the_whole_latent(tiny_model):
    h, core = handle_for(tiny_model), CoreVae(make_vae())
    rec = Recorder()
    latents, images = sample_video(h, prompt(), width=64, height=32, length=25, seed=3, hooks=rec.hooks(),
                                   decode=decode_for(core, VaeViews()))
    assert torch.equal(latents, sample_video(h, prompt(), width=64, height=32, length=25, seed=3))  # same video
    assert images.shape == (25, 32, 64, 3) and images.dtype == torch.float32
    assert torch.allclose(images, as_image(core.model, latents), atol=1e-5)
    # the progress bar still counts passes; its previews are now the newest decoded frame of each chunk
    previews = [e for e in rec.events if e[2] is not None]
    assert len(previews) == 3 and previews[-1][:2] == (12, 12)  # 3 chunks x 4 steps, one preview per chunk
    assert all(p[2] == ((32, 64, 3), torch.uint8) for p in previews)


def test_preview_is_the_last_frame_of_each_chunk(tiny_model):
    shown = []
    hooks = RunHooks(progress=lambda d, t, p: shown.append(p) if p is not None else None)
    _, images = sample_video(handle_for(tiny_model), prompt(), width=64, height=32, length=25, seed=0, hooks=hooks,
                             decode=decode_for(CoreVae(make_vae()), VaeViews()))
    last_of_chunk = [8, 20, 24]  # chunks decode to 9, 12 and 4 frames
    assert len(shown) == 3
    for frame, index in zip(shown, last_of_chunk):
        assert torch.equal(frame, (images[index] * 255).round().to(torch.uint8))


def test_without_a_vae_nothing_is_decoded(tiny_model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the decoder must not run without a VAE")

    monkeypatch.setattr(decode_nodes, "stream_video", boom)
    monkeypatch.setattr("self_forcing.nodes.sampling.run_decoded_stream", boom)
    out = sample_video(handle_for(tiny_model), prompt(), width=64, height=32, length=9, seed=0)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 16, 3, 4, 8)
    ext = extend_video(handle_for(tiny_model), prompt(), history(), extend_frames=4, history_frames=1,
                       resample_strength=0.3, seed=0)
    assert isinstance(ext, torch.Tensor) and ext.shape[2] == 7


# -- live frames --------------------------------------------------------------------------------------
def test_each_chunk_is_sent_once_in_order_with_its_frames(tiny_model):
    events = []
    sender = LiveFrameSender(events.append, LiveFrameOptions(max_size=0, format="png"), prompt_id="p1", node="6")
    _, images = sample_video(handle_for(tiny_model), prompt(), width=64, height=32, length=25, seed=1,
                             decode=decode_for(CoreVae(make_vae()), VaeViews(), sender))
    assert [(e["chunk"], e["chunks"], e["start_frame"], e["frame_count"]) for e in events] == [
        (0, 3, 0, 9), (1, 3, 9, 12), (2, 3, 21, 4)]
    assert all(e["prompt_id"] == "p1" and e["node"] == "6" and e["total_frames"] == 25 for e in events)
    assert [e["last"] for e in events] == [False, False, True]
    for e in events:  # PNG is lossless: every sent frame is the IMAGE frame in 8 bits
        for index, data in decode_frames_event(e):
            got = torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(data))))
            assert torch.equal(got, (images[index] * 255).round().to(torch.uint8))
    assert sorted(i for e in events for i in e["frame_indices"]) == list(range(25))


def test_every_nth_and_max_size_bound_the_events():
    assert selected_frames(0, 9, 4) == [0, 4, 8] and selected_frames(9, 12, 4) == [12, 16, 20]
    assert selected_frames(21, 2, 4) == []  # a chunk may carry no frame; its event still comes
    assert fit_size(832, 480, 512) == (512, 295) and fit_size(64, 32, 512) == (64, 32) and fit_size(64, 32, 0) == (64, 32)
    frames = torch.rand(12, 48, 96, 3)
    e = encode_frames_event(prompt_id="p", node="3", chunk=1, chunks=4, start_frame=9, frames=frames, total_frames=45,
                            options=LiveFrameOptions(every_nth=4, max_size=32, format="jpeg", quality=70))
    assert e["frame_indices"] == [12, 16, 20] and len(e["images"]) == 3 and (e["width"], e["height"]) == (32, 16)
    for _, data in decode_frames_event(e):
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (32, 16)
    with pytest.raises(ValueError, match="one of: jpeg, png"):
        LiveFrameOptions(format="gif").check()


def test_event_round_trip_through_the_stdlib_client(tmp_path):
    client = load_client()
    frames = torch.rand(5, 16, 24, 3)
    event = encode_frames_event(prompt_id="p", node="6", chunk=0, chunks=2, start_frame=0, frames=frames,
                                total_frames=9, options=LiveFrameOptions(max_size=0, format="png"))
    message = {"type": client.EVENT, "data": event}
    data = __import__("json").loads(__import__("json").dumps(message))["data"]  # as it travels
    paths = client.save_frames(data, str(tmp_path))
    assert [Path(p).name for p in paths] == [f"frame_{i:05d}.png" for i in range(5)]
    for i, path in enumerate(paths):
        got = torch.from_numpy(__import__("numpy").array(Image.open(path)))
        assert torch.equal(got, (frames[i] * 255).round().to(torch.uint8))
    assert (tmp_path / "latest.png").read_bytes() == Path(paths[-1]).read_bytes()
    assert base64.b64decode(event["images"][0]) == Path(paths[0]).read_bytes()


def test_sender_encodes_off_the_calling_thread_and_flushes_on_close():
    threads, release = [], threading.Event()

    def send(data):
        release.wait(5)
        threads.append(threading.current_thread().name)

    sender = LiveFrameSender(send, LiveFrameOptions(), prompt_id="p", node="1")
    for c in range(3):
        sender.submit(chunk=c, chunks=3, start_frame=4 * c, frames=torch.rand(4, 8, 8, 3), total_frames=12)
    assert threads == []  # submit returned while the first event is still being sent
    release.set()
    sender.close()
    assert len(threads) == 3 and all(t.startswith("sf-live") for t in threads)

    def broken(data):
        raise OSError("transport down")

    failing = LiveFrameSender(broken, LiveFrameOptions(), prompt_id="p", node="1")
    failing.submit(chunk=0, chunks=1, start_frame=0, frames=torch.rand(1, 8, 8, 3), total_frames=1)
    with pytest.raises(OSError, match="transport down"):
        failing.close()


# -- extend ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.0, 0.4])
def test_extend_decoded_image_is_the_decoded_latent_output(tiny_model, strength):
    h, core, hist = handle_for(tiny_model), CoreVae(make_vae()), history()
    kw = dict(extend_frames=12, history_frames=2, resample_strength=strength, seed=9)
    events = []
    sender = LiveFrameSender(events.append, LiveFrameOptions(every_nth=4), prompt_id="p", node="9")
    latent, images = extend_video(h, prompt(), hist, **kw, decode=decode_for(core, VaeViews(), sender))
    assert torch.equal(latent, extend_video(h, prompt(), hist, **kw))  # the LATENT output is unchanged
    assert images.shape == (21 + 12, 32, 64, 3)  # VAEDecode of 9 latent frames: 1 + 4 * 8
    whole = as_image(core.model, latent)
    assert torch.allclose(images[:21], whole[:21], atol=1e-5)  # the input, decoded on its own
    if strength == 0:  # nothing resampled: the decoder continued over the input itself
        assert torch.allclose(images, whole, atol=1e-5)
    assert [(e["start_frame"], e["frame_count"], e["total_frames"]) for e in events] == [(21, 12, 33)]
    assert events[0]["frame_indices"] == [24, 28, 32]

    new_latent, new_images = extend_video(h, prompt(), hist, **kw, output="new frames only",
                                          decode=decode_for(core, VaeViews()))
    assert torch.equal(new_latent, latent[:, :, 6:])
    assert new_images.shape[0] == 12 and torch.allclose(new_images, images[21:], atol=1e-5)


def test_extend_resampled_history_output_decodes_the_resampled_frames(tiny_model):
    h, core, hist = handle_for(tiny_model), CoreVae(make_vae()), history()
    latent, images = extend_video(h, prompt(), hist, extend_frames=4, history_frames=2, resample_strength=0.5, seed=2,
                                  output="joined, resampled history", decode=decode_for(core, VaeViews()))
    assert latent.shape[2] == 7 and images.shape[0] == 25
    assert torch.allclose(images, as_image(core.model, latent), atol=1e-5)  # input part and continuation alike


# -- the VAE views --------------------------------------------------------------------------------------
def test_views_share_the_source_weights_and_are_built_once_per_source():
    core, views = CoreVae(make_vae()), VaeViews()
    with views.bind(core, core.get_sd(), torch.device("cpu"), torch.float32) as vae:
        first = vae
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(vae.state_dict().values(),
                                                                core.model.state_dict().values()))
        z = torch.randn(1, 16, 2, 2, 3)
        assert torch.equal(vae.decode(z), core.model.decode(z))
    assert first.conv2.weight.device.type == "meta"  # nothing held between runs
    with views.bind(core, core.get_sd(), torch.device("cpu"), torch.float64) as vae:
        assert vae is first and vae.dtype == torch.float64  # rebound (a copy: other dtype)
        assert core.model.dtype == torch.float32
    other = CoreVae(make_vae(seed=1))
    with views.bind(other, other.get_sd(), torch.device("cpu"), torch.float32) as vae:
        assert vae is not first
    assert len(views) == 2
    del other, vae
    __import__("gc").collect()
    assert len(views) == 1  # weak keys: a deleted core VAE takes its view along


def test_only_a_wan21_vae_is_accepted(tiny_model):
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE.*wan_2.1_vae.safetensors"):
        check_wan21_state_dict(make_vae(TINY_VAE).state_dict())  # 4 latent channels
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE"):
        check_wan21_state_dict(tiny_model.state_dict())  # a DiT
    assert check_wan21_state_dict(make_vae().state_dict()) == TINY_WAN21_VAE


def test_decode_latents_in_chunks_equals_one_pass():
    vae = make_vae()
    raw = torch.randn(2, 16, 5, 2, 3)
    whole = as_image(vae, raw).reshape(2, 17, 16, 24, 3)
    assert torch.allclose(decode_latents(vae, raw, 2), whole, atol=1e-5)


# -- interrupt with decoding leaves nothing behind ------------------------------------------------------
def test_interrupt_while_decoding_leaves_nothing_allocated(tiny_model):
    h, core, views, ctx = handle_for(tiny_model), CoreVae(make_vae()), VaeViews(), prompt()
    sent = []

    def run(hooks, sender=None):
        return sample_video(h, ctx, width=64, height=32, length=45, seed=0, hooks=hooks,
                            decode=decode_for(core, views, sender))

    run(RunHooks())  # warm-up
    baseline = live_tensor_bytes()
    rec = Recorder(cancel_after=9)
    sender = LiveFrameSender(sent.append, LiveFrameOptions(), prompt_id="p", node="1")
    with pytest.raises(RuntimeError, match="interrupted") as caught:
        run(rec.hooks(), sender)
    assert 1 <= len(sent) < 4  # some chunks went out before the interrupt, not all
    assert sender._pool is None  # closed
    assert caught.value.__traceback__ is not None
    del sender, sent
    assert live_tensor_bytes() <= baseline
    del caught
