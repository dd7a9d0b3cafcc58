"""The toy-model nodes' logic with the shipped toy bundle: prompts, decoding, the sampler's toy LATENT format."""

from pathlib import Path

import pytest
import torch

from self_forcing.nodes import toy as toy_nodes
from self_forcing.nodes.decode import StreamDecode
from self_forcing.nodes.latent import CODEC_KEY, FORMAT_KEY, TEXT_KEY, TOY, WAN21_SPACE, latent_space
from self_forcing.nodes.model import ModelHandle, load_handle
from self_forcing.nodes.long_video import LongVideoOptions
from self_forcing.nodes.sampling import RunHooks, extend_video, sample_video
from self_forcing.nodes.text import context_from_conditioning
from self_forcing.nodes.toy import (decode_toy_latent, describe_toy, encode_toy_prompt, toy_model_path,
                                    toy_vocabulary)
from self_forcing.sf_model.checkpoint import LoadedModel, load_model
from self_forcing.sf_model.latent_format import to_raw
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.toy.bundle import encode_prompt, is_toy_bundle, latents_to_frames

REPO = Path(__file__).resolve().parent.parent
PROMPT = toy_nodes.TOY_PROMPT
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy():
    return load_handle(toy_model_path(toy_nodes.TOY_MODELS[0]), toy_nodes.TOY_MODELS[0], dtype="fp32", attention="sdpa",
                       load_device=CPU, offload_device=CPU, keep_loaded=True, supports_bf16=False)


def wan_handle(model):
    return ModelHandle(LoadedModel(model, model.config, "test layout", {}), "tiny.safetensors", CPU, CPU,
                       torch.float32)


def cli_options(meta, window):
    """StreamOptions exactly as ``self-forcing generate`` builds them from a toy model's metadata."""
    return StreamOptions(frames_per_block=int(meta["frames_per_block"]), steps=tuple(meta["steps"]),
                         shift=float(meta["shift"]), warp=bool(meta.get("warp", True)),
                         context_noise=float(meta["context_noise"]), window=window, sink=0,
                         extend_positions=window is not None, partial_last_chunk=True)


# -- the shipped checkpoint -------------------------------------------------------------------------------
def test_the_toy_loader_lists_exactly_the_shipped_toy_bundles():
    shipped = sorted(p.name for p in (REPO / "assets").glob("*.safetensors")
                     if is_toy_bundle(load_model(str(p))))
    assert sorted(toy_nodes.TOY_MODELS) == shipped and toy_nodes.TOY_LOADER.input("model_name").default in shipped
    for bad in ("missing.safetensors", "../assets/self_forcing_toy.safetensors"):
        with pytest.raises(ValueError, match="not in the pack's assets folder.*Load Self Forcing Model"):
            toy_model_path(bad)


def test_the_loader_report_names_the_frame_size_and_the_vocabulary(toy):
    text = describe_toy(toy)
    assert "64x64 frames at 8 fps" in text and "12-frame clips" in text and "latent = frame / 2" in text
    vocab = toy_vocabulary(toy)
    assert {"circle", "square", "red", "blue", "bouncing", "background"} <= set(vocab)
    assert not any(w.startswith("<") for w in vocab) and ", ".join(vocab) in text
    assert latent_space(toy).spatial == 2 and latent_space(toy).temporal == 1 and latent_space(toy).is_toy


# -- Toy Text Encode --------------------------------------------------------------------------------------
def test_text_encode_is_the_bundled_encoder_as_a_conditioning(toy):
    cond = encode_toy_prompt(toy, PROMPT)
    assert len(cond) == 1 and cond[0][1][TEXT_KEY].startswith("toy_text:")
    ctx = cond[0][0]
    assert ctx.shape == (1, 16, 4096) and ctx.dtype == torch.float32 and ctx.device.type == "cpu"
    assert torch.equal(ctx, encode_prompt(toy.loaded, PROMPT, device="cpu"))
    # what the sampler reads from it: the same tensor, at the model's text width and length
    assert torch.equal(context_from_conditioning(cond, toy.config.text_dim, toy.config.text_len), ctx)
    # case, commas and full stops do not matter; the words do
    same = encode_toy_prompt(toy, "A red circle, and a blue square bouncing on a black background.")[0][0]
    assert torch.equal(same, ctx)
    assert not torch.equal(encode_toy_prompt(toy, "a green triangle bouncing on a white background")[0][0], ctx)


