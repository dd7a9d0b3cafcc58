"""Toy world renderer, prompts, tiny text encoder and latent codec."""

import math

import pytest
import torch

from self_forcing.toy import world as tw
from self_forcing.toy.codec import ToyCodec, codec_matrix
from self_forcing.toy.text import VOCAB, ToyTextEncoder


def _simulate(x, v, lo, hi, steps):
    """Reference: step a point and reflect it at the walls, the slow way."""
    out = [x]
    for _ in range(steps):
        x += v
        while x < lo or x > hi:
            if x > hi:
                x, v = 2 * hi - x, -v
            if x < lo:
                x, v = 2 * lo - x, -v
        out.append(x)
    return out


# ------------------------------------------------------------------------------------------ world
def test_scene_sampling_is_deterministic_and_varied():
    assert tw.sample_scene(42) == tw.sample_scene(42)
    scenes = [tw.sample_scene(s) for s in range(60)]
    assert len({s.prompt for s in scenes}) > 40
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        assert s.background in tw.BACKGROUND_COLOURS
        assert len({o.colour for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert tw.MIN_SIZE <= o.size <= tw.MAX_SIZE
            assert tw.MIN_SPEED <= math.hypot(o.vx, o.vy) <= tw.MAX_SPEED + 1e-12
    assert len(tw.sample_scene(3, num_objects=2).objects) == 2


def test_render_is_deterministic_in_range_and_antialiased():
    scene = tw.sample_scene(7, num_objects=3)
    a, b = tw.render(scene, 5, 6), tw.render(scene, 5, 6)
    assert a.shape == (3, 6, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    bg = torch.tensor(tw.BACKGROUND_COLOURS[scene.background]) * 2 - 1
    px = a.permute(1, 2, 3, 0).reshape(-1, 3)
    is_bg = (px - bg).abs().max(dim=1).values < 1e-6
    assert 0.5 < is_bg.float().mean() < 0.99
    # Every pixel is a convex mix of the scene's colours; edges hold intermediate (antialiased) values.
    palette = torch.tensor([tw.SHAPE_COLOURS[o.colour] for o in scene.objects] +
                           [tw.BACKGROUND_COLOURS[scene.background]]) * 2 - 1
    exact = (px[:, None] - palette[None]).abs().max(dim=2).values.min(dim=1).values < 1e-6
    assert 0.8 < exact.float().mean() < 1.0
    small = tw.render(scene, 5, 2, size=32, dtype=torch.float64)
    assert small.shape == (3, 2, 32, 32) and small.dtype == torch.float64


def test_render_from_any_start_matches_a_longer_render():
    scene = tw.sample_scene(11)
    long = tw.render(scene, 0, 40)
    assert torch.equal(long[:, 17:], tw.render(scene, 17, 23))
    far = tw.render(scene, 5000, 8)
    assert torch.equal(far[:, 3:], tw.render(scene, 5003, 5))
    # Per-scene start frames in one batch give the same frames as separate renders.
    other = tw.sample_scene(12)
    batch = tw.render_batch([scene, other], [17, 4], 5)
    assert torch.equal(batch[0], long[:, 17:22])
    assert torch.equal(batch[1], tw.render(other, 4, 5))


def test_bounce_matches_stepped_reflection():
    x, v, lo, hi = 0.3, 0.047, 0.1, 0.85
    ref = torch.tensor(_simulate(x, v, lo, hi, 500), dtype=torch.float64)
    t = torch.arange(501, dtype=torch.float64)
    got = tw.bounce(torch.tensor(x, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), t,
                    torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
    assert torch.allclose(got, ref, atol=1e-9)
    ref_neg = torch.tensor(_simulate(x, -v, lo, hi, 500), dtype=torch.float64)
    got_neg = tw.bounce(torch.tensor(x, dtype=torch.float64), torch.tensor(-v, dtype=torch.float64), t,
                        torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
    assert torch.allclose(got_neg, ref_neg, atol=1e-9)


def test_objects_stay_inside_the_frame_for_10000_frames():
    scenes = [tw.sample_scene(s, num_objects=3) for s in range(8)]
    cx, cy = tw.object_centres(scenes, 0, 10_000)  # [B, K, T], slots in draw order
    for b, scene in enumerate(scenes):
        objs = sorted(scene.objects, key=lambda o: -o.area)
        for k, o in enumerate(objs):
            hx, hy = o.half_extent
            x, y = cx[b, k], cy[b, k]
            assert (x - hx).min() >= -1e-9 and (x + hx).max() <= 1 + 1e-9
            assert (y - hy).min() >= -1e-9 and (y + hy).max() <= 1 + 1e-9
            # It really bounces: reaches both walls on both axes, never moves faster than its speed.
            assert (x - hx).min() < abs(o.vx) + 1e-9 and (x + hx).max() > 1 - abs(o.vx) - 1e-9
            assert (y - hy).min() < abs(o.vy) + 1e-9 and (y + hy).max() > 1 - abs(o.vy) - 1e-9
            assert (x.diff().abs() <= abs(o.vx) + 1e-9).all() and (y.diff().abs() <= abs(o.vy) + 1e-9).all()
    # The whole shape is still drawn at frame ~10 000 (nothing clipped at the walls).
    scene = tw.sample_scene(5, num_objects=1)
    o = scene.objects[0]
    ink = torch.tensor(tw.SHAPE_COLOURS[o.colour]) - torch.tensor(tw.BACKGROUND_COLOURS[scene.background])
    for start in (0, 9_990):
        v = (tw.render(scene, start, 10) + 1) / 2 - torch.tensor(tw.BACKGROUND_COLOURS[scene.background])[:, None, None, None]
        coverage = (v * ink[:, None, None, None]).sum(0) / ink.pow(2).sum()
        assert torch.allclose(coverage.sum(dim=(1, 2)), torch.full((10,), o.area * 64 * 64), rtol=0.03)


def test_prompt_round_trip_and_parse_errors():
    for s in range(50):
        scene = tw.sample_scene(s)
        attrs = tw.parse_prompt(scene.prompt)
        assert attrs == scene.attributes
        assert tw.make_prompt(attrs) == scene.prompt
    assert tw.parse_prompt("A Red circle, and a blue square bouncing on a black background ") == tw.PromptAttributes(
        "black", (("red", "circle"), ("blue", "square")))
    for bad, word in [("a purple circle bouncing on a black background", "purple"),
                      ("a red hexagon bouncing on a black background", "hexagon"),
                      ("a red circle bouncing on a pink background", "pink"),
                      ("a red circle flying on a black background", "expected"),
                      ("a red circle a blue square bouncing on a black background", "expected")]:
        with pytest.raises(ValueError, match=word):
            tw.parse_prompt(bad)


def test_scene_validation():
    ok = tw.ToyObject("circle", "red", 0.2, 0.5, 0.5, 0.01, 0.0)
    with pytest.raises(ValueError, match="distinct colours"):
        tw.Scene("black", (ok, ok))
    with pytest.raises(ValueError, match="outside"):
        tw.Scene("black", (tw.ToyObject("circle", "red", 0.2, 0.05, 0.5, 0, 0),))
    with pytest.raises(ValueError, match="background"):
        tw.Scene("red", (ok,))


def test_dataset_and_batches_are_deterministic_and_agree():
    ds = tw.ToyVideoDataset(num_frames=4, size=32, length=10, seed=3)
    v, p = ds[2]
    v2, p2 = tw.ToyVideoDataset(num_frames=4, size=32, length=10, seed=3)[2]
    assert v.shape == (3, 4, 32, 32) and torch.equal(v, v2) and p == p2
    v4, p4 = tw.ToyVideoDataset(num_frames=4, size=32, length=10, seed=4)[2]
    assert p4 != p or not torch.equal(v4, v)
    videos, prompts = next(tw.iterate_batches(3, num_frames=4, size=32, seed=3))
    assert videos.shape == (3, 3, 4, 32, 32)
    assert prompts[2] == p and torch.equal(videos[2], v)
    with pytest.raises(IndexError):
        ds[10]


# ------------------------------------------------------------------------------------- text encoder
def test_text_encoder_zero_padding_and_determinism():
    prompts = ["a red circle bouncing on a black background",
               "a red circle and a blue square and a green triangle bouncing on a gray background"]
    enc = ToyTextEncoder(text_dim=32, max_len=16, seed=1)
    state = torch.get_rng_state()
    out = enc.encode(prompts)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == (2, 16, 32)
    assert torch.equal(out[0, 8:], torch.zeros(8, 32))  # padding rows exactly zero
    assert (out[0, :8].abs().sum(-1) > 0).all() and (out[1].abs().sum(-1) > 0).all()
    assert torch.equal(ToyTextEncoder(text_dim=32, max_len=16, seed=1).encode(prompts), out)
    assert not torch.allclose(ToyTextEncoder(text_dim=32, max_len=16, seed=2).encode(prompts), out)
    # Same tokens in another context differ (position embedding + attention); state dict round trips.
    assert not torch.allclose(out[0, 1], out[1, 1])
    other = ToyTextEncoder(text_dim=32, max_len=16, seed=9)
    other.load_state_dict(enc.state_dict())
    assert torch.equal(other.encode(prompts), out)
    assert torch.equal(ToyTextEncoder(**enc.config()).encode(prompts), out)
    # No transformer layer also works, and gradients flow to the tables.
    plain = ToyTextEncoder(text_dim=8, max_len=16, num_layers=0)
    plain.encode(prompts).sum().backward()
    assert plain.token_embedding.weight.grad.abs().sum() > 0


def test_text_encoder_errors():
    enc = ToyTextEncoder()
    with pytest.raises(ValueError, match="'purple'") as e:
        enc.encode(["a purple circle bouncing on a black background"])
    assert "circle" in str(e.value) and "background" in str(e.value)  # lists the vocabulary
    with pytest.raises(ValueError, match="max_len"):
        ToyTextEncoder(max_len=4).encode(["a red circle bouncing on a black background"])
    with pytest.raises(ValueError, match="list"):
        enc.encode("a red circle bouncing on a black background")
    with pytest.raises(ValueError, match="empty"):
        enc.encode([""])


def test_every_toy_prompt_fits_the_vocabulary():
    enc = ToyTextEncoder(max_len=16)
    prompts = [tw.sample_scene(s, num_objects=3).prompt for s in range(20)]
    ids, mask = enc.tokenize(prompts)
    assert mask.sum(1).max() == 16 and ids.max() < len(VOCAB)


# ------------------------------------------------------------------------------------------- codec
def test_codec_round_trip_is_exact():
    m = codec_matrix()
    assert m.shape == (16, 12)
    assert torch.allclose(m.T @ m, torch.eye(12, dtype=torch.float64), atol=1e-12)
    codec = ToyCodec()
    videos, _ = next(tw.iterate_batches(2, num_frames=3, seed=1))
    z = codec.encode(videos)
    assert z.shape == (2, 16, 3, 32, 32)
    assert (codec.decode(z) - videos).abs().max() < 1e-5
    noise = torch.randn(1, 3, 2, 8, 8)  # any video, not only toy ones
    assert (codec.decode(codec.encode(noise)) - noise).abs().max() < 1e-5
    c64 = ToyCodec(dtype=torch.float64)
    assert (c64.decode(c64.encode(noise.double())) - noise.double()).abs().max() < 1e-12
    # Per frame independent: no temporal mixing.
    assert torch.equal(codec.encode(videos[:, :, 1:2]), z[:, :, 1:2])


def test_codec_latents_have_roughly_unit_scale():
    videos, _ = next(tw.iterate_batches(48, num_frames=4, seed=99))
    z = ToyCodec().encode(videos)
    std, mean = z.std(dim=(0, 2, 3, 4)), z.mean(dim=(0, 2, 3, 4))
    assert ((std > 0.7) & (std < 1.4)).all(), std
    assert mean.abs().max() < 0.3, mean


def test_codec_state_dict_and_errors():
    codec = ToyCodec()
    assert set(codec.state_dict()) == {"matrix", "pixel_mean", "scale"}
    fresh = ToyCodec()
    fresh.load_state_dict(codec.state_dict())
    assert torch.equal(fresh.matrix, codec.matrix)
    with pytest.raises(ValueError, match="3, T, H, W"):
        codec.encode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.zeros(1, 3, 2, 7, 8))
    with pytest.raises(ValueError, match="16, T"):
        codec.decode(torch.zeros(1, 12, 2, 4, 4))
    with pytest.raises(ValueError, match="meta"):
        codec.encode(torch.zeros(1, 3, 2, 8, 8, device="meta"))
    assert codec.latent_shape(21, 64, 64) == (16, 21, 32, 32)
