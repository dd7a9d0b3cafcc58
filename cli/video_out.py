"""Where ``self-forcing generate`` puts its frames: an mp4/GIF file, a growing fragmented mp4, raw RGB bytes.

Every writer takes uint8 frames ``[T, H, W, 3]`` (a tensor or an array) chunk by chunk through
``write(frames)`` and is a context manager. ``FragmentedMP4Writer`` and ``RawWriter`` put each chunk into
their target (a path, a FIFO or a binary stream such as stdout) and flush it before returning, so a reader
sees the chunk at once.

A regular file is never written under its final name: it grows as ``<name>.part`` in the same folder and
is renamed over ``<name>`` only when the writer exits without an error, so an interrupted run leaves any
previous file of that name intact (and removes its ``.part`` when it can). FIFOs, character devices and
streams are written directly. No folder is ever created.
"""

from __future__ import annotations

import os
import stat
from fractions import Fraction

import numpy as np

from . import fmp4

STDOUT = "-"
MAX_FPS = 1000  # far above any video; the mp4 timescale (1000 x fps) must fit 32 bits


def as_frames(frames) -> np.ndarray:
    """uint8 [T, H, W, 3], C-contiguous (rows top to bottom, pixels left to right, R G B)."""
    arr = frames.cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _require_av():
    try:
        import av
    except ImportError as e:
        raise ValueError("writing mp4 needs PyAV: pip install av (or use --raw, or write a .gif with --out x.gif)") \
            from e
    return av


PART_SUFFIX = ".part"


def staged(path: str) -> bool:
    """True for a path written as ``<path>.part`` then renamed: a regular file or a new name (not a FIFO or
    a device such as /dev/stdout)."""
    return not os.path.exists(path) or stat.S_ISREG(os.stat(path).st_mode)


def part_path(path: str) -> str:
    return os.fspath(path) + PART_SUFFIX


def _check_target(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name (or '-' for stdout)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: the folder {folder} does not exist (no folder is created; make it "
                         "first or pick another path)")


def _finish(path: str, ok: bool) -> None:
    """Rename the complete ``.part`` over ``path`` (ok) or remove it (an error stopped the writer)."""
    part = part_path(path)
    if ok:
        os.replace(part, path)
        return
    try:
        os.remove(part)
    except OSError:
        pass


def _completes(exc_type) -> bool:
    """Whether a writer left with this exception keeps its file: none, or the reader of another output (a
    pipe) went away -- the run then stops cleanly with what was made."""
    return exc_type is None or issubclass(exc_type, BrokenPipeError)


def _cannot_write(path: str, error: OSError) -> ValueError:
    return ValueError(f"cannot write {path}: {error.strerror or error}")


class VideoWriter:
    """Append frames to a regular mp4 (PyAV, H.264; readable once closed) or a GIF (Pillow, written at the end)."""

    def __init__(self, path: str, fps: int, crf: int = 18):
        self.path, self.fps, self.crf = path, int(fps), int(crf)
        self.kind = "gif" if path.lower().endswith(".gif") else "mp4"
        self.container = self.stream = None
        self.gif_frames = []

    def __enter__(self):
        _check_target(self.path)
        self.staged = staged(self.path)
        self.target = part_path(self.path) if self.staged else self.path
        try:  # fail here, not at the first frame (PyAV opens its file lazily)
            open(self.target, "wb").close()
            if self.kind == "mp4":
                self.container = _require_av().open(self.target, mode="w", format="mp4")
        except OSError as e:
            if self.staged:
                _finish(self.path, False)
            raise _cannot_write(self.path, e) from None
        return self

    def write(self, frames) -> None:
        arr = as_frames(frames)
        if self.kind == "gif":
            from PIL import Image

            self.gif_frames += [Image.fromarray(a) for a in arr]
            return
        import av

        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.height, self.stream.width = arr.shape[1], arr.shape[2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf)}
        for a in arr:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                self.container.mux(packet)

    def __exit__(self, exc_type, *exc):
        ok = _completes(exc_type)
        try:
            if self.kind == "gif":
                if self.gif_frames and ok:
                    try:
                        self.gif_frames[0].save(self.target, format="GIF", save_all=True,
                                                append_images=self.gif_frames[1:], duration=round(1000 / self.fps),
                                                loop=0)
                    except OSError as e:
                        raise _cannot_write(self.path, e) from None
                ok = ok and bool(self.gif_frames)
                return False
            if self.container is not None:
                try:
                    if self.stream is not None and ok:
                        for packet in self.stream.encode():
                            self.container.mux(packet)
                finally:
                    self.container.close()
            ok = ok and self.container is not None
        except BaseException:
            ok = False
            raise
        finally:
            if self.staged:
                _finish(self.path, ok)
        return False


