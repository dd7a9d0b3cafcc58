"""toy.metrics: rendered ground truth scores ~0; each failure mode is caught by the metric meant for it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from self_forcing.toy import metrics as tm
from self_forcing.toy import world as tw

T = 48


def _mean(m, name, frames=slice(None)):
    v = m[name][:, frames]
    return float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")


def _blur(videos, sigma=1.0):
    r = int(3 * sigma) + 1
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    B, C, T_, H, W = videos.shape
    y = videos.permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.view(B, T_, C, H, W).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def world():
    scenes = [tw.sample_scene(500 + i, num_objects=1 + i % 3) for i in range(8)]
    starts = [97 * i for i in range(8)]
    videos = tw.render_batch(scenes, starts, T)
    prompts = [s.prompt for s in scenes]
    g = torch.Generator().manual_seed(0)
    controls = {"real": videos, "frozen": videos[:, :, :1].expand_as(videos).clone(),
                "shuffled": videos[:, :, torch.randperm(T, generator=g)], "blurred": _blur(videos)}
    by_prompt = {k: tm.video_metrics(v, prompts) for k, v in controls.items()}
    by_scene = {k: tm.video_metrics(controls[k], scenes, starts) for k in ("real", "frozen")}
    return scenes, starts, prompts, controls, by_prompt, by_scene


def test_api(world):
    scenes, starts, prompts, controls, by_prompt, _ = world
    m = by_prompt["real"]
    assert set(m) == set(tm.METRICS) and set(tm.ERRORS) <= set(tm.METRICS) and set(tm.MOTION_KEYS) <= set(m)
    assert all(v.shape == (8, T) and v.dtype == np.float64 for v in m.values())
    assert np.isnan(m["position_error"]).all()  # prompt mode: no positions to compare with
    assert np.isnan(m["motion"][:, 0]).all() and np.isnan(m["flicker_error"][:, 0]).all()
    # Prompts, parsed attributes and scenes (with per-video start frames) are all accepted.
    attrs = [tw.parse_prompt(p) for p in prompts[:2]]
    same = tm.video_metrics(controls["real"][:2], attrs)
    assert np.array_equal(same["speed"], m["speed"][:2], equal_nan=True)
    with pytest.raises(ValueError, match="prompts or scenes"):
        tm.video_metrics(controls["real"][:2], prompts[:1])
    with pytest.raises(ValueError, match="start frames"):
        tm.video_metrics(controls["real"][:2], scenes[:2], [0])
    # per_window: means over consecutive windows, NaNs skipped, a partial window dropped.
    v = np.array([[1.0, 3.0, np.nan, np.nan, 5.0, 7.0, 9.0]])
    w = tm.per_window(v, 2)
    assert w.shape == (1, 3) and w[0, 0] == 2 and np.isnan(w[0, 1]) and w[0, 2] == 6
    assert tm.per_window(m["speed"], 12).shape == (8, T // 12)
    # motion_band: one (p5, p95) row per prompt, cached and deterministic.
    band = tm.motion_band(prompts[:3], size=64)
    assert set(band) == set(tm.MOTION_KEYS)
    for key in tm.MOTION_KEYS:
        assert band[key].shape == (3, 2) and (band[key][:, 0] > 0).all() and (band[key][:, 0] < band[key][:, 1]).all()
        assert np.array_equal(band[key], tm.motion_band(prompts[:3], size=64)[key])


@pytest.mark.parametrize("mode", ["prompt", "scene"])
def test_ground_truth_scores_about_zero(world, mode):
    m = world[4 if mode == "prompt" else 5]["real"]
    limits = {"background_error": 1e-5, "lighting_error": 1e-4, "flicker_error": 1e-6, "colour_error": 0.005,
              "saturation_error": 0.005, "count_error": 0, "absence_error": 0, "identity_error": 0,
              "sharpness_error": 0.1, "motion_error": 0.05, "speed_error": 0.05, "velocity_error": 1e-5,
              "position_error": 0.1 / 64, "presence_error": 0.06}  # presence_error: 0.042 measured here
    assert set(limits) == set(tm.ERRORS)
    for name, limit in limits.items():
        if mode == "prompt" and name == "position_error":
            continue
        assert _mean(m, name) <= limit, (name, _mean(m, name))
    assert np.nanmax(m["count_error"]) == 0 and np.nanmax(m["identity_error"]) == 0
    # The tracked speed lies in the world's speed range.
    speed = m["speed"][~np.isnan(m["speed"])]
    assert speed.size > 100 and speed.min() > 0.3 / 64 and speed.max() < tw.MAX_SPEED + tw.MAX_PAN_SPEED


def test_frozen_video_is_flagged(world):
    """Ground-truth frame 0 repeated: perfect pictures, no motion. The motion metrics put it outside the band."""
    _, _, _, _, by_prompt, by_scene = world
    real, frozen = by_prompt["real"], by_prompt["frozen"]
    for name in ("motion_error", "speed_error"):
        assert _mean(real, name) < 0.05 and _mean(frozen, name) > 0.95, name
    assert np.nanmax(frozen["speed"]) < 1e-6
    # Still a clean picture: the per-frame appearance metrics cannot see it, as the issue says.
    assert _mean(frozen, "count_error") == 0 and _mean(frozen, "colour_error") < 0.005
    # Against the scene it should continue, its objects are in the wrong place.
    assert _mean(by_scene["frozen"], "position_error") > 5 / 64 > _mean(by_scene["real"], "position_error")


def test_shuffled_video_is_flagged(world):
    """Ground-truth frames in random order: every frame is perfect, the motion is not."""
    _, _, _, _, by_prompt, _ = world
    real, shuffled = by_prompt["real"], by_prompt["shuffled"]
    assert _mean(shuffled, "motion_error") > 1 and _mean(shuffled, "speed_error") > 2
    assert _mean(shuffled, "velocity_error") > 0.05 and _mean(real, "velocity_error") < 1e-5
    assert _mean(shuffled, "flicker_error") > 0.005  # the slow lighting/drift cycles jump too
    assert _mean(shuffled, "count_error") == 0 and _mean(shuffled, "colour_error") < 0.005


def test_blurred_video_is_flagged(world):
    _, _, _, _, by_prompt, _ = world
    assert _mean(by_prompt["real"], "sharpness_error") < 0.1 and _mean(by_prompt["blurred"], "sharpness_error") > 0.3
    assert _mean(by_prompt["blurred"], "motion_error") < 0.2  # blur alone is not a motion failure


def _two_object_scene(shape="circle", colour="red", depth=0.0):
    a = tw.ToyObject(shape, colour, 0.2, 0.45, 0.5, 0.012, 0.009, depth)
    b = tw.ToyObject("square", "blue", 0.18, 1.0, 0.6, -0.01, -0.011, 1.0 - depth)
    return tw.Scene("black", (a, b), arena=(1.5, 1.2), camera=tw.Camera(0.1, 0.05, 500.0, 400.0, 0.0, 1.0),
                    lighting=tw.Lighting(0.2, 300.0, 1.0), drift=tw.Drift("green", 0.08, 600.0, 0.5))


def test_identity_swap_is_flagged():
    """The red circle becomes green (a colour the prompt does not name), blue (another object's colour) or a
    square from frame 24 on: identity_error is 0 before and flags every frame after where it is seen."""
    scene = _two_object_scene()
    video = tw.render(scene, 0, T)
    swaps = {"green": _two_object_scene(colour="green"), "blue-circle": None, "square": _two_object_scene("square")}
    for name, other in swaps.items():
        if name == "blue-circle":  # two blue objects: the circle takes the square's colour
            a = tw.ToyObject("circle", "blue", 0.2, 0.45, 0.5, 0.012, 0.009, 0.0)
            other = tw.Scene("black", (a, tw.ToyObject("square", "magenta", 0.18, 1.0, 0.6, -0.01, -0.011, 1.0)),
                             scene.arena, scene.camera, scene.lighting, scene.drift)
            swapped = tw.render(other, 0, T)
            # Keep the real blue square: paint it back from the original where it is.
            keep = (video[2] > video[0] + 0.5) & (video[2] > video[1] + 0.5)
            swapped = torch.where(keep[None], video, swapped)
        else:
            swapped = tw.render(other, 0, T)
        spliced = torch.cat([video[:, :24], swapped[:, 24:]], dim=1)
        m = tm.video_metrics(spliced[None], [scene.prompt])
        st = tw.object_states([scene], 0, T)
        seen = (st["visible_fraction"][0, 0] > 0.9).numpy()
        after = np.arange(T) >= 24
        assert np.nansum(m["identity_error"][0, :24]) == 0, name
        flagged = m["identity_error"][0] > 0.3
        assert flagged[after & seen].mean() > 0.8, (name, m["identity_error"][0])
        if name != "square":
            assert (m["count_error"][0][after & seen] >= 1).mean() > 0.8  # an object nobody asked for
    clean = tm.video_metrics(video[None], [scene.prompt])
    assert np.nanmax(clean["identity_error"]) == 0 and np.nanmax(clean["count_error"]) == 0


def test_returning_object_must_keep_its_identity():
    """An object leaves the frame and returns as another shape: flagged only after its return."""
    for seed in range(100):
        scene = tw.sample_scene(seed, num_objects=1)
        vis = tw.object_states([scene], 0, 300, size=32)["visible_fraction"][0, 0]
        gone = (vis == 0).nonzero().flatten()
        if gone.numel() and gone[0] > 10 and (vis[gone[0]:] > 0.99).any():
            break
    o = scene.objects[0]
    new_shape = "square" if o.shape != "square" else "triangle"
    changed = tw.Scene(scene.background, (tw.ToyObject(new_shape, o.colour, o.size, o.x, o.y, o.vx, o.vy, o.depth),),
                       scene.arena, scene.camera, scene.lighting, scene.drift)
    cut = int(gone[0])
    video = torch.cat([tw.render(scene, 0, cut), tw.render(changed, cut, 300 - cut)], dim=1)
    m = tm.video_metrics(video[None], [scene.prompt])
    ident = m["identity_error"][0]
    assert np.nansum(ident[:cut]) == 0
    assert np.nanmean(ident[cut:]) == 1 and (~np.isnan(ident[cut:])).sum() > 10


def test_colour_background_lighting_and_flicker_failures():
    scene = _two_object_scene()
    video = tw.render(scene, 0, T)
    base = tm.video_metrics(video[None], [scene.prompt])
    washed = 0.5 * video + 0.5 * video.mean(0, keepdim=True)
    shifted = (video + torch.tensor([0.6, 0.6, -0.6]).view(3, 1, 1, 1)).clamp(-1, 1)  # an olive cast
    dark = (video + 1) * 0.25 - 1  # a quarter of the brightness: far below the lighting cycle
    flicker = video.clone()
    flicker[:, 1::2] = (video[:, 1::2] + 1) * 0.8 - 1  # 20 % darker every other frame
    cases = {"washed": (washed, ("saturation_error", "colour_error")), "shifted": (shifted, ("background_error",)),
             "dark": (dark, ("lighting_error",)), "flicker": (flicker, ("flicker_error",))}
    for name, (v, expect) in cases.items():
        m = tm.video_metrics(v[None], [scene.prompt])
        for key in expect:
            assert _mean(m, key) > _mean(base, key) + 0.05, (name, key, _mean(m, key))
        assert _mean(m, "count_error") == 0 or name == "shifted", name


def test_count_absence_and_position_against_a_scene():
    scene = _two_object_scene()
    video = tw.render(scene, 0, T)
    st = tw.object_states([scene], 0, T)
    # An extra object of a colour the prompt does not name, pasted in a corner away from the others.
    extra = video.clone()
    extra[:, :, 2:10, 2:10] = torch.tensor([1.0, 1.0, -1.0]).view(3, 1, 1, 1)  # yellow
    far = (st["x"][0] > 0.3).all(0) | (st["y"][0] > 0.3).all(0)
    m = tm.video_metrics(extra[None], [scene.prompt])
    assert (m["count_error"][0][far.numpy()] == 1).all() and m["object_count"][0].max() >= 1
    # The blue square erased: the scene shows it, the video does not.
    erased = video.clone()
    blue = (video[2] > video[0] + 0.5) & (video[2] > video[1] + 0.5)
    bg = ((st["background"][0].T.float() * 2 - 1))[:, :, None, None].expand_as(video)
    erased = torch.where(blue[None], bg, video)
    m = tm.video_metrics(erased[None], [scene], [0])
    shown = (st["visible_fraction"][0, 1] > 0.5).numpy()
    assert shown.sum() > 10 and (m["absence_error"][0][shown] >= 0.5).all()
    assert (m["count_error"][0][shown] >= 1).all()
    ok = tm.video_metrics(video[None], [scene], [0])
    assert np.nanmax(ok["absence_error"]) == 0 and np.nanmax(ok["count_error"]) == 0
    # A continuation that is 3 frames off: every position is wrong by ~3 steps.
    late = tw.render(scene, 3, T)
    m = tm.video_metrics(late[None], [scene], [0])
    assert _mean(m, "position_error") > 1.5 / 64 > 0.1 / 64 > _mean(ok, "position_error")


def test_long_absence_in_prompt_mode():
    """Prompt mode cannot know where an object should be, but no object of this world stays unseen for
    more than MAX_ABSENCE frames: one that never comes back is flagged after that long."""
    n = tm.MAX_ABSENCE + 60
    scene = _two_object_scene()
    video = tw.render(scene, 0, n, size=32)
    st = tw.object_states([scene], 0, n, size=32)
    red = (video[0] > video[1] + 0.5) & (video[0] > video[2] + 0.5)
    bg = (st["background"][0].T.float() * 2 - 1)[:, :, None, None].expand_as(video)
    gone = torch.where(red[None], bg, video)  # the red circle never appears
    m_gone = tm.video_metrics(gone[None], [scene.prompt])
    m_ok = tm.video_metrics(video[None], [scene.prompt])
    assert np.nanmax(m_ok["absence_error"]) == 0
    assert np.all(m_gone["absence_error"][0, : tm.MAX_ABSENCE] == 0)
    assert np.all(m_gone["absence_error"][0, tm.MAX_ABSENCE + 1:] == 0.5)  # one of two objects


def test_world_never_hides_an_object_longer_than_max_absence():
    """The bound behind the prompt-mode absence rule: over long sampled videos, no object stays below
    two minimum blob areas of visible pixels (at 32 px) for MAX_ABSENCE frames."""
    size, n = 32, 3000
    area = 2 * tm.default_min_area(size, size)
    scenes = [tw.sample_scene(10_000 + i) for i in range(32)]
    st = tw.object_states(scenes, 0, n, size=size)
    hidden = (st["visible_fraction"] * st["area"][..., None] * size * size < area) & st["present"][..., None]
    run, longest = torch.zeros(hidden.shape[:2]), torch.zeros(hidden.shape[:2])
    for t in range(n):
        run = torch.where(hidden[..., t], run + 1, 0)
        longest = torch.maximum(longest, run)
    assert 40 < int(longest.max()) < tm.MAX_ABSENCE


def test_motion_band_separates_frozen_and_shuffled(world):
    _, _, prompts, controls, by_prompt, _ = world
    bands = tm.motion_band(prompts, size=64)
    for key in tm.MOTION_KEYS:
        lo, hi = bands[key][:, :1], bands[key][:, 1:]
        inside = {k: np.nanmean(((m[key] >= lo) & (m[key] <= hi))[~np.isnan(m[key])]) for k, m in by_prompt.items()}
        assert inside["real"] > 0.8 and inside["frozen"] == 0 and inside["shuffled"] < 0.3, (key, inside)
    # Curves per window: the frozen video is out of the band in every window.
    assert (tm.per_window(by_prompt["frozen"]["motion_error"], 12) > 0.95).all()


def test_presence_window_and_band():
    """presence: share of the prompt's colours detected, averaged over the trailing PRESENCE_WINDOW frames
    (fewer at the start); its band has one (p5, p95) row per window length, cached and deterministic."""
    T_ = 30
    count = torch.zeros(1, T_, 6)
    count[0, :, 0] = 1  # colour 0 always seen (twice from frame 10: still one object)
    count[0, 10:, 0] = 2
    count[0, ::2, 3] = 1  # colour 3 every other frame
    count[0, :, 5] = 1  # colour 5 is not in the prompt
    prompt = torch.zeros(1, 6, dtype=torch.bool)
    prompt[0, [0, 3]] = True
    pres = tm.presence_values(count, prompt)[0].numpy()
    share = np.where(np.arange(T_) % 2 == 0, 1.0, 0.5)
    want = [share[max(0, t + 1 - tm.PRESENCE_WINDOW): t + 1].mean() for t in range(T_)]
    assert np.allclose(pres, want) and pres[0] == 1 and pres[1] == 0.75
    prompt_text = _two_object_scene().prompt
    band = tm.presence_band([prompt_text], size=32)
    assert band.shape == (1, tm.PRESENCE_WINDOW, 2) and (band >= 0).all() and (band <= 1).all()
    assert (band[..., 0] <= band[..., 1]).all() and (band[0, :, 1] == 1).all()  # all shown is never too many
    assert np.array_equal(band, tm.presence_band([prompt_text], size=32))


def _empty_videos(scenes, starts, size=64):
    """The scenes' backgrounds alone (lit and drifting as rendered), their objects removed."""
    bg = tw.object_states(scenes, starts, T, size)["background"]  # [B, T, 3]
    return (bg.permute(0, 2, 1).float() * 2 - 1)[..., None, None].expand(-1, -1, -1, size, size).contiguous()


def test_empty_video_is_flagged_by_presence(world):
    """No object at all: presence 0. Against the band of a 2- or 3-object prompt that is a presence_error of
    1 (the band's lower edge, relative): count_error (extra blobs) and absence_error (unseen > MAX_ABSENCE
    frames) stay 0 in 48 frames. A 1-object prompt's band may reach 0 (the world can hide its one object for a
    whole window), so per video it cannot be judged (error 0 there); only the mean over many prompts can."""
    scenes, starts, prompts, _, by_prompt, _ = world
    m = tm.video_metrics(_empty_videos(scenes, starts), prompts)
    n = np.array([len(s.objects) for s in scenes])
    assert (m["presence"] == 0).all() and np.nanmax(m["count_error"]) == 0 and np.nanmax(m["absence_error"]) == 0
    many = n >= 2
    assert many.sum() >= 4 and (m["presence_error"][many, tm.PRESENCE_WINDOW - 1:] >= 0.9).all()
    assert np.mean(m["presence_error"][many]) > 0.9 > 0.1 > np.mean(by_prompt["real"]["presence_error"][many])
    # One object: the error is 1 exactly where the prompt's band says a window of GT never shows nothing.
    lo = tm.presence_band([prompts[i] for i in np.flatnonzero(n == 1)])[:, :, 0]
    length = np.minimum(np.arange(T), tm.PRESENCE_WINDOW - 1)
    assert np.array_equal(m["presence_error"][n == 1], (lo[:, length] > 0).astype(np.float64))


def test_frozen_video_keeps_presence_in_band_presence_is_not_a_motion_metric(world):
    """Ground-truth frame 0 repeated keeps what frame 0 shows: presence stays in the band (the motion metrics
    flag it, see test_frozen_video_is_flagged). Scene mode reads presence against the same prompt band."""
    _, _, _, _, by_prompt, by_scene = world
    assert _mean(by_prompt["frozen"], "presence_error") < 0.1 and np.nanmin(by_prompt["frozen"]["presence"]) > 0
    assert _mean(by_prompt["frozen"], "motion_error") > 0.95
    for name in ("presence", "presence_error"):
        assert np.array_equal(by_scene["real"][name], by_prompt["real"][name])


def test_quad_distance():
    quads = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]], dtype=torch.float64)
    pts = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 2.0], [2.0, 0.5, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(tm.quad_distance(pts, quads), torch.tensor([0.0, 2.0, 1.0, 2 ** 0.5], dtype=torch.float64))
    seg = torch.tensor([[[0.0, 0, 0], [0, 0, 0], [1, 0, 0], [0.5, 0, 0]]], dtype=torch.float64)  # degenerate
    assert torch.allclose(tm.quad_distance(torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64), seg),
                          torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_the_gpu_match_the_cpu(world):
    _, _, prompts, controls, by_prompt, _ = world
    for name in ("real", "shuffled"):
        m = tm.video_metrics(controls[name].cuda(), prompts)
        for key in tm.METRICS:
            assert np.allclose(m[key], by_prompt[name][key], atol=1e-4, rtol=1e-3, equal_nan=True), (name, key)