def test_unknown_words_are_refused_with_the_vocabulary(toy):
    with pytest.raises(ValueError) as err:
        encode_toy_prompt(toy, "a red dog and a blue cat bouncing on a black background")
    msg = str(err.value)
    assert "words 'dog', 'cat'" in msg and ", ".join(toy_vocabulary(toy)) in msg
    with pytest.raises(ValueError, match="the prompt is empty.*Known words: a, and"):
        encode_toy_prompt(toy, " ,. ")
    with pytest.raises(ValueError, match="has 17 words but the toy text encoder reads at most 16"):
        encode_toy_prompt(toy, " ".join(["a red circle and"] * 4) + " a")


# -- Toy Decode -------------------------------------------------------------------------------------------
def test_decode_equals_the_bundle_frames_of_the_same_latents(toy):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 5, 8, 12, generator=g)
    latent = latent_space(toy).wrap(latents)
    assert latent[FORMAT_KEY] == TOY and latent[CODEC_KEY].startswith("toy_codec:")
    images = decode_toy_latent(toy, latent)
    assert images.shape == (10, 16, 24, 3) and images.dtype == torch.float32
    assert torch.equal(images, latents_to_frames(toy.loaded, latents))
    assert torch.equal(images[5:], latents_to_frames(toy.loaded, latents[1:]))  # batch items one after the other
    assert images.min() >= 0 and images.max() <= 1


def test_decode_refuses_latents_it_cannot_decode(toy):
    samples = torch.randn(1, 16, 3, 8, 8)
    with pytest.raises(ValueError, match="not a toy model's latent.*VAE Decode"):
        decode_toy_latent(toy, {"samples": samples})  # a core Wan 2.1 LATENT has no tag
    other = {"samples": samples, FORMAT_KEY: TOY, CODEC_KEY: "toy_codec:0000"}
    with pytest.raises(ValueError, match="another codec"):
        decode_toy_latent(toy, other)
    with pytest.raises(ValueError, match=r"\[batch, 16, frames, height, width\], got \(16, 3, 8, 8\)"):
        decode_toy_latent(toy, latent_space(toy).wrap(samples[0]))


def test_toy_nodes_refuse_a_wan_model(tiny_model):
    wan = wan_handle(tiny_model)
    assert latent_space(wan) == WAN21_SPACE
    for call in (lambda: encode_toy_prompt(wan, PROMPT),
                 lambda: decode_toy_latent(wan, {"samples": torch.zeros(1, 16, 1, 2, 2)})):
        with pytest.raises(ValueError, match="needs a self-contained toy model.*CLIPTextEncode.*VAE Decode"):
            call()


# -- the Stream Sampler with a toy model --------------------------------------------------------------------
def test_sampler_latent_is_the_model_output_unnormalised_and_tagged(toy):
    cond = encode_toy_prompt(toy, PROMPT)
    previews = []
    hooks = RunHooks(progress=lambda done, total, p: previews.append(p) if p is not None else None)
    rolling = LongVideoOptions(cache="rolling", window=6, sink=0, routing_topk=0)
    out = sample_video(toy, cond, width=64, height=64, length=9, seed=5, long_video=rolling, hooks=hooks)
    # 9 video frames = 9 latent frames at 32x32 (no temporal compression, codec stride 2)
    assert out.shape == (1, 16, 9, 32, 32) and out.dtype == torch.float32
    ref = generate(toy.model, encode_prompt(toy.loaded, PROMPT, device="cpu"), num_frames=9, height=32, width=32,
                   seed=5, options=cli_options(toy.meta, window=6))
    assert torch.equal(out, ref)  # what the CLI streams: no Wan 2.1 normalisation in between
    latent = latent_space(toy).wrap(out)
    assert latent[FORMAT_KEY] == TOY and latent_space(toy).unwrap(latent) is out
    frames = decode_toy_latent(toy, latent)
    assert torch.equal(frames, latents_to_frames(toy.loaded, ref)) and frames.shape == (9, 64, 64, 3)
    assert not torch.allclose(frames, latents_to_frames(toy.loaded, to_raw(ref)), atol=0.05)  # Wan path would differ
    # one preview per chunk: the chunk's frames through the codec (exact colours, not the Wan RGB projection)
    assert len(previews) == 3 and previews[0].dtype == torch.uint8 and previews[0].shape == (64, 3 * 64, 3)
    last = (latents_to_frames(toy.loaded, ref[:, :, 6:9]) * 255).round().to(torch.uint8)
    assert torch.equal(previews[-1], torch.cat(list(last), dim=1))


