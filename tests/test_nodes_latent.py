"""Wan 2.1 LATENT format conversion (ComfyUI raw latents <-> model space) and the cheap chunk preview."""

import pytest
import torch

from self_forcing.sf_model.latent_format import (WAN21_MEAN, WAN21_STD, latent_to_rgb, preview_strip, to_model_space,
                                                 to_raw)


def test_round_trips_in_both_directions():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 16, 5, 6, 8, generator=g) * 3 + 1
    model = torch.randn(1, 16, 3, 4, 4, generator=g)
    assert torch.allclose(to_raw(to_model_space(raw)), raw, atol=1e-5)
    assert torch.allclose(to_model_space(to_raw(model)), model, atol=1e-5)


def test_matches_the_published_wan21_statistics_per_channel():
    raw = torch.zeros(1, 16, 1, 2, 2)
    for c in range(16):
        raw[:, c] = WAN21_MEAN[c] + 2 * WAN21_STD[c]  # two standard deviations above the channel mean
    ms = to_model_space(raw)
    assert torch.allclose(ms, torch.full_like(ms, 2.0), atol=1e-5)
    back = to_raw(torch.zeros(1, 16, 1, 1, 1))[0, :, 0, 0, 0]
    assert torch.allclose(back, torch.tensor(WAN21_MEAN), atol=1e-6)


def test_dtypes_and_shapes():
    raw = torch.randn(1, 16, 2, 4, 4, dtype=torch.float16)
    assert to_model_space(raw).dtype == torch.float32
    assert to_model_space(raw, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert to_raw(to_model_space(raw)).shape == raw.shape
    with pytest.raises(ValueError, match="VAEEncode"):
        to_model_space(torch.randn(1, 4, 2, 4, 4))  # an SD latent, not Wan
    with pytest.raises(ValueError):
        to_raw(torch.randn(16, 2, 4, 4))


def test_preview_is_a_uint8_strip_of_the_chunk():
    lat = torch.zeros(2, 16, 3, 4, 5)
    lat[0, :, 2] = 3.0  # the last frame of batch item 0 differs
    strip = preview_strip(lat, max_frames=3, scale=2)
    assert strip.dtype == torch.uint8 and strip.shape == (8, 30, 3)
    last = preview_strip(lat, max_frames=1, scale=1)
    assert last.shape == (4, 5, 3)
    assert torch.equal(last, strip[::2, 20::2])  # n = 1 shows the chunk's newest frame
    assert not torch.equal(last, strip[::2, :10:2])
    rgb = latent_to_rgb(torch.randn(1, 16, 2, 3, 3) * 10)
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.shape == (1, 2, 3, 3, 3)
