"""Reliability of ``self-forcing generate`` against bad inputs: every test here failed on the code before its fix."""

import time

import pytest

from self_forcing.cli import main

pytest.importorskip("av")


def generate(*args):
    return main(["generate", "--no-progress", *map(str, args)])


# -- item 2: a window or sink the video cannot use costs nothing ------------------------------------------
def test_a_huge_window_and_sink_run_like_the_video_length(tmp_path, capsys):
    rc = generate("--frames", 3, "--window", 100000, "--sink", 1000000, "--out", tmp_path / "x.mp4")
    err = capsys.readouterr().err
    assert rc == 0, err  # was: a raw allocator traceback asking for 105 GB (window) + 1 PB (sink)
    assert (tmp_path / "x.mp4").stat().st_size > 0


# -- item 4: a checkpoint with NaN weights is refused, not turned into a black video ----------------------
def test_a_toy_checkpoint_with_nan_weights_exits_2_naming_the_tensor(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from self_forcing.cli.generate import default_model_path

    with safe_open(default_model_path(), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.head.weight"] = tensors["head.head.weight"].clone()
    tensors["head.head.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan_toy.safetensors", metadata=meta)
    out = tmp_path / "x.mp4"
    rc = generate("--model", tmp_path / "nan_toy.safetensors", "--frames", 3, "--out", out)
    err = capsys.readouterr().err
    assert rc == 2 and "tensor 'head.head.weight' holds NaN or Inf" in err, err
    assert not out.exists()


# -- item 5: a size that cannot fit is refused before anything is allocated --------------------------------
def test_a_frame_size_that_cannot_fit_exits_2_quickly_without_allocating(tmp_path):
    import subprocess
    import sys

    script = ("import resource, sys\n"
              "from self_forcing.cli import main\n"
              "rc = main(sys.argv[1:])\n"
              "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
              "sys.exit(rc)\n")
    out = tmp_path / "x.mp4"
    proc = subprocess.run([sys.executable, "-c", script, "generate", "--no-progress", "--width", "100000",
                           "--height", "100000", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "this request needs ~" in lines[0] and "GB on cpu, which has" in lines[0] \
        and "lower the size/length/window" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    peak_kb = int(proc.stderr.split("peak_rss_kb")[1].split()[0])
    assert peak_kb < 2 * 1024 ** 2  # torch itself and the toy file, nothing sized by the request


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- item 16: nothing is created outside what was asked for -------------------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--raw"])
def test_an_output_in_a_missing_folder_is_refused_and_no_folder_is_created(tmp_path, capsys, flag):
    target = tmp_path / "missing" / "deeper" / ("x.mp4" if flag == "--out" else "x.rgb")
    rc = generate("--frames", 3, flag, target)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "does not exist" in line and str(tmp_path / "missing" / "deeper") in line
    assert list(tmp_path.iterdir()) == []


# -- item 3: an interrupted run never damages the file it would replace -------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_sigterm_midway_leaves_the_previous_file_intact_and_no_partial_file(tmp_path, stream):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "video.mp4"
    out.write_bytes(b"a previous video that must survive")
    cmd = [sys.executable, "-m", "self_forcing.cli", "generate", "--frames", "600", "--out", str(out),
           "--no-progress"] + (["--stream"] if stream else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stderr:  # the job line comes right before the writers open
            if " on cpu" in line:
                break
        time.sleep(1.5)  # a few chunks into the video
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.read_bytes() == b"a previous video that must survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"], rest  # no .part left behind
    assert rc == 128 + signal.SIGTERM and "terminated" in rest


def test_a_finished_run_replaces_the_previous_file(tmp_path, capsys):
    import os

    out = tmp_path / "video.mp4"
    out.write_bytes(b"old")
    assert generate("--frames", 3, "--out", out) == 0, capsys.readouterr().err
    assert out.read_bytes()[4:8] == b"ftyp" and sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask


# -- item 11: bad inputs give one clear line and exit 2, not a traceback ------------------------------------
@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    import torch

    from self_forcing.sf_model.checkpoint import save_model
    from self_forcing.sf_model.config import WanConfig
    from self_forcing.sf_model.model import CausalWanModel
    from self_forcing.sf_model.vae.checkpoint import save_vae
    from self_forcing.sf_model.vae.model import WanVAE, WanVAEConfig

    root = tmp_path_factory.mktemp("wan")
    cfg = WanConfig(dim=128, ffn_dim=128, num_heads=1, num_layers=1, text_dim=32, freq_dim=32)
    torch.manual_seed(0)
    save_model(root / "dit.safetensors", CausalWanModel(cfg), cfg)
    save_vae(root / "vae.safetensors", WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)))
    good = b'{"context":{"dtype":"F32","shape":[1,2,32],"data_offsets":[0,256]}}'
    (root / "corrupt.safetensors").write_bytes(len(good).to_bytes(8, "little") + good + b"\0" * 40)  # truncated
    return root


def test_a_corrupt_embeddings_file_is_one_error_line(tiny_wan, tmp_path, capsys):
    rc = generate("--model", tiny_wan / "dit.safetensors", "--vae", tiny_wan / "vae.safetensors",
                  "--embeds", tiny_wan / "corrupt.safetensors", "--width", 32, "--height", 32, "--frames", 3,
                  "--out", tmp_path / "x.mp4")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "corrupt.safetensors cannot be read" in line


def test_an_unwritable_output_is_one_error_line(tmp_path, capsys):
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    target = folder / "x.mp4"
    try:
        open(folder / "probe", "wb").close()  # root ignores the mode bits: use a folder no one can write
        target = "/sys/self_forcing_test.mp4"
        if not os.path.isdir("/sys") or os.path.exists(target):
            pytest.skip("no unwritable folder available")
        try:
            open(target, "wb").close()
            os.remove(target)
            pytest.skip("no unwritable folder available")
        except OSError:
            pass
    except OSError:
        pass
    rc = generate("--frames", 3, "--out", target)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(target) in line and ("not writable" in line or "cannot write" in line)
    folder.chmod(0o755)


def test_device_meta_is_one_error_line(tmp_path, capsys):
    rc = generate("--frames", 3, "--device", "meta", "--out", tmp_path / "x.mp4")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--device meta" in line and not (tmp_path / "x.mp4").exists()


def test_a_huge_stream_frame_rate_is_one_error_line_and_leaves_no_file(tmp_path, capsys):
    rc = generate("--frames", 3, "--stream", "--fps", 100000000, "--out", tmp_path / "x.mp4")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--fps must be in 1..1000" in line
    assert list(tmp_path.iterdir()) == []


# -- item 12: prompts go through the toy tokenizer's one rule ----------------------------------------------
@pytest.mark.parametrize("prompt, message", [("", "prompt 0 is empty"), (" , . ", "prompt 0 is empty"),
                                             ("a dog", "unknown word 'dog'")])
def test_an_empty_prompt_or_an_unknown_word_is_one_error_line(tmp_path, capsys, prompt, message):
    rc = generate("--frames", 3, "--prompt", prompt, "--out", tmp_path / "x.mp4")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and message in line and list(tmp_path.iterdir()) == []