def test_extend_continues_a_toy_latent_in_the_toy_format(toy):
    cond = encode_toy_prompt(toy, PROMPT)
    first = latent_space(toy).wrap(sample_video(toy, cond, width=32, height=32, length=6, seed=1))
    before = first["samples"].clone()
    joined = extend_video(toy, cond, first, extend_frames=4, history_frames=2, resample_strength=0.3, seed=2,
                          output="joined")
    assert joined.shape == (1, 16, 10, 16, 16)  # 4 new video frames = 4 new latent frames
    assert torch.equal(joined[:, :, :6], before) and torch.equal(first["samples"], before)  # input untouched
    resampled = extend_video(toy, cond, first, extend_frames=4, history_frames=2, resample_strength=0.3, seed=2,
                             output="joined, resampled history")
    assert torch.equal(resampled[:, :, :4], before[:, :, :4]) and not torch.equal(resampled[:, :, 4:6], before[:, :, 4:6])
    with pytest.raises(ValueError, match="not a toy model's latent"):
        extend_video(toy, cond, {"samples": before}, extend_frames=4, history_frames=0, resample_strength=0.0, seed=0)


def test_prompts_latents_and_vaes_of_the_other_kind_are_refused(toy, tiny_model):
    wan = wan_handle(tiny_model)
    toy_prompt = encode_toy_prompt(toy, PROMPT)
    plain = [[toy_prompt[0][0].clone(), {"pooled_output": None}]]  # e.g. Load Text Embeddings: no tag
    with pytest.raises(ValueError, match="not made by 'Self Forcing Toy Text Encode'"):
        sample_video(toy, plain, width=32, height=32, length=3, seed=0)
    with pytest.raises(ValueError, match="another toy model's text encoder"):
        sample_video(toy, [[plain[0][0], {TEXT_KEY: "toy_text:0000"}]], width=32, height=32, length=3, seed=0)
    with pytest.raises(ValueError, match="comes from 'Self Forcing Toy Text Encode'.*umT5"):
        sample_video(wan, [[torch.randn(1, 6, wan.config.text_dim), dict(toy_prompt[0][1])]], width=64, height=32,
                     length=5, seed=0)
    toy_latent = latent_space(toy).wrap(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="holds a toy model's codec latents"):
        extend_video(wan, [[torch.randn(1, 6, wan.config.text_dim), {}]], toy_latent, extend_frames=4,
                     history_frames=0, resample_strength=0.0, seed=0)
    with pytest.raises(ValueError, match="decodes with its own bundled codec.*Self Forcing Toy Decode"):
        sample_video(toy, toy_prompt, width=32, height=32, length=3, seed=0, decode=StreamDecode(open_vae=None))


def test_toy_sizes_follow_the_codec_stride_and_any_length(toy):
    cond = encode_toy_prompt(toy, PROMPT)
    assert sample_video(toy, cond, width=8, height=12, length=2, seed=0).shape == (1, 16, 2, 6, 4)
    with pytest.raises(ValueError, match="width 10 is not a multiple of 4; use 8 or 12"):
        sample_video(toy, cond, width=10, height=12, length=2, seed=0)
