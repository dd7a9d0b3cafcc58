"""Wan2.1 VAE: streaming == whole-video, parity with diffusers' AutoencoderKLWan, checkpoint I/O."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from self_forcing.sf_model.vae import TINY_VAE, WAN21_VAE, WanVAE, WanVAEConfig
from self_forcing.sf_model.vae.checkpoint import (
    VAECheckpointError,
    infer_vae_config,
    load_vae,
    save_vae,
    wan_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

from safetensors.torch import save_file  # noqa: E402


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with activations of order one (gammas away from 1, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return randomize_(WanVAE(TINY_VAE), seed=0).eval()


def stream_decode(vae: WanVAE, z: torch.Tensor, sizes, clamp=False):
    dec = vae.stream_decoder(clamp=clamp)
    outs, start = [], 0
    for n in sizes:
        outs.append(dec.push(z[:, :, start : start + n]))
        start += n
    assert start == z.shape[2]
    return outs


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[1] * 7, [3, 3, 1], [2, 1, 4], [1, 6], [7]])
def test_streamed_decode_equals_whole(vae, sizes):
    torch.manual_seed(1)
    z = torch.randn(2, TINY_VAE.z_dim, 7, 3, 4)
    whole = vae.decode(z, clamp=False)
    assert whole.shape == (2, 3, 1 + 4 * 6, 24, 32)
    assert whole.abs().max() > 0.1  # a meaningful signal, not all zeros
    outs = stream_decode(vae, z, sizes)
    # each push returns exactly its own frames: 1 + 4(n-1) for the first chunk, 4n later
    assert [o.shape[2] for o in outs] == [1 + 4 * (sizes[0] - 1)] + [4 * n for n in sizes[1:]]
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-5)


def test_interleaved_streams_share_no_hidden_state(vae):
    za, zb = torch.randn(1, TINY_VAE.z_dim, 4, 2, 3), torch.randn(1, TINY_VAE.z_dim, 4, 2, 3)
    want_a, want_b = vae.decode(za, clamp=False), vae.decode(zb, clamp=False)
    da, db = vae.stream_decoder(clamp=False), vae.stream_decoder(clamp=False)
    outs_a, outs_b = [], []
    for s in range(0, 4, 2):  # alternate between two videos: all causal state is in the streams
        outs_a.append(da.push(za[:, :, s : s + 2]))
        outs_b.append(db.push(zb[:, :, s : s + 2]))
    torch.testing.assert_close(torch.cat(outs_a, 2), want_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(outs_b, 2), want_b, rtol=0, atol=1e-5)
    assert isinstance(da.cache, list) and len(da.cache) == vae.decoder.num_slots
    assert all(isinstance(t, torch.Tensor) for t in da.cache)
    assert not list(vae.buffers())


def test_failed_push_leaves_stream_state_unchanged(vae, monkeypatch):
    z = torch.randn(1, TINY_VAE.z_dim, 4, 2, 3)
    want = vae.decode(z, clamp=False)
    dec = vae.stream_decoder(clamp=False)
    first = dec.push(z[:, :, :2])
    before = list(dec.cache)
    head = vae.decoder.head[2]
    monkeypatch.setattr(head, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        dec.push(z[:, :, 2:])  # fails after most layers already updated their cache slots
    monkeypatch.undo()
    assert all(a is b for a, b in zip(dec.cache, before)) and dec.latent_frames == 2
    torch.testing.assert_close(torch.cat([first, dec.push(z[:, :, 2:])], 2), want, rtol=0, atol=1e-5)


def test_upsample_conv_equals_interpolate_then_conv():
    from self_forcing.sf_model.vae.layers import upsample2x_conv3x3

    torch.manual_seed(5)
    for n, c, co, h, w in [(3, 8, 4, 5, 7), (2, 6, 3, 1, 1)]:
        x = torch.randn(n, c, h, w)
        weight, bias = torch.randn(co, c, 3, 3), torch.randn(co)
        want = torch.nn.functional.conv2d(
            torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest-exact"), weight, bias, padding=1
        )
        got = upsample2x_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_chunk_option_and_clamp(vae):
    z = torch.randn(1, TINY_VAE.z_dim, 5, 2, 3) * 3
    raw = vae.decode(z, clamp=False)
    torch.testing.assert_close(vae.decode(z, chunk=2, clamp=False), raw, rtol=0, atol=1e-5)
    clamped = vae.decode(z)
    assert clamped.min() >= -1 and clamped.max() <= 1
    torch.testing.assert_close(clamped, raw.clamp(-1, 1))


def test_stream_decoder_reset_and_shape_check(vae):
    z = torch.randn(1, TINY_VAE.z_dim, 3, 2, 3)
    dec = vae.stream_decoder(clamp=False)
    first = dec.push(z)
    assert dec.latent_frames == 3 and first.shape[2] == 9
    assert dec.push(z).shape[2] == 12  # a continuation: 4 frames per latent
    with pytest.raises(ValueError, match="reset"):
        dec.push(torch.randn(1, TINY_VAE.z_dim, 1, 4, 3))
    dec.reset()
    torch.testing.assert_close(dec.push(z), first, rtol=0, atol=0)  # fresh stream, same output
    with pytest.raises(ValueError, match="latents must be"):
        dec.push(torch.randn(1, TINY_VAE.z_dim + 1, 1, 2, 3))
    with pytest.raises(ValueError, match="no frames"):
        dec.push(torch.randn(1, TINY_VAE.z_dim, 0, 2, 3))


def test_streamed_encode_equals_whole(vae):
    torch.manual_seed(2)
    x = torch.rand(1, 3, 1 + 4 * 5, 24, 16) * 2 - 1
    whole = vae.encode(x)
    assert whole.shape == (1, TINY_VAE.z_dim, 6, 3, 2)
    enc = vae.stream_encoder()
    outs = [enc.push(x[:, :, :5]), enc.push(x[:, :, 5:9]), enc.push(x[:, :, 9:21])]
    assert [o.shape[2] for o in outs] == [2, 1, 3]
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.encode(x, chunk=1), whole, rtol=0, atol=1e-5)
    # trailing frames that do not fill a group of 4 are ignored, as in Wan
    torch.testing.assert_close(vae.encode(torch.cat([x, x[:, :, :3]], 2)), whole, rtol=0, atol=0)


def test_stream_encoder_rejects_misaligned_chunks(vae):
    enc = vae.stream_encoder()
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        enc.push(torch.zeros(1, 3, 4, 16, 16))
    enc.push(torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.push(torch.zeros(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.stream_encoder().push(torch.zeros(1, 3, 1, 12, 16))


def test_bf16_runs_close_to_fp32(vae, tmp_path):
    path = tmp_path / "v.safetensors"
    save_vae(path, vae)
    low = load_vae(path, device="cpu", dtype=torch.bfloat16)
    z = torch.randn(1, TINY_VAE.z_dim, 3, 2, 3)
    ref = vae.decode(z, clamp=False)
    out = low.decode(z, clamp=False)
    assert out.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


# --------------------------------------------------------------------------------------------
# parity with diffusers (same random weights, converted by our loader)
# --------------------------------------------------------------------------------------------
def tiny_diffusers(cfg: WanVAEConfig, seed: int) -> AutoencoderKLWan:
    d = AutoencoderKLWan(
        base_dim=cfg.dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    )
    randomize_(d, seed)
    with torch.no_grad():  # keep decoded pixels inside [-1, 1] so diffusers' clamp hides nothing
        d.decoder.conv_out.weight.mul_(0.2)
    return d.eval()


@pytest.mark.parametrize("cfg", [TINY_VAE, WanVAEConfig(dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=2)])
def test_matches_diffusers(cfg, tmp_path):
    ref = tiny_diffusers(cfg, seed=3)
    path = tmp_path / "diffusers_layout.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_vae(path)
    assert ours.config == cfg

    torch.manual_seed(4)
    z = torch.randn(1, cfg.z_dim, 5, 3, 2)
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == want.shape == (1, 3, 17, 24, 16)
    assert want.abs().max() < 1  # clamping inactive: the comparison covers the raw output
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    x = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean
    got = ours.encode(x)
    assert got.shape == want.shape == (2, cfg.z_dim, 3, 2, 3)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_real_size_names_and_shapes_match_diffusers():
    with torch.device("meta"):
        ref = AutoencoderKLWan()  # diffusers' defaults are the Wan2.1 VAE
        ours = WanVAE(WAN21_VAE)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in wan_to_diffusers(ours.state_dict(), WAN21_VAE).items()}
    assert got == want
    assert infer_vae_config(ours.state_dict()) == WAN21_VAE
    assert ours.config.temporal_factor == 4 and ours.config.spatial_factor == 8


# --------------------------------------------------------------------------------------------
# loader layouts
# --------------------------------------------------------------------------------------------
def test_layouts_round_trip(vae, tmp_path):
    sd = vae.state_dict()
    files = {
        "ours.safetensors": lambda p: save_vae(p, vae),
        "diffusers.safetensors": lambda p: save_vae(p, vae, layout="diffusers"),
        "orig.pth": lambda p: torch.save(sd, p),
        "wrapped.pt": lambda p: torch.save({"state_dict": sd}, p),
        "diffusers.pth": lambda p: torch.save(wan_to_diffusers(sd, vae.config), p),
        "prefixed.safetensors": lambda p: save_file({"vae." + k: v.contiguous() for k, v in sd.items()}, str(p)),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        loaded = load_vae(path)
        assert loaded.config == vae.config, name
        got = loaded.state_dict()
        assert set(got) == set(sd), name
        for k in sd:
            assert torch.equal(got[k], sd[k]), (name, k)


def test_loader_dtype_device_and_other_config(tmp_path):
    cfg = WanVAEConfig(dim=4, z_dim=2, dim_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, False))
    model = randomize_(WanVAE(cfg), seed=5)
    path = tmp_path / "odd.safetensors"
    save_vae(path, model)
    loaded = load_vae(path, device="cpu", dtype=torch.float64)
    assert loaded.config == cfg and cfg.temporal_factor == 2 and cfg.spatial_factor == 4
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in loaded.parameters())
    z = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64)
    assert loaded.decode(z).shape == (1, 3, 5, 8, 8)


# --------------------------------------------------------------------------------------------
# loader errors
# --------------------------------------------------------------------------------------------
def test_truncated_files_are_reported(vae, tmp_path):
    good = tmp_path / "good.safetensors"
    save_vae(good, vae)
    data = good.read_bytes()
    for cut in (len(data) // 2, 40):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(VAECheckpointError, match="truncated or corrupt"):
            load_vae(bad)
    pth = tmp_path / "good.pth"
    torch.save(vae.state_dict(), pth)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(VAECheckpointError, match="truncated or corrupt"):
        load_vae(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(VAECheckpointError, match="empty"):
        load_vae(empty)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.safetensors")


def test_key_and_shape_mismatches_are_listed(vae, tmp_path):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["decoder.head.2.weight"] = torch.zeros(3, 5, 3, 3, 3)  # wrong shape (8 input channels expected)
    sd["decoder.extra.weight"] = torch.zeros(1)
    del sd["decoder.middle.1.proj.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(VAECheckpointError) as info:
        load_vae(path)
    msg = str(info.value)
    assert "1 missing keys: decoder.middle.1.proj.bias" in msg
    assert "1 unexpected keys: decoder.extra.weight" in msg
    assert "1 shape conflicts: decoder.head.2.weight: file (3, 5, 3, 3, 3) vs model (3, 8, 3, 3, 3)" in msg
    assert isinstance(info.value, ValueError)


def test_long_key_lists_are_truncated(vae, tmp_path):
    sd = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.upsamples")}
    path = tmp_path / "nodecoder.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(VAECheckpointError, match=r"missing keys: .*\(\+\d+ more\)") as info:
        load_vae(path)
    n_missing = len(vae.state_dict()) - len(sd)
    assert f"{n_missing} missing keys" in str(info.value)


def test_non_vae_files_are_refused(tmp_path):
    dit = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(VAECheckpointError, match="not a Wan2.1 VAE.*diffusion-model"):
        load_vae(dit)
    wan22 = tmp_path / "wan22.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(160, 12, 3, 3, 3), "conv2.weight": torch.zeros(48, 48, 1, 1, 1)}, str(wan22))
    with pytest.raises(VAECheckpointError, match="Wan2.2"):
        load_vae(wan22)
    notatensor = tmp_path / "list.pt"
    torch.save([1, 2, 3], notatensor)
    with pytest.raises(VAECheckpointError, match="not a state dict"):
        load_vae(notatensor)
    text = tmp_path / "readme.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(VAECheckpointError, match="truncated or corrupt"):
        load_vae(text)


class _Evil:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"encoder.conv1.weight": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(VAECheckpointError, match="refused to load"):
        load_vae(path)
    assert not marker.exists()


def test_a_dit_training_checkpoint_is_named_as_such(tmp_path):
    from self_forcing.sf_model.vae import VAECheckpointError, load_vae

    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": {"model.patch_embedding.weight": torch.zeros(2, 16, 1, 2, 2)}}, path)
    with pytest.raises(VAECheckpointError, match="training checkpoint .* not a Wan2.1 VAE"):
        load_vae(path)
