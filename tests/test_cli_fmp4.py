"""The fragmented-mp4 writer: H.264 byte-format conversions, box layout, and a stream that decodes after every
fragment, also through a pipe that cannot seek."""

import io
import struct

import numpy as np
import pytest

from self_forcing.cli import fmp4
from self_forcing.cli.video_out import FragmentedMP4Writer, RawWriter

av = pytest.importorskip("av")

SPS = bytes([0x67, 100, 0, 10, 0xAC, 0xB2])
PPS = bytes([0x68, 0xEB, 0xC0])
IDR = bytes([0x65, 0x88, 0x82, 0x01])
SEI = bytes([0x06, 0x05, 0xFF, 0x80])


def test_annexb_units_and_length_prefixed_samples():
    stream = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01" + bytes([0x09, 0xF0]) \
        + b"\x00\x00\x01" + SEI + b"\x00\x00\x00\x01" + IDR
    assert fmp4.split_annexb(stream) == [SPS, PPS, bytes([0x09, 0xF0]), SEI, IDR]
    # parameter sets and access-unit delimiters leave the samples (they live in avcC)
    assert fmp4.length_prefixed(stream) == struct.pack(">I", len(SEI)) + SEI + struct.pack(">I", len(IDR)) + IDR
    already = struct.pack(">I", len(IDR)) + IDR
    assert fmp4.length_prefixed(already) == already


def test_avcc_record_from_annexb_extradata():
    rec = fmp4.avcc_record(b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS)
    assert rec[:6] == bytes([1, 100, 0, 10, 0xFF, 0xE1])  # version, profile, compat, level, 4-byte lengths, 1 SPS
    assert rec[6:8] == struct.pack(">H", len(SPS)) and rec[8:8 + len(SPS)] == SPS
    pos = 8 + len(SPS)
    assert rec[pos] == 1 and rec[pos + 1:pos + 3] == struct.pack(">H", len(PPS))
    assert rec[pos + 3:pos + 3 + len(PPS)] == PPS
    assert rec[pos + 3 + len(PPS):] == bytes([0xFD, 0xF8, 0xF8, 0])  # High profile: 4:2:0, 8 bit
    assert fmp4.avcc_record(rec) == rec
    with pytest.raises(ValueError, match="SPS/PPS"):
        fmp4.avcc_record(b"\x00\x00\x01" + SEI)


def test_fragment_offsets_point_at_the_samples():
    samples = [fmp4.Sample(b"a" * 5, 1000, True), fmp4.Sample(b"bc" * 3, 1000, False)]
    data = fmp4.fragment(7, 3000, samples)
    (moof, _, moof_size), (mdat, mdat_at, mdat_size) = fmp4.top_level_boxes(data)
    assert (moof, mdat) == (b"moof", b"mdat") and mdat_at == moof_size and mdat_size == 8 + 11
    assert data[mdat_at + 8:] == b"aaaaabcbcbc"
    mfhd = data.index(b"mfhd")
    assert struct.unpack(">I", data[mfhd + 8:mfhd + 12]) == (7,)
    tfdt = data.index(b"tfdt")
    assert struct.unpack(">Q", data[tfdt + 8:tfdt + 16]) == (3000,)
    trun = data.index(b"trun")
    count, offset = struct.unpack(">Ii", data[trun + 8:trun + 16])
    rows = [struct.unpack(">III", data[trun + 16 + 12 * i:trun + 28 + 12 * i]) for i in range(count)]
    assert count == 2 and offset == moof_size + 8  # relative to the moof (default-base-is-moof)
    assert rows == [(1000, 5, 0x02000000), (1000, 6, 0x01010000)]
    with pytest.raises(ValueError):
        fmp4.fragment(1, 0, [])


class Pipe(io.RawIOBase):
    """A write-only, non-seekable byte sink that records what was readable after every write call."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.data += b
        return len(b)


def chunk(color, frames=3, h=32, w=48):
    arr = np.zeros((frames, h, w, 3), np.uint8)
    arr[..., :] = color
    arr[:, 8:24, 8:24] = 255 - np.asarray(color, np.uint8)
    return arr


def decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(bytes(data))) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_writer_adds_one_decodable_fragment_per_chunk_through_a_pipe():
    pipe = Pipe()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    with FragmentedMP4Writer(pipe, 48, 32, fps=8) as w:
        assert [k for k, _, _ in fmp4.top_level_boxes(bytes(pipe.data))] == [b"ftyp", b"moov"]
        for i, color in enumerate(colors):
            w.write(chunk(color, frames=2 + i))
            kinds = [k for k, _, _ in fmp4.top_level_boxes(bytes(pipe.data))]
            assert kinds == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * (i + 1)
            frames = decoded(pipe.data)
            assert len(frames) == sum(range(2, 3 + i))
            err = [np.abs(frames[-1].astype(int) - chunk(c, 1)[0]).mean() for c in colors]
            assert err[i] < 8 and min(e for j, e in enumerate(err) if j != i) > 50  # the newest chunk is there
    assert len(decoded(pipe.data)) == 2 + 3 + 4
    with av.open(io.BytesIO(bytes(pipe.data))) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 8 and (stream.width, stream.height) == (48, 32)
        assert [f.time for f in c.decode(video=0)] == [i / 8 for i in range(9)]


def test_writer_refuses_odd_sizes_and_frames_of_another_size():
    with pytest.raises(ValueError, match="even frame size"):
        FragmentedMP4Writer(Pipe(), 47, 32, fps=8)
    with FragmentedMP4Writer(Pipe(), 48, 32, fps=8) as w:
        with pytest.raises(ValueError, match="opened at 48x32"):
            w.write(chunk((0, 0, 0), h=16))
        with pytest.raises(ValueError, match="uint8"):
            w.write(chunk((0, 0, 0)).astype(np.float32))


def test_raw_writer_writes_frames_back_to_back(tmp_path):
    a, b = chunk((1, 2, 3), frames=2), chunk((4, 5, 6), frames=1)
    with RawWriter(str(tmp_path / "x.rgb")) as w:
        w.write(a)
        assert (tmp_path / "x.rgb.part").read_bytes() == a.tobytes()  # flushed per chunk, renamed when complete
        w.write(b)
    assert (tmp_path / "x.rgb").read_bytes() == a.tobytes() + b.tobytes()
    assert not (tmp_path / "x.rgb.part").exists()
    assert w.frames == 3 and w.bytes == 3 * 32 * 48 * 3