class _Target:
    """A binary output: a path (file or FIFO, opened on enter) or an already open binary stream."""

    def __init__(self, target):
        self.target = target
        self.fh = None
        self.failed = False  # a write raised (e.g. the reader of a pipe went away): do not flush again
        self.owned = isinstance(target, (str, os.PathLike))
        self.staged = False  # written as <path>.part, renamed on a clean close

    @property
    def name(self) -> str:
        return os.fspath(self.target) if self.owned else getattr(self.target, "name", "<stream>")

    def open(self):
        if self.owned:
            path = os.fspath(self.target)
            _check_target(path)
            self.staged = staged(path)
            try:
                self.fh = open(part_path(path) if self.staged else path, "wb")  # a FIFO blocks here for a reader
            except OSError as e:
                raise _cannot_write(path, e) from None
        else:
            self.fh = self.target
        return self.fh

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
            self.fh.flush()
        except OSError:
            self.failed = True
            raise

    def close(self, ok: bool = True) -> None:
        """Close (an owned file) or flush (a stream); a staged file is renamed into place when ``ok`` and
        nothing failed, else removed."""
        fh, self.fh = self.fh, None
        if fh is None:
            return
        try:
            if self.owned:
                fh.close()
            elif not self.failed:
                fh.flush()
        except OSError:
            ok = False
            if not self.failed:
                raise
        finally:
            if self.staged:
                _finish(os.fspath(self.target), ok and not self.failed)


class RawWriter:
    """Raw video: rgb24 frames back to back, no header -- width*height*3 bytes per frame."""

    def __init__(self, target):
        self.out = _Target(target)
        self.frames = 0
        self.bytes = 0

    def __enter__(self):
        self.out.open()
        return self

    def write(self, frames) -> None:
        arr = as_frames(frames)
        self.out.write(arr.tobytes())
        self.frames += arr.shape[0]
        self.bytes += arr.nbytes

    def __exit__(self, exc_type, *exc):
        self.out.close(ok=_completes(exc_type))
        return False


class FragmentedMP4Writer:
    """H.264 in a fragmented mp4 that grows by one fragment per ``write`` (flushed at once).

    The init segment (``ftyp``/``moov``) is written on enter, so a player can open the file before the
    first frame exists. Every chunk starts with an IDR frame, so every fragment decodes on its own; the
    encoder runs without look-ahead or B-frames (x264 ``tune=zerolatency``), so each frame's packet comes
    out as the frame goes in and a chunk's fragment holds exactly that chunk's frames.
    """

    def __init__(self, target, width: int, height: int, fps: int, crf: int = 18):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        if not 1 <= int(fps) <= MAX_FPS:
            raise ValueError(f"the frame rate must be 1..{MAX_FPS} fps, got {fps}")
        self.out = _Target(target)
        self.width, self.height, self.fps, self.crf = int(width), int(height), int(fps), int(crf)
        self.timescale = 1000 * self.fps  # a 32-bit field of the mp4 boxes
        self.codec = None
        self.frames_in = 0
        self.decode_time = 0
        self.fragments = 0
        self.pending: list[fmp4.Sample] = []

    def _open_codec(self):
        av = _require_av()
        try:
            cc = av.CodecContext.create("libx264", "w")
        except Exception as e:  # noqa: BLE001 - PyAV raises several types for a missing codec
            raise ValueError(f"this PyAV build has no libx264 encoder ({e}); install the PyPI wheel of av") from e
        cc.width, cc.height, cc.pix_fmt = self.width, self.height, "yuv420p"
        cc.time_base, cc.framerate = Fraction(1, self.fps), Fraction(self.fps)
        cc.gop_size = 1 << 20  # keyframes only where a chunk starts (forced below)
        cc.max_b_frames = 0
        cc.flags |= av.codec.context.Flags.global_header  # SPS/PPS go to extradata -> avcC
        cc.options = {"crf": str(self.crf), "tune": "zerolatency", "forced-idr": "1"}
        cc.open()
        return cc

    def __enter__(self):
        self.codec = self._open_codec()
        self.out.open()
        try:
            avcc = fmp4.avcc_record(self.codec.extradata)
            self.out.write(fmp4.init_segment(self.width, self.height, self.timescale, avcc))
        except BaseException:
            self.out.close(ok=False)
            raise
        return self

    def _collect(self, packets) -> None:
        for p in packets:
            if p.pts is not None and p.dts is not None and p.pts != p.dts:
                raise ValueError("the H.264 encoder reordered frames (B-frames); cannot stream them")
            self.pending.append(fmp4.Sample(fmp4.length_prefixed(bytes(p)), 1000, bool(p.is_keyframe)))

    def _flush_fragment(self) -> None:
        if not self.pending:
            return
        self.fragments += 1
        self.out.write(fmp4.fragment(self.fragments, self.decode_time, self.pending))
        self.decode_time += sum(s.duration for s in self.pending)
        self.pending = []

    def write(self, frames) -> None:
        import av

        arr = as_frames(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {arr.shape[2]}x{arr.shape[1]} but the stream was opened at "
                             f"{self.width}x{self.height}")
        for i, a in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv420p")
            frame.pts = self.frames_in
            frame.time_base = Fraction(1, self.fps)
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I
            self.frames_in += 1
            self._collect(self.codec.encode(frame))
        self._flush_fragment()

    def __exit__(self, exc_type, *exc):
        ok = _completes(exc_type)
        try:
            if self.codec is not None and not self.out.failed and ok:
                self._collect(self.codec.encode(None))  # nothing is held back with zerolatency; to be sure
                self._flush_fragment()
        except BaseException:
            ok = False
            raise
        finally:
            self.codec = None
            self.out.close(ok=ok)
        return False
