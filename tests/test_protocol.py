"""The evaluation protocol on tiny random toy bundles with a stand-in metric: tables, JSON, paired differences,
training seeds, CIs; the bootstrap covers a known mean; shorter lengths are prefixes of the longest video."""

import json
import os

import numpy as np
import pytest
import torch

from self_forcing.sf_model.config import WanConfig
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.toy.bundle import build_toy_parts, bundle_extras, bundle_meta
from self_forcing.training import protocol as P
from self_forcing.training.models import save_dit

CFG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32, text_len=16, freq_dim=32)


def tiny_bundle(path, seed, role="self_forcing"):
    torch.manual_seed(seed)
    model = CausalWanModel(CFG, attn_backend="sdpa")
    with torch.no_grad():
        model.head.head.weight.mul_(20.0)  # visible differences between models after decoding
    enc, codec = build_toy_parts(CFG.text_dim, CFG.text_len, 0)
    meta = {"frames_per_block": 3, "steps": [1000, 750, 500, 250], "shift": 5.0, "warp": True,
            "context_noise": 0.0, "steps_trained": {"dmd": 7},
            "compute": {"budget_s": 10.0, "loop_s": 9.5, "wall_s": 12.0, "stages": {"dmd": {"steps": 7}}},
            "toy": bundle_meta(enc, 16, (8, 8), 6)}
    save_dit(str(path), model, CFG, role, meta, extras=bundle_extras(enc, codec))
    return str(path)


def stand_in_metrics(videos, prompts):
    """Per-frame stand-ins: distance of the mean pixel from black (an 'error') and the pixel spread."""
    assert videos.ndim == 5 and videos.shape[1] == 3 and len(prompts) == videos.shape[0]
    v = videos.float()
    return {"darkness_error": (v.mean(dim=(1, 3, 4)) + 1).abs().numpy(), "spread": v.std(dim=(1, 3, 4)).numpy()}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return {"sf": [tiny_bundle(d / "sf0.safetensors", 1), tiny_bundle(d / "sf1.safetensors", 2)],
            "tf": [tiny_bundle(d / "tf0.safetensors", 3, "teacher_forcing"),
                   tiny_bundle(d / "tf1.safetensors", 4, "teacher_forcing")]}


PROTO = P.Protocol(prompts=5, seeds=(0, 1), lengths=(1, 3), batch_size=2, bootstrap=300)


