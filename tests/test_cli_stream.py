"""`self-forcing generate` with the bundled toy model: --stream grows a fragmented mp4 one chunk at a time
(readable while the next chunks are still being generated), --raw writes the exact uint8 frames, stdout
carries only video when asked to, and bad argument combinations are refused with clear errors."""

import io
import os
import threading

import numpy as np
import pytest
import torch

from self_forcing.cli import main
from self_forcing.cli.fmp4 import top_level_boxes
from self_forcing.cli.generate import default_model_path
from self_forcing.cli.video_out import FragmentedMP4Writer, RawWriter
from self_forcing.sf_model import sampler as sampler_module
from self_forcing.sf_model.checkpoint import load_model

av = pytest.importorskip("av")

SIZE = 64  # the toy model's frames are 64x64
FRAME_BYTES = SIZE * SIZE * 3


@pytest.fixture(scope="module")
def toy():
    return load_model(default_model_path(), dtype=torch.float32)


def decode(source) -> np.ndarray:
    with av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB; H.264 at crf 18 gives about 40 here, other frames of the same video about 25."""
    return float(10 * np.log10(255 ** 2 / max(((a.astype(float) - b) ** 2).mean(), 1e-12)))


def kinds(data: bytes) -> list[bytes]:
    return [k for k, _, _ in top_level_boxes(data)]


def test_stream_file_is_playable_while_it_grows_and_raw_stdout_is_exact(cli_frames, toy, tmp_path, monkeypatch,
                                                                        capsysbinary):
    out = tmp_path / "live.mp4"
    denoised = []
    real_denoise = sampler_module.denoise_chunk

    def counting_denoise(*args, **kwargs):
        denoised.append(1)
        return real_denoise(*args, **kwargs)

    seen = []  # what a reader finds in the file right after each chunk was written
    real_write = FragmentedMP4Writer.write

    def spying_write(self, frames):
        real_write(self, frames)
        data = (tmp_path / "live.mp4.part").read_bytes()  # it grows as .part, renamed when complete
        assert not out.exists()
        seen.append((len(denoised), kinds(data), decode(io.BytesIO(data))))

    monkeypatch.setattr(sampler_module, "denoise_chunk", counting_denoise)
    monkeypatch.setattr(FragmentedMP4Writer, "write", spying_write)
    rc = main(["generate", "--frames", "7", "--seed", "2", "--stream", "--out", str(out), "--raw", "-",
               "--no-progress"])
    captured = capsysbinary.readouterr()
    assert rc == 0, captured.err.decode()

    # raw stdout: exactly the quantised frames of the decoded latents, nothing else on stdout
    ref = cli_frames(toy, 7, seed=2)
    assert ref.shape == (7, SIZE, SIZE, 3)
    assert len(captured.out) == 7 * FRAME_BYTES
    raw = np.frombuffer(captured.out, np.uint8).reshape(7, SIZE, SIZE, 3)
    assert np.array_equal(raw, ref)
    err = captured.err.decode()
    assert "rgb24 64x64, 12288 bytes per frame, 7 frames at 8 fps" in err and "-video_size 64x64" in err

    # after the first chunk only one block had been denoised, and the file already held that chunk
    blocks, boxes, frames = seen[0]
    assert blocks == 1
    assert boxes == [b"ftyp", b"moov", b"moof", b"mdat"]
    assert frames.shape == (3, SIZE, SIZE, 3)
    assert psnr(frames, ref[:3]) > 35 > psnr(frames, ref[3:6])  # the first chunk, H.264-compressed
    # one fragment per chunk (3 + 3 + 1 frames), each readable as soon as written
    assert [s[0] for s in seen] == [1, 2, 3]
    assert [len(s[2]) for s in seen] == [3, 6, 7]
    final = out.read_bytes()
    assert kinds(final) == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * 3
    whole = decode(str(out))
    assert whole.shape == (7, SIZE, SIZE, 3)
    assert np.array_equal(whole[:3], frames)  # the growing file's frames are the final file's frames
    assert psnr(whole, ref) > 35


def test_fragmented_mp4_to_stdout_and_raw_to_a_fifo(cli_frames, toy, tmp_path, monkeypatch, capsysbinary):
    monkeypatch.chdir(tmp_path)
    fifo = tmp_path / "frames.fifo"
    os.mkfifo(fifo)
    received = bytearray()

    def reader():
        with open(fifo, "rb") as fh:
            while chunk := fh.read(4096):
                received.extend(chunk)

    real_denoise = sampler_module.denoise_chunk

    def chatty_denoise(*args, **kwargs):  # a library that prints while stdout carries the video
        print("chatter from a library")
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "denoise_chunk", chatty_denoise)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rc = main(["generate", "--frames", "6", "--seed", "1", "--stream", "--out", "-", "--raw", str(fifo)])
    thread.join(timeout=60)
    captured = capsysbinary.readouterr()
    assert rc == 0, captured.err.decode()
    ref = cli_frames(toy, 6, seed=1)
    assert bytes(received) == ref.tobytes()
    assert kinds(captured.out) == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * 2
    assert psnr(decode(io.BytesIO(captured.out)), ref) > 35
    assert b"wrote stdout and raw" in captured.err and b"FIFO" in captured.err
    assert captured.err.count(b"chatter from a library") == 2 and b"generating" in captured.err  # progress bar
    assert os.listdir(tmp_path) == ["frames.fifo"]  # no default mp4 beside it


def test_a_reader_that_goes_away_stops_generation_cleanly(tmp_path, monkeypatch, capsysbinary):
    fifo, out = tmp_path / "frames.fifo", tmp_path / "kept.mp4"
    os.mkfifo(fifo)
    closed = threading.Event()

    def reader():  # takes the first chunk (3 frames), then closes its end of the pipe
        with open(fifo, "rb") as fh:
            got = b""
            while len(got) < 3 * FRAME_BYTES:
                got += fh.read(3 * FRAME_BYTES - len(got))
        closed.set()

    real_write = RawWriter.write

    def write_after_reader_left(self, frames):
        if self.frames:
            assert closed.wait(60)
        real_write(self, frames)

    monkeypatch.setattr(RawWriter, "write", write_after_reader_left)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rc = main(["generate", "--frames", "9", "--raw", str(fifo), "--stream", "--out", str(out), "--no-progress"])
    thread.join(timeout=60)
    err = capsysbinary.readouterr().err.decode()
    assert rc == 0 and "the reader closed the output after 3 frames; stopped" in err
    assert kinds(out.read_bytes()) == [b"ftyp", b"moov", b"moof", b"mdat"]  # the mp4 keeps what was made
    assert decode(str(out)).shape == (3, SIZE, SIZE, 3)


def test_raw_only_writes_no_mp4_and_regular_mp4_is_unchanged(cli_frames, toy, tmp_path, monkeypatch,
                                                              capsysbinary):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--frames", "3", "--raw", "frames.rgb", "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["frames.rgb"]
    ref = cli_frames(toy, 3, seed=0)
    assert (tmp_path / "frames.rgb").read_bytes() == ref.tobytes()
    # without --stream the mp4 is a regular one (moov after the data), as before
    assert main(["generate", "--frames", "3", "--out", "plain.mp4", "--no-progress"]) == 0
    data = (tmp_path / "plain.mp4").read_bytes()
    assert b"moof" not in kinds(data) and b"moov" in kinds(data)
    assert decode(str(tmp_path / "plain.mp4")).shape == (3, SIZE, SIZE, 3)
    assert capsysbinary.readouterr().out == b""


@pytest.mark.parametrize("argv, message", [
    (["--out", "-"], "add --stream"),
    (["--stream", "--out", "-", "--raw", "-"], "both want stdout"),
    (["--stream", "--out", "x.gif"], "must end in .mp4"),
    (["--out", "same.mp4", "--raw", "same.mp4"], "same file"),
    (["--raw", ""], "--raw is empty"),
    (["--frames", "0"], "--frames"),
    (["--crf", "60"], "--crf"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "toaster"], "not a device"),
])
def test_bad_output_arguments_fail_before_loading(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("self_forcing.sf_model.checkpoint.load_model",
                        lambda *a, **k: pytest.fail("the model was loaded despite bad arguments"))
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--embeds", "e.safetensors"], "--embeds/--vae are for Wan checkpoints"),
    (["--width", "66"], "multiples of 4"),
])
def test_bad_toy_arguments(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
