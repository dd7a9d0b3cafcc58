"""The FP8 K/V cache as a user opt-in: ``self-forcing generate --kv-fp8`` streams what the core sampler makes with
``StreamOptions(kv_fp8=True)`` (close to the exact video, not equal to it), and the combinations StreamOptions
refuses come back as clean CLI errors naming the flag; the 'Long-Video Options' node's optional ``kv_fp8`` input
reaches the same StreamOptions (old prompts without it still validate)."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from self_forcing.cli import main
from self_forcing.cli.generate import DEFAULT_PROMPT, default_model_path
from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.pipeline import frames_to_uint8
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.toy.bundle import encode_prompt, latents_to_video

SIZE = 64  # the toy model's frames are 64x64


@pytest.fixture(scope="module")
def toy():
    return load_model(default_model_path(), dtype=torch.float32)


def toy_options(meta, **over) -> StreamOptions:
    """StreamOptions as ``self-forcing generate`` builds them for the bundled toy model (``--window auto``)."""
    return StreamOptions(frames_per_block=meta["frames_per_block"], steps=meta["steps"], shift=meta["shift"],
                         warp=meta["warp"], context_noise=meta["context_noise"], partial_last_chunk=True, **over)


def core_frames(loaded, num_frames: int, seed: int, opts: StreamOptions) -> np.ndarray:
    """The uint8 frames the CLI writes for these options: latents from the core sampler, decoded per chunk."""
    h, w = loaded.meta["toy"]["latent_size"]
    lat = generate(loaded.model, encode_prompt(loaded, DEFAULT_PROMPT, "cpu"), num_frames=num_frames, height=h,
                   width=w, seed=seed, options=opts)
    fpb = opts.frames_per_block
    return torch.cat([frames_to_uint8(latents_to_video(loaded, lat[:, :, s:s + fpb]))[0]
                      for s in range(0, num_frames, fpb)]).numpy()


def raw_frames(path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, SIZE, SIZE, 3)


def test_kv_fp8_streams_the_core_fp8_video_close_to_the_exact_one(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--frames", "6", "--seed", "0", "--raw", "exact.rgb", "--no-progress"]) == 0
    assert main(["generate", "--frames", "6", "--seed", "0", "--raw", "fp8.rgb", "--no-progress", "--kv-fp8"]) == 0
    assert "FP8 K/V cache" in capsys.readouterr().err  # the run's description says so
    exact, fp8 = raw_frames(tmp_path / "exact.rgb"), raw_frames(tmp_path / "fp8.rgb")
    assert exact.shape == fp8.shape == (6, SIZE, SIZE, 3)
    # the flag reaches the sampler: the frames are the core's with kv_fp8=True, bit for bit
    opts = toy_options(toy.meta)
    assert np.array_equal(fp8, core_frames(toy, 6, 0, dataclasses.replace(opts, kv_fp8=True)))
    assert np.array_equal(exact, core_frames(toy, 6, 0, opts))
    # less exact, but close: measured mean |diff| 0.41 of 255 here (0.08-0.54 over seeds 0-2, 6 and 9 frames;
    # the black background differs nowhere), against 3.35 for the exact video of another seed
    diff = np.abs(fp8.astype(float) - exact).mean()
    assert not np.array_equal(fp8, exact)
    assert 0 < diff < 1.0
    other = core_frames(toy, 6, 1, opts)
    assert np.abs(other.astype(float) - exact).mean() > 4 * diff


@pytest.mark.parametrize("argv, message", [
    # StreamOptions refuses the FP8 cache with rebased positions and a sink: reported before any frame
    (["--window", "6", "--sink", "3", "--positions", "rebased"],
     "--kv-fp8: the FP8 K/V cache (kv_fp8) does not support rebased positions with a sink; drop --kv-fp8"),
    # the sampler refuses a KV re-cache prompt switch with a sink when the stream starts
    (["--frames", "9", "--window", "3", "--sink", "3", "--prompt-at",
      "6:recache:a green triangle bouncing on a navy background"], "kv_fp8"),
])
def test_kv_fp8_with_what_it_cannot_do_is_a_clean_error(argv, message, toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--no-progress", "--kv-fp8", "--out", "v.mp4", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert os.listdir(tmp_path) == []  # nothing written, no .part left behind
    # the same run without the flag is fine (the refusal is --kv-fp8's)
    assert main(["generate", "--no-progress", "--raw", "ok.rgb", *argv]) == 0


# -- the nodes: 'Long-Video Options' kv_fp8 (optional, off by default) -----------------------------------------
@pytest.fixture(scope="module")
def toy_handle():
    from self_forcing.nodes import toy as toy_nodes
    from self_forcing.nodes.model import load_handle

    cpu = torch.device("cpu")
    return load_handle(toy_nodes.toy_model_path(toy_nodes.TOY_MODELS[0]), toy_nodes.TOY_MODELS[0], dtype="fp32",
                       attention="sdpa", load_device=cpu, offload_device=cpu, keep_loaded=True, supports_bf16=False)


def test_options_node_kv_fp8_reaches_the_sampler(toy_handle):
    from self_forcing.nodes.long_video import OPTIONS, LongVideoOptions
    from self_forcing.nodes.sampling import sample_video
    from self_forcing.nodes.toy import TOY_PROMPT, encode_toy_prompt

    spec = OPTIONS.input("kv_fp8")
    assert spec.type == "BOOLEAN" and spec.default is False and spec.optional
    cond = encode_toy_prompt(toy_handle, TOY_PROMPT)

    def run(kv_fp8: bool) -> torch.Tensor:
        options = LongVideoOptions(cache="rolling", window=6, sink=0, routing_topk=0, kv_fp8=kv_fp8).check()
        return sample_video(toy_handle, cond, width=64, height=64, length=9, seed=5, long_video=options)

    fp8, exact = run(True), run(False)
    ctx = encode_prompt(toy_handle.loaded, TOY_PROMPT, "cpu")
    opts = toy_options(toy_handle.meta, window=6, extend_positions=True)
    core = generate(toy_handle.model, ctx, num_frames=9, height=32, width=32, seed=5,
                    options=dataclasses.replace(opts, kv_fp8=True))
    assert torch.equal(fp8, core)  # the node's video is the core sampler's with kv_fp8=True, bit for bit
    assert torch.equal(exact, generate(toy_handle.model, ctx, num_frames=9, height=32, width=32, seed=5,
                                       options=opts))
    assert not torch.equal(fp8, exact)
    rel = ((fp8 - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.7  # measured 0.32 (docs/benchmarks.md: 0.28 mean over the toy benchmark's videos)


def test_options_node_kv_fp8_is_optional_and_refusals_name_it(toy_handle):
    from self_forcing.nodes.long_video import NODE_NAME, OPTIONS, LongVideoOptions
    from self_forcing.nodes.sampling import sample_video
    from self_forcing.nodes.schema import check_inputs
    from self_forcing.nodes.toy import TOY_PROMPT, encode_toy_prompt

    # an API prompt saved before the input existed still validates (and gets the exact cache)
    assert check_inputs(OPTIONS, cache="rolling", window=21, sink=3, routing_topk=0, positions="absolute") is True
    assert LongVideoOptions().kv_fp8 is False
    cond = encode_toy_prompt(toy_handle, TOY_PROMPT)
    for options, what in ((LongVideoOptions(window=6, sink=0, routing_topk=3, kv_fp8=True), "routing"),
                          (LongVideoOptions(window=6, sink=3, positions="rebased", kv_fp8=True), "rebased")):
        with pytest.raises(ValueError) as err:
            sample_video(toy_handle, cond, width=64, height=64, length=9, seed=0, long_video=options.check())
        assert NODE_NAME in str(err.value) and "kv_fp8" in str(err.value) and what in str(err.value)