@pytest.fixture(scope="module")
def two_models(bundles, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    models = {"self_forcing": bundles["sf"][:1], "teacher_forcing": bundles["tf"][:1]}
    res = P.run_protocol(models, str(out), PROTO, metrics_fn=stand_in_metrics, errors=("darkness_error",),
                         device="cpu", plots=False, log=lambda *_: None)
    return models, res, out


def test_protocol_writes_tables_json_and_cis(two_models):
    models, res, tmp_path = two_models
    for name in ("results.json", "results.md", "raw.npz"):
        assert os.path.isfile(tmp_path / name)
    with open(tmp_path / "results.json") as fh:
        assert json.load(fh)["setup"]["frames"] == [6, 18]
    assert res["metrics"] == ["darkness_error", "spread"] and res["errors"] == ["darkness_error"]
    assert len(res["setup"]["prompt_list"]) == 5 and all("bouncing" in p for p in res["setup"]["prompt_list"])
    for kind in ("mean", "last"):
        for metric in res["metrics"]:
            for n in ("1", "3"):
                for model in models:
                    e = res["table"][kind][metric][n][model]
                    assert e["n"] == 5 and e["lo"] <= e["mean"] <= e["hi"]
    # the 1x "mean" and "last" summaries are the same window
    assert res["table"]["mean"]["spread"]["1"] == res["table"]["last"]["spread"]["1"]
    pair = res["paired"]["self_forcing - teacher_forcing"]["mean"]["darkness_error"]["3"]
    a = res["table"]["mean"]["darkness_error"]["3"]
    assert pair["mean"] == pytest.approx(a["self_forcing"]["mean"] - a["teacher_forcing"]["mean"])
    curve = res["curves"]["spread"]["self_forcing"]
    assert len(curve["mean"]) == 3 and all(lo <= m <= hi for lo, m, hi in zip(curve["lo"], curve["mean"], curve["hi"]))
    raw = np.load(tmp_path / "raw.npz")
    assert raw["self_forcing/spread"].shape == (1, 5, 2, 18)
    # the whole-video 3x mean is the mean of the three window means (units average frames equally)
    assert a["self_forcing"]["mean"] == pytest.approx(np.mean(res["curves"]["darkness_error"]["self_forcing"]["mean"]))
    md = (tmp_path / "results.md").read_text()
    assert "| darkness_error ↓ | self_forcing |" in md and "self_forcing - teacher_forcing" in md
    assert "3x (18 frames)" in md and "dmd 7" in md


def test_paired_difference_of_a_model_with_itself_is_exactly_zero(bundles, tmp_path):
    models = {"a": bundles["sf"][:1], "b": bundles["sf"][:1]}
    proto = P.Protocol(prompts=3, seeds=(0,), lengths=(1, 2), batch_size=3, bootstrap=100, paired=(("a", "b"),))
    res = P.run_protocol(models, str(tmp_path), proto, metrics_fn=stand_in_metrics, device="cpu", plots=False,
                         log=lambda *_: None)
    d = res["paired"]["a - b"]["last"]["spread"]["2"]
    assert d["mean"] == d["lo"] == d["hi"] == 0.0
    assert res["errors"] == ["darkness_error"]  # *_error names when no list is given


def test_training_seeds_are_units_and_run_folders_are_found(bundles, tmp_path):
    import shutil

    for i in range(2):  # two run folders with the standard export names
        folder = tmp_path / f"seed{i}"
        folder.mkdir()
        shutil.copy(bundles["sf"][i], folder / "self_forcing_toy.safetensors")
        shutil.copy(bundles["tf"][i], folder / "teacher_forcing_toy.safetensors")
    models = P.collect_models(runs=[str(tmp_path / "seed*")])
    assert list(models) == ["self_forcing", "teacher_forcing"] and len(models["self_forcing"]) == 2
    assert P.collect_models([f"x={bundles['sf'][0]},{bundles['sf'][1]}", f"x={bundles['tf'][0]}"])["x"] == \
        bundles["sf"] + bundles["tf"][:1]
    with pytest.raises(ValueError, match="no file"):
        P.collect_models(["x=/nonexistent.safetensors"])
    out = tmp_path / "res"
    res = P.run_protocol(models, str(out), P.Protocol(prompts=3, seeds=(0,), lengths=(2,), batch_size=4,
                                                      bootstrap=100),
                         metrics_fn=stand_in_metrics, device="cpu", plots=False, log=lambda *_: None)
    assert res["table"]["mean"]["spread"]["2"]["self_forcing"]["n"] == 6  # 2 training seeds x 3 prompts
    assert np.load(out / "raw.npz")["teacher_forcing/spread"].shape == (2, 3, 1, 12)
    assert len(res["models"]["self_forcing"]["training"]) == 2
    with pytest.raises(ValueError, match="training seeds"):
        P.run_protocol({"a": bundles["sf"], "b": bundles["tf"][:1]}, str(out), P.Protocol(
            prompts=2, seeds=(0,), lengths=(1,), bootstrap=10, paired=(("a", "b"),)),
            metrics_fn=stand_in_metrics, device="cpu", plots=False, log=lambda *_: None)


def test_cli_with_a_stand_in_metric(bundles, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "default_metrics", lambda: (stand_in_metrics, ("darkness_error",)))
    rc = P.main(["--models", f"self_forcing={bundles['sf'][0]}", f"teacher_forcing={bundles['tf'][0]}",
                 "--out", str(tmp_path), "--prompts", "2", "--seeds", "0", "--lengths", "1", "2",
                 "--bootstrap", "50", "--device", "cpu", "--no-plots", "--paired", "teacher_forcing-self_forcing"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "darkness_error @ 2x" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["paired"]) == ["teacher_forcing - self_forcing"]
    assert P.main(["--out", str(tmp_path)]) == 2
    assert P.main(["--models", "nonsense", "--out", str(tmp_path)]) == 2


def test_plots_are_drawn_when_matplotlib_is_installed(two_models, tmp_path):
    pytest.importorskip("matplotlib")
    from self_forcing.training.protocol_report import plot_all

    _, res, _ = two_models
    assert "2 plots" in plot_all(res, str(tmp_path / "plots"))
    assert sorted(os.listdir(tmp_path / "plots")) == [f"{m}.png" for m in res["metrics"]]


def test_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path):
    import builtins

    from self_forcing.training.protocol_report import plot_all

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert "plots skipped" in plot_all({"metrics": []}, str(tmp_path / "plots"))
    assert not os.path.exists(tmp_path / "plots")


# -- statistics -------------------------------------------------------------------------------------------
def test_bootstrap_ci_covers_the_mean_of_a_known_distribution():
    rng = np.random.default_rng(0)
    e = P.bootstrap_ci(rng.normal(3.0, 1.0, 400), resamples=2000)
    assert e["lo"] < 3.0 < e["hi"] and e["hi"] - e["lo"] == pytest.approx(2 * 1.96 / 20, rel=0.2)
    # coverage over many samples is close to the nominal 95 % (skewed distribution, 64 units like the protocol)
    hits = 0
    for i in range(200):
        x = rng.exponential(2.0, 64)
        c = P.bootstrap_ci(x, resamples=1000, seed=i)
        hits += c["lo"] <= 2.0 <= c["hi"]
    assert 0.86 <= hits / 200 <= 0.99
    # NaN units are dropped; columns share the resampled units; an empty input gives no numbers
    assert P.bootstrap_ci([1.0, np.nan, 3.0])["n"] == 2
    cols = P.bootstrap_ci(np.stack([np.arange(10.0), np.arange(10.0) * 2], 1), resamples=100)
    assert cols["mean"] == [4.5, 9.0] and cols["lo"][1] == pytest.approx(2 * cols["lo"][0])
    assert P.bootstrap_ci([np.nan])["mean"] is None


def test_units_average_sampling_seeds_within_training_seed_and_prompt():
    v = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # [train seeds, prompts, sampling seeds]
    assert P.units(v).tolist() == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5]
    w = P.windows(np.arange(12.0).reshape(1, 12), 4)
    assert w.tolist() == [[1.5, 5.5, 9.5]]
    per = np.arange(12.0)
    assert P.video_summary(per, 8, 4, "mean") == pytest.approx(3.5)
    assert P.video_summary(per, 8, 4, "last") == pytest.approx(5.5)


