"""Reliability of ``self-forcing generate`` against bad inputs: every test here failed on the code before its fix."""

import time

import pytest

from self_forcing.cli import main

pytest.importorskip("av")


def generate(*args):
    return main(["generate", "--no-progress", *map(str, args)])


# -- item 2: a window or sink the video cannot use costs nothing ------------------------------------------
def test_a_huge_window_and_sink_run_like_the_video_length(tmp_path, capsys):
    start = time.monotonic()
    rc = generate("--frames", 3, "--window", 100000, "--sink", 1000000, "--out", tmp_path / "x.mp4")
    err = capsys.readouterr().err
    assert rc == 0, err  # was: a raw allocator traceback asking for 105 GB (window) + 1 PB (sink)
    assert time.monotonic() - start < 60 and (tmp_path / "x.mp4").stat().st_size > 0
