"""`self-forcing generate` on the Wan path: a tiny random causal DiT saved as a Self Forcing training checkpoint,
a tiny Wan2.1-shaped VAE and a text-embedding file as 'Save Text Embeddings' writes it, all built here. The CLI's
raw frames equal the streaming pipeline's, in fp32 and bf16; the fragmented mp4 holds one fragment per chunk."""

import io

import numpy as np
import pytest
import torch

from self_forcing.cli import main
from self_forcing.cli.fmp4 import top_level_boxes
from self_forcing.sf_model.text_embeds import save_text_embeds
from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.config import WanConfig
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.pipeline import stream_video
from self_forcing.sf_model.sampler import StreamOptions
from self_forcing.sf_model.vae import WanVAE, WanVAEConfig, load_vae, save_vae

av = pytest.importorskip("av")

WIDTH, HEIGHT = 48, 32        # pixels: latent 6x4 through the x8 VAE
LATENT_FRAMES = 6             # two chunks of 3 -> 1 + 4*5 = 21 video frames
VIDEO_FRAMES = 21
# Wan-shaped (head_dim 128, so a bare training checkpoint's config is inferred from its weights) but tiny
TINY_WAN = WanConfig(dim=128, ffn_dim=128, num_heads=1, num_layers=2, text_dim=32, freq_dim=32)


def random_dit(seed: int) -> CausalWanModel:
    g = torch.Generator().manual_seed(seed)
    model = CausalWanModel(TINY_WAN)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")) else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    model = random_dit(seed=4)
    # the layout of official Self Forcing training checkpoints: {"generator_ema": {"model.<wan key>": ...}}
    dit = root / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}}, dit)
    torch.manual_seed(1)
    vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    vae_path = root / "wan_2.1_vae.safetensors"
    save_vae(vae_path, vae)
    emb = root / "prompt_00001.safetensors"
    save_text_embeds(str(emb), torch.randn(1, 10, TINY_WAN.text_dim, generator=torch.Generator().manual_seed(2)),
                     {"prompt": "a cat"})
    narrow = root / "narrow_00001.safetensors"
    save_text_embeds(str(narrow), torch.randn(1, 10, TINY_WAN.text_dim // 2))
    return {"dit": str(dit), "vae": str(vae_path), "embeds": str(emb), "narrow": str(narrow)}


def reference(files, dtype=torch.float32, seed=5) -> np.ndarray:
    from self_forcing.sf_model.text_embeds import load_text_embeds

    model = load_model(files["dit"], dtype=dtype).model
    vae = load_vae(files["vae"], dtype=dtype)
    ctx, _ = load_text_embeds(files["embeds"])
    opts = StreamOptions(frames_per_block=3, steps=(1000, 750, 500, 250), shift=5.0, partial_last_chunk=True)
    chunks = stream_video(model, vae, ctx.float(), num_frames=LATENT_FRAMES, height=HEIGHT // 8, width=WIDTH // 8,
                          seed=seed, options=opts)
    return torch.cat([c.frames[0] for c in chunks]).numpy()


@pytest.fixture(scope="module")
def ref32(wan_files):
    return reference(wan_files)


def wan_args(files, *extra):
    return ["generate", "--model", files["dit"], "--vae", files["vae"], "--embeds", files["embeds"],
            "--width", str(WIDTH), "--height", str(HEIGHT), "--frames", str(LATENT_FRAMES), "--seed", "5",
            "--no-progress", *extra]


def raw_frames(data: bytes) -> np.ndarray:
    assert len(data) == VIDEO_FRAMES * WIDTH * HEIGHT * 3
    return np.frombuffer(data, np.uint8).reshape(VIDEO_FRAMES, HEIGHT, WIDTH, 3)


def test_wan_checkpoint_streams_raw_frames_and_a_fragmented_mp4(wan_files, ref32, tmp_path, capsysbinary):
    out = tmp_path / "wan.mp4"
    assert main(wan_args(wan_files, "--raw", "-", "--stream", "--out", str(out))) == 0
    captured = capsysbinary.readouterr()
    ref = ref32
    assert ref.shape == (VIDEO_FRAMES, HEIGHT, WIDTH, 3) and ref.std() > 5  # random weights: not a flat image
    assert np.array_equal(raw_frames(captured.out), ref)
    err = captured.err.decode()
    assert "6 latent frames (21 video frames) in 2 chunks of 3" in err and "48x32" in err
    assert "rgb24 48x32, 4608 bytes per frame, 21 frames at 16 fps" in err
    data = out.read_bytes()
    assert [k for k, _, _ in top_level_boxes(data)] == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * 2
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (WIDTH, HEIGHT)
        assert sum(1 for _ in container.decode(video=0)) == VIDEO_FRAMES


def test_wan_dtype_and_fused_kernels(wan_files, ref32, monkeypatch, capsysbinary):
    from self_forcing.sf_model.speed.trunk import FusedTrunk

    assert main(wan_args(wan_files, "--raw", "-", "--dtype", "bf16")) == 0
    bf16 = raw_frames(capsysbinary.readouterr().out)
    assert np.array_equal(bf16, reference(wan_files, torch.bfloat16))
    assert np.abs(bf16.astype(int) - ref32).max() > 2  # bf16 really ran (it differs from fp32)

    trunk_calls = []
    real_trunk = FusedTrunk.__call__
    monkeypatch.setattr(FusedTrunk, "__call__", lambda *a, **k: trunk_calls.append(1) or real_trunk(*a, **k))
    assert main(wan_args(wan_files, "--raw", "-", "--fused-kernels")) == 0
    captured = capsysbinary.readouterr()
    fused, ref = raw_frames(captured.out).astype(int), ref32.astype(int)
    assert len(trunk_calls) == 2 * 4 + 1  # every denoising pass and the clean pass between the two chunks
    assert np.abs(fused - ref).max() <= 1 and np.abs(fused - ref).mean() < 0.01  # same math, float reordering
    assert b"with fused kernels" in captured.err


@pytest.mark.parametrize("change, message", [
    ({"--embeds": None}, "pass --embeds"),
    ({"--vae": None}, "pass --embeds"),
    ({"--prompt": "a cat"}, "--prompt needs a toy model"),
    ({"--embeds": "narrow"}, "embeddings of width 16 but the model expects 32"),
    ({"--width": "40"}, "--width 40: frame sizes must be positive multiples of 16"),
    ({"--vae": "dit"}, "--vae: "),
])
def test_wan_argument_errors(wan_files, change, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = wan_args(wan_files)
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, wan_files.get(value, value)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