def test_shorter_lengths_are_prefixes_of_the_longest_video(bundles):
    """Why the protocol generates once: n frames through the rolling cache are the first n of a longer run."""
    lm = P.load_bundle(bundles["sf"][0], torch.device("cpu"))
    opts = StreamOptions(frames_per_block=3, window=6, extend_positions=True)
    ctx = lm.encode(["a red circle bouncing on a black background", "a blue square bouncing on a gray background"])
    short = generate(lm.model, ctx, num_frames=6, height=8, width=8, seed=5, options=opts)
    long = generate(lm.model, ctx, num_frames=15, height=8, width=8, seed=5, options=opts)
    assert torch.allclose(short, long[:, :, :6], atol=1e-5)


def test_a_stopped_protocol_resumes_from_its_cache(bundles, tmp_path):
    calls = []

    def counting(videos, prompts):
        calls.append(len(prompts))
        return stand_in_metrics(videos, prompts)

    models = {"self_forcing": bundles["sf"][:1], "teacher_forcing": bundles["tf"][:1]}
    proto = P.Protocol(prompts=2, seeds=(0,), lengths=(1, 2), batch_size=2, bootstrap=20)
    kw = dict(metrics_fn=counting, device="cpu", plots=False, log=lambda *_: None)
    import time

    assert P.run_protocol(models, str(tmp_path), proto, deadline=time.time() - 1, **kw) is None
    first = P.run_protocol(models, str(tmp_path), proto, **kw)
    assert len(calls) == 2 and sorted(os.listdir(tmp_path / "cache")) == ["self_forcing.0.npz",
                                                                           "teacher_forcing.0.npz"]
    again = P.run_protocol(models, str(tmp_path), P.Protocol(prompts=2, seeds=(0,), lengths=(1, 2), batch_size=2,
                                                             bootstrap=20, ci=0.9), **kw)
    assert len(calls) == 2  # all cached: nothing generated again
    assert again["table"]["mean"]["spread"]["2"]["self_forcing"]["mean"] == \
        first["table"]["mean"]["spread"]["2"]["self_forcing"]["mean"]
    P.run_protocol(models, str(tmp_path), P.Protocol(prompts=3, seeds=(0,), lengths=(1, 2), batch_size=2,
                                                     bootstrap=20), **kw)
    assert len(calls) == 2 + 2 * 2  # other prompts: generated again (2 batches per model)


