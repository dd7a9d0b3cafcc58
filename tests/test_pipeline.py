"""Streaming video: sampler + streaming VAE decode == generate, then decode the whole video."""

import torch

from self_forcing.sf_model.latent_format import to_raw
from self_forcing.sf_model.pipeline import frames_to_uint8, stream_video
from self_forcing.sf_model.sampler import generate
from self_forcing.sf_model.vae import WanVAE, WanVAEConfig


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return vae.eval()


def test_streamed_frames_equal_decoding_the_whole_video(tiny_model):
    vae = tiny_vae()
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    chunks = list(stream_video(tiny_model, vae, ctx, num_frames=9, height=4, width=6, seed=3, as_uint8=False))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.start_frame for c in chunks] == [0, 9, 21]  # 1 + 4*2 frames, then 12 per chunk
    streamed = torch.cat([c.frames for c in chunks], 2)
    latents = generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=3)
    with torch.no_grad():
        whole = vae.decode(to_raw(latents))
    assert streamed.shape == whole.shape == (1, 3, 33, 32, 48)
    assert torch.allclose(streamed, whole, atol=1e-5)
    u8 = list(stream_video(tiny_model, vae, ctx, num_frames=9, height=4, width=6, seed=3))
    got, ref = torch.cat([c.frames for c in u8], 1), frames_to_uint8(whole)
    assert got.dtype == torch.uint8 and got.shape == (1, 33, 32, 48, 3)
    assert (got.int() - ref.int()).abs().max() <= 1  # float noise may flip a rounding


def test_prefix_continues_the_decoder_seamlessly(tiny_model):
    vae = tiny_vae()
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    prefix = torch.randn(1, 16, 3, 4, 6)
    chunks = list(stream_video(tiny_model, vae, ctx, num_frames=3, height=4, width=6, seed=1, prefix=prefix,
                               as_uint8=False))
    new = generate(tiny_model, ctx, num_frames=3, height=4, width=6, seed=1, prefix=prefix)
    with torch.no_grad():
        whole = vae.decode(to_raw(torch.cat([prefix, new], 2)))
    assert chunks[0].start_frame == 9
    assert torch.allclose(chunks[0].frames, whole[:, :, 9:], atol=1e-5)


def test_cpu_chunks_are_handed_out_at_once_and_prefix_pixels_on_request(tiny_model):
    vae = tiny_vae()
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    gen = stream_video(tiny_model, vae, ctx, num_frames=6, height=4, width=6, seed=0)
    first = next(gen)
    assert first.index == 0 and first.ready is None  # no look-ahead without a side stream
    assert gen.gi_frame.f_locals["pending"] is None
    gen.close()
    prefix = torch.randn(1, 16, 2, 4, 6)
    chunks = list(stream_video(tiny_model, vae, ctx, num_frames=3, height=4, width=6, seed=0, prefix=prefix,
                               include_prefix=True, as_uint8=False))
    assert [c.index for c in chunks] == [-1, 0]
    with torch.no_grad():
        assert torch.allclose(chunks[0].frames, vae.decode(to_raw(prefix)), atol=1e-5)
    assert chunks[1].start_frame == chunks[0].frames.shape[2] == 5
