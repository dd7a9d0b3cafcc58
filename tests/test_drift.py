"""training.drift (over toy.metrics): ~0 on clean toy videos, clearly worse on degraded ones; labelling; CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from self_forcing.training import drift
from self_forcing.toy import world as tw


@pytest.fixture(scope="module")
def clean():
    videos, prompts = next(tw.iterate_batches(6, num_frames=12, seed=2024))
    return videos, prompts


def _blur(video, sigma):
    r = int(3 * sigma) + 1
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    C, T, H, W = video.shape
    y = video.transpose(0, 1).reshape(T * C, 1, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.view(T, C, H, W).transpose(0, 1)


def _mean(metrics, name):
    v = np.concatenate([m[name] for m in metrics])
    return float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")


def test_connected_components_labelling():
    m = torch.zeros(1, 8, 10, dtype=torch.bool)
    m[0, 0:2, 0:2] = True              # block A
    m[0, 2, 2] = m[0, 3, 3] = True     # diagonal tail of A (8-connected)
    m[0, 0:6, 6] = True                # U shape B: two arms joined at the bottom
    m[0, 0:6, 8] = True
    m[0, 5, 6:9] = True
    m[0, 7, 0] = True                  # single pixel C
    lab = drift.connected_components(m)[0]
    assert lab[0, 0] == lab[3, 3] == lab[1, 1]
    assert lab[0, 6] == lab[0, 8] == lab[5, 7]
    assert len({int(lab[0, 0]), int(lab[0, 6]), int(lab[7, 0])}) == 3
    assert (lab[~m[0]] == 0).all() and (lab[m[0]] > 0).all()
    # A long snake: one component, however far it winds.
    snake = torch.zeros(1, 9, 9, dtype=torch.bool)
    snake[0, ::2, :] = True
    for r in range(1, 9, 2):
        snake[0, r, 8 if r % 4 == 1 else 0] = True
    assert drift.connected_components(snake)[0][snake[0]].unique().numel() == 1
    k = torch.zeros(1, 8, 10, dtype=torch.long)
    assert drift.count_objects(m, k, 1, min_area=2).tolist() == [2]  # the single pixel is too small
    assert drift.count_objects(m, k, 1, min_area=1).tolist() == [3]


def test_clean_videos_score_about_zero(clean):
    videos, prompts = clean
    metrics = [drift.frame_metrics(v, p) for v, p in zip(videos, prompts)]
    for m in metrics:
        assert set(m) == set(drift.METRICS) and all(len(a) == 12 for a in m.values())
        assert np.all(m["background_error"] < 1e-5)
        assert np.all(m["count_error"] == 0) and np.all(np.nan_to_num(m["identity_error"]) == 0)
    assert _mean(metrics, "saturation_error") < 0.01
    assert _mean(metrics, "colour_error") < 0.01
    assert _mean(metrics, "sharpness_error") < 0.1
    assert _mean(metrics, "motion_error") < 0.1 and _mean(metrics, "velocity_error") < 1e-4


@pytest.mark.parametrize("kind", ["blur", "colour_shift", "noise", "washed_out"])
def test_degraded_videos_score_clearly_worse(clean, kind):
    videos, prompts = clean
    g = torch.Generator().manual_seed(0)
    degrade = {
        "blur": lambda v: _blur(v, 1.0),
        "colour_shift": lambda v: (v + torch.tensor([0.6, 0.6, -0.6]).view(3, 1, 1, 1)).clamp(-1, 1),
        "noise": lambda v: (v + 0.2 * torch.randn(v.shape, generator=g)).clamp(-1, 1),
        "washed_out": lambda v: 0.5 * v + 0.5 * v.mean(0, keepdim=True),
    }[kind]
    base = [drift.frame_metrics(v, p) for v, p in zip(videos[:3], prompts[:3])]
    bad = [drift.frame_metrics(degrade(v), p) for v, p in zip(videos[:3], prompts[:3])]
    appearance = ("background_error", "saturation_error", "colour_error", "count_error", "sharpness_error")
    worse = {}
    for name in appearance:  # over the frames where both are defined
        a, b = np.concatenate([m[name] for m in bad]), np.concatenate([m[name] for m in base])
        both = ~np.isnan(a) & ~np.isnan(b)
        worse[name] = float(np.mean(a[both] - b[both]))
    expected = {"blur": "sharpness_error", "colour_shift": "background_error",
                "noise": "sharpness_error", "washed_out": "saturation_error"}[kind]
    assert worse[expected] > 0.1, worse
    assert all(w > -0.01 for w in worse.values()), worse  # no appearance metric improves
    if kind == "colour_shift":
        assert worse["colour_error"] > 0.05


def test_missing_and_extra_objects_are_counted():
    a = tw.ToyObject("circle", "red", 0.2, 0.3, 0.35, 0.01, 0.004)
    b = tw.ToyObject("triangle", "cyan", 0.22, 0.7, 0.6, -0.008, 0.01)
    scene = tw.Scene("navy", (a, b))  # the first toy world: both always in the frame
    video = tw.render(scene, 0, 4)
    bg = torch.tensor(tw.BACKGROUND_COLOURS[scene.background]) * 2 - 1
    empty = bg.view(3, 1, 1, 1).expand_as(video).clone()
    m = drift.frame_metrics(empty, scene, start_frame=0)  # against the scene: both objects are missing
    assert np.all(m["count_error"] == 2) and np.all(m["absence_error"] == 1) and np.all(np.isnan(m["saturation"]))
    assert np.all(drift.frame_metrics(video, scene, start_frame=0)["count_error"] == 0)
    # One object only, with a second copy of its colour pasted in an empty corner.
    single = tw.Scene(scene.background, scene.objects[:1])
    one = tw.render(single, 0, 4)
    assert np.all(drift.frame_metrics(one, single.prompt)["count_error"] == 0)
    dup = one.clone()
    colour = torch.tensor(tw.SHAPE_COLOURS[scene.objects[0].colour]) * 2 - 1
    cx, cy = tw.object_centres([single], 0, 4)
    for t in range(4):
        x0 = 2 if cx[0, 0, t] > 0.5 else 52
        y0 = 2 if cy[0, 0, t] > 0.5 else 52
        dup[:, t, y0:y0 + 8, x0:x0 + 8] = colour.view(3, 1, 1)
    m = drift.frame_metrics(dup, single.prompt)
    assert np.all(m["count_error"] == 1) and np.all(m["identity_error"] > 0)


def test_drift_curve_averages_per_frame(clean):
    videos, prompts = clean
    short = videos[1][:, :5].clone()
    short[:, :, 20:40, 20:40] = 1.0  # a big white square nobody asked for
    curve = drift.drift_curve([videos[0], short], prompts[:2])
    assert len(curve["count_error"]) == 12
    assert curve["num_videos"].tolist() == [2] * 5 + [1] * 7
    m0, m1 = drift.frame_metrics(videos[0], prompts[0]), drift.frame_metrics(short, prompts[1])
    assert np.allclose(curve["sharpness"][:5], (m0["sharpness"][:5] + m1["sharpness"]) / 2)
    assert np.allclose(curve["sharpness"][5:], m0["sharpness"][5:])
    batch = drift.drift_curve(videos[:2], prompts[:2])
    assert batch["count_error"].shape == (12,)
    with pytest.raises(ValueError, match="prompts"):
        drift.drift_curve(videos[:2], prompts[:1])


def test_cli_reads_npy_and_mp4(tmp_path, capsys):
    scene = tw.sample_scene(8, num_objects=2)
    video = tw.render(scene, 0, 6)
    npy = tmp_path / "v.npy"
    np.save(npy, video.numpy())
    out_json = tmp_path / "m.json"
    assert drift.main([str(npy), "--prompt", scene.prompt, "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "count_error" in table and len(table.strip().splitlines()) == 6 + 2
    saved = json.loads(out_json.read_text())
    assert saved["prompt"] == scene.prompt and len(saved["metrics"]["sharpness"]) == 6
    assert max(saved["metrics"]["background_error"]) < 1e-5
    assert all(v is None for v in saved["metrics"]["position_error"])  # undefined from a prompt: null

    import av  # in the test extras
    mp4 = tmp_path / "v.mp4"
    frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    with av.open(str(mp4), "w") as c:
        stream = c.add_stream("libx264", rate=8, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv444p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    loaded = drift.load_video(str(mp4))
    assert loaded.shape == (3, 6, 64, 64)
    assert (loaded - video).abs().max() < 0.1
    assert drift.main([str(mp4), "--prompt", scene.prompt]) == 0
    assert "mean" in capsys.readouterr().out
    assert drift.main([str(npy), "--prompt", "a purple blob"]) == 2
    assert "cannot parse" in capsys.readouterr().err