def test_a_cache_without_a_newly_added_metric_is_computed_anew(bundles, tmp_path):
    calls = []

    def counting(videos, prompts, extra=False):
        calls.append(len(prompts))
        out = stand_in_metrics(videos, prompts)
        if extra:
            out["new_error"] = np.zeros_like(next(iter(out.values())))
        return out

    models = {"self_forcing": bundles["sf"][:1]}
    proto = P.Protocol(prompts=2, seeds=(0,), lengths=(1, 2), batch_size=2, bootstrap=20)
    kw = dict(device="cpu", plots=False, log=lambda *_: None)
    P.run_protocol(models, str(tmp_path), proto, metrics_fn=counting, **kw)
    assert len(calls) == 1
    P.run_protocol(models, str(tmp_path), proto, metrics_fn=counting, **kw)
    assert len(calls) == 1  # same metrics: cached

    def counting_new(videos, prompts):
        return counting(videos, prompts, extra=True)

    counting_new.__qualname__, counting_new.__module__ = counting.__qualname__, counting.__module__  # same key
    res = P.run_protocol(models, str(tmp_path), proto, metrics_fn=counting_new, errors=("new_error",), **kw)
    assert len(calls) == 2  # the cache lacked new_error: generated again
    assert "new_error" in res["table"]["mean"]


# -- each model's own cache and sampler settings -----------------------------------------------------------
@pytest.fixture(scope="module")
def sink_bundle(tmp_path_factory):
    """A bundle trained with an attention sink (as Self-Forcing++ / Resampling Forcing exports store it) and
    the method / solver entries of a Resampling Forcing export."""
    torch.manual_seed(5)
    model = CausalWanModel(CFG, attn_backend="sdpa")
    with torch.no_grad():
        model.head.head.weight.mul_(20.0)
    enc, codec = build_toy_parts(CFG.text_dim, CFG.text_len, 0)
    meta = {"frames_per_block": 3, "steps": [1000, 500], "shift": 5.0, "warp": True, "context_noise": 0.0,
            "sink": 3, "method": "resampling_forcing", "solver": "euler", "toy": bundle_meta(enc, 16, (8, 8), 6)}
    path = tmp_path_factory.mktemp("sink") / "rf.safetensors"
    save_dit(str(path), model, CFG, "resampling_forcing", meta, extras=bundle_extras(enc, codec))
    return str(path)


