"""The whole toy pipeline at test size on the CPU: every stage runs and learns, the export loads in our
loader and generates, the bundled parts give prompt -> context and latents -> frames, and the CLI streams an
mp4 with the rolling cache."""

import json
import os

import pytest
import torch

from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.toy.bundle import encode_prompt, is_toy_bundle, latents_to_frames
from self_forcing.training.config import load_config
from self_forcing.training.engine import Runtime, key_seed, read_jsonl
from self_forcing.training.stages import run_stages
from self_forcing.training.data import make_world

PROMPT = "a red circle and a blue square bouncing on a black background"


def config(out_dir):
    return load_config(data={
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": 50, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32, "text_len": 16,
                  "freq_dim": 32},
        "world": {"size": 16, "frames": 6},
        "teacher": {"steps": 24, "batch_size": 4, "lr": 3e-3, "ema_decay": 0.5},
        "ode_pairs": {"count": 8, "batch_size": 8, "substeps": 1, "guidance": 2.0},
        "ode_init": {"steps": 12, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.5},
        "dmd": {"steps": 10, "batch_size": 2, "critic_ratio": 5, "lr": 1e-4, "lr_critic": 2e-3,
                "ema_decay": 0.5},
        "eval": {"prompts": 2, "length_factor": 5, "batch_size": 2},
        "export": {"dtype": "fp16", "causal_init": True},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cfg = config(out)
    world = make_world(cfg)
    paths = run_stages(cfg, ["teacher", "ode_pairs", "ode_init", "dmd", "eval", "export"],
                       Runtime(device=torch.device("cpu")), world)
    return cfg, world, paths


def losses(cfg, stage, key):
    return [r[key] for r in read_jsonl(os.path.join(cfg.run.out_dir, stage, "log.jsonl")) if key in r]


def fixed_batch_loss(cfg, world, path, stage):
    """The stage's loss on a fixed batch (less noisy than single training steps)."""
    from self_forcing.training.models import load_dit

    model, _ = load_dit(path, torch.device("cpu"))
    idx = list(range(10_000, 10_008))
    x0 = world.clips(idx, "cpu", "probe")
    ctx = world.contexts(idx, "cpu", "probe")
    g = torch.Generator().manual_seed(key_seed("probe", stage))
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(len(idx), generator=g) * 0.9 + 0.05
    from self_forcing.training.teacher import flow_matching_loss

    with torch.no_grad():
        return float(flow_matching_loss(model, x0, ctx, sigma, noise))


def test_every_stage_runs_and_learns(trained):
    cfg, world, paths = trained
    teacher = losses(cfg, "teacher", "loss")
    assert len(teacher) == cfg.teacher.steps
    assert sum(teacher[-5:]) / 5 < sum(teacher[:5]) / 5
    ode = losses(cfg, "ode_init", "loss")
    assert sum(ode[-3:]) / 3 < sum(ode[:3]) / 3
    critic = losses(cfg, "dmd", "critic_loss")
    assert len(critic) == cfg.dmd.steps and sum(critic[-3:]) / 3 < sum(critic[:3]) / 3
    gen_steps = [r for r in read_jsonl(os.path.join(cfg.run.out_dir, "dmd", "log.jsonl")) if "generator_loss" in r]
    assert len(gen_steps) == 2  # steps 0 and 5 with critic_ratio 5
    assert all(r["generator_grad_norm"] > 0 and 0 <= r["exit_index"] < 4 for r in gen_steps)
    # the trained teacher beats a fresh model on held-out clips
    from self_forcing.training.models import build_model, save_dit

    fresh = os.path.join(cfg.run.out_dir, "fresh.safetensors")
    save_dit(fresh, build_model(cfg.model, 1, torch.device("cpu")), cfg.model, "teacher")
    assert fixed_batch_loss(cfg, world, paths["teacher"], "t") < 0.8 * fixed_batch_loss(cfg, world, fresh, "t")


def test_eval_writes_drift_curves_for_both_models(trained):
    cfg, _, paths = trained
    with open(paths["eval"]) as fh:
        ev = json.load(fh)
    assert ev["frames"] == 30 and ev["window"] == 6 and len(ev["prompts"]) == 2
    from self_forcing.training.evaluate import SUMMARY_METRICS

    for name in ("causal_init", "self_forcing"):
        curves = ev["curves"][name]
        assert {"background_error", "colour_error", "count_error", "sharpness_error"} <= set(curves)
        assert all(len(v) == 30 for v in curves.values())
        assert set(ev["summary"][name]) >= set(SUMMARY_METRICS)
    assert os.path.isfile(os.path.join(cfg.run.out_dir, "eval_samples.npz"))


def test_export_round_trip_through_our_loader(trained):
    cfg, _, paths = trained
    loaded = load_model(paths["export"])
    assert loaded.model.dtype == torch.float16 and is_toy_bundle(loaded)
    meta = loaded.meta
    assert meta["frames_per_block"] == 3 and meta["steps"] == [1000, 750, 500, 250] and meta["shift"] == 5.0
    assert meta["role"] == "self_forcing" and meta["toy"]["train_frames"] == 6
    assert meta["steps_trained"] == {"teacher": 24, "ode_init": 12, "dmd": 10}
    assert "drift" in meta and meta["training"]["summary"]["dmd"]["critic_ratio"] == 5
    # the export carries the EMA weights of the DMD stage
    sf = load_model(paths["dmd"]).model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.allclose(v.float(), sf[k], atol=2e-3, rtol=1e-2), k
    # generate from a prompt and decode to ComfyUI IMAGE frames
    model = load_model(paths["export"], dtype=torch.float32).model
    ctx = encode_prompt(loaded, PROMPT, "cpu")
    assert ctx.shape == (1, 16, 32) and ctx[0, 12:].abs().sum() == 0  # 12 words, zero padding rows
    lat = generate(model, ctx, num_frames=12, height=8, width=8, seed=0, options=StreamOptions(window=6))
    frames = latents_to_frames(loaded, lat)
    assert frames.shape == (12, 16, 16, 3) and frames.min() >= 0 and frames.max() <= 1
    causal = load_model(paths["export_causal_init"])
    assert causal.meta["role"] == "causal_init" and is_toy_bundle(causal)


def test_cli_streams_an_mp4_with_the_rolling_cache(trained, tmp_path, capsys):
    av = pytest.importorskip("av")
    from self_forcing.cli import main

    _, _, paths = trained
    out = tmp_path / "toy.mp4"
    rc = main(["generate", "--model", paths["export"], "--prompt", PROMPT, "--frames", "15", "--out", str(out),
               "--seed", "3"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "rolling window 6" in err and "wrote" in err
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 15 and frames[0].shape == (16, 16, 3)


def test_cli_reports_bad_input(trained, tmp_path, capsys):
    from self_forcing.cli import main

    _, _, paths = trained
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["generate", "--model", paths["export"], "--window", "soon", "--frames", "30",
                 "--out", str(tmp_path / "y.mp4")]) == 2
    assert "--window" in capsys.readouterr().err


def test_the_committed_demo_checkpoint_generates():
    """assets/self_forcing_toy.safetensors: Wan-shaped for ComfyUI core, bundled parts, a few chunks on the CPU."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "self_forcing_toy.safetensors")
    loaded = load_model(path, dtype=torch.float32)
    cfg = loaded.config
    assert cfg.dim // cfg.num_heads == 128 and cfg.text_dim == 4096 and cfg.freq_dim == 256
    assert cfg.patch_size == (1, 2, 2) and cfg.in_dim == cfg.out_dim == 16
    assert is_toy_bundle(loaded) and loaded.meta["role"] == "self_forcing"
    assert os.path.getsize(path) < 15e6
    ctx = encode_prompt(loaded, PROMPT, "cpu")
    h, w = loaded.meta["toy"]["latent_size"]
    lat = generate(loaded.model, ctx, num_frames=6, height=h, width=w, seed=0)
    frames = latents_to_frames(loaded, lat)
    assert frames.shape == (6, 64, 64, 3) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    # a trained model: frames are mostly the prompt's black background, not noise
    assert float((frames.max(-1).values < 0.15).float().mean()) > 0.5


def test_export_publishes_file_and_model_card_to_the_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub

    from self_forcing.training.export import export_model

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo, private=False, exist_ok=False):
            calls.append(("create", repo, private))
            return f"https://huggingface.co/{repo}"

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message):
            data = path_or_fileobj if isinstance(path_or_fileobj, bytes) else open(path_or_fileobj, "rb").read()
            calls.append(("upload", path_in_repo, repo_id, data))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cfg, world, paths = trained
    cfg = load_config(data={**cfg.to_dict(), "export": {"hub_repo": "someone/toy-sf", "dtype": "fp16"}})
    path = export_model(cfg, world, paths["dmd"], str(tmp_path / "pub.safetensors"))
    assert calls[0] == ("create", "someone/toy-sf", False)
    names = [c[1] for c in calls[1:]]
    assert names == ["pub.safetensors", "README.md"]
    card = calls[2][3].decode()
    assert "Measured drift" in card and "critic ratio 5" in card and '"count_error"' in card
    assert load_model(path).meta["role"] == "self_forcing"