def test_the_protocol_samples_with_the_checkpoints_attention_sink(sink_bundle):
    """Videos longer than window + sink: the protocol's video is the one of a rolling cache with the stored
    sink (as ``sf_model.window.default_policy`` gives), not the one without a sink."""
    from self_forcing.sf_model.window import CachePolicy, default_policy

    seen = []

    def keep(videos, prompts):
        seen.append(videos.clone())
        return stand_in_metrics(videos, prompts)

    proto = P.Protocol(prompts=2, seeds=(0,), lengths=(3,), batch_size=2, bootstrap=10)
    bundle = P.load_bundle(sink_bundle, torch.device("cpu"))
    P.generate_metrics(bundle, P.protocol_prompts(2, proto.prompt_seed), proto, keep)
    ctx = bundle.encode(P.protocol_prompts(2, proto.prompt_seed))

    def video(cache):
        opts = StreamOptions.from_meta(bundle.meta, cache)
        return bundle.decode(generate(bundle.model, ctx, num_frames=18, height=8, width=8, seed=P.sampler_seed(0, 0),
                                      options=opts))

    policy = default_policy(bundle.meta, 18)
    assert (policy.window, policy.sink) == (6, 3)
    with_sink, without = video(policy), video(CachePolicy.rolling(3, 6))
    assert (with_sink - without).abs().max() > 1e-3  # the sink changes these videos
    assert len(seen) == 1 and torch.allclose(seen[0], with_sink, atol=1e-5)


def test_results_keep_each_models_method_solver_and_sink(sink_bundle, bundles, tmp_path):
    models = {"resampling_forcing": [sink_bundle], "self_forcing": bundles["sf"][:1]}
    res = P.run_protocol(models, str(tmp_path), P.Protocol(prompts=2, seeds=(0,), lengths=(1,), batch_size=2,
                                                           bootstrap=10),
                         metrics_fn=stand_in_metrics, device="cpu", plots=False, log=lambda *_: None)
    (rf,), (sf,) = res["models"]["resampling_forcing"]["training"], res["models"]["self_forcing"]["training"]
    assert (rf["method"], rf["solver"], rf["sink"], rf["steps"]) == ("resampling_forcing", "euler", 3, [1000, 500])
    assert "method" not in sf and "solver" not in sf and sf["sink"] == 0
    stored = json.loads((tmp_path / "results.json").read_text())["models"]["resampling_forcing"]["training"][0]
    assert stored["method"] == "resampling_forcing" and stored["solver"] == "euler"


def test_the_same_file_with_the_fp8_kv_cache_is_measured_as_its_own_model(bundles, tmp_path, monkeypatch):
    # one bundle under two names, one sampled with the FP8 K/V cache: its videos are the core sampler's with
    # kv_fp8=True (so the paired difference is what the FP8 cache costs), not the exact ones
    seen = []
    real = P.generate_metrics

    def spy(bundle, prompts, proto, metrics_fn, *, kv_fp8=False):
        seen.append(kv_fp8)
        return real(bundle, prompts, proto, metrics_fn, kv_fp8=kv_fp8)

    monkeypatch.setattr(P, "generate_metrics", spy)
    models = {"exact": bundles["sf"][:1], "fp8kv": bundles["sf"][:1]}
    proto = P.Protocol(prompts=2, seeds=(0,), lengths=(1, 2), batch_size=2, bootstrap=100,
                       paired=(("fp8kv", "exact"),), kv_fp8=("fp8kv",))
    res = P.run_protocol(models, str(tmp_path), proto, metrics_fn=stand_in_metrics, device="cpu", plots=False,
                         log=lambda *_: None)
    assert seen == [False, True]
    d = res["paired"]["fp8kv - exact"]["mean"]["spread"]["2"]
    assert d["mean"] != 0.0  # the FP8 cache changes the videos (the same file without it would give exactly 0)
    b = P.load_bundle(bundles["sf"][0], torch.device("cpu"))
    prompts = P.protocol_prompts(2, proto.prompt_seed, proto.max_objects)
    exact = real(b, prompts, proto, stand_in_metrics)
    fp8 = real(b, prompts, proto, stand_in_metrics, kv_fp8=True)
    assert not np.array_equal(exact["spread"], fp8["spread"])
    # a stopped run's cache of the exact model is not reused for the FP8 one (the key says which)
    res2 = P.run_protocol(models, str(tmp_path), proto, metrics_fn=stand_in_metrics, device="cpu", plots=False,
                          log=lambda *_: None)
    assert res2["paired"]["fp8kv - exact"]["mean"]["spread"]["2"]["mean"] == d["mean"]
    assert P.main(["--models", f"a={bundles['sf'][0]}", "--out", str(tmp_path), "--kv-fp8", "b"]) == 2
