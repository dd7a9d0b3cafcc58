"""Fragmented MP4 (ISO BMFF) for one H.264 video track, written one fragment at a time.

Layout of a file: an init segment (``ftyp`` + ``moov`` with an empty sample table and ``mvex``), then one
``moof`` + ``mdat`` pair per fragment. Every fragment is self-contained (sample offsets are relative to its
``moof``, its start time is in ``tfdt``), so a player can open the file while it grows and a pipe reader
can decode it as it arrives.

Why not ffmpeg's mp4 muxer with ``movflags=frag_keyframe+empty_moov+default_base_moof``: it closes a
fragment only when the next keyframe arrives (or on ``av_write_frame(ctx, NULL)``, which PyAV does not
expose), so a chunk's frames would reach the file only once the following chunk exists. Here a fragment is
written the moment its samples are known; PyAV only encodes.

The H.264 stream comes from libx264 as Annex B (start codes); MP4 stores length-prefixed NAL units and the
parameter sets (SPS/PPS) in the sample entry's ``avcC`` record. Both conversions are here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_MATRIX = struct.pack(">9i", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
_NAL_SPS, _NAL_PPS, _NAL_AUD = 7, 8, 9
_HIGH_PROFILES = (100, 110, 122, 144)  # avcC carries chroma format and bit depths for these
_SYNC_SAMPLE = 0x02000000       # sample_depends_on = 2 (an IDR frame)
_NON_SYNC_SAMPLE = 0x01010000   # sample_depends_on = 1, sample_is_non_sync_sample = 1


@dataclass(frozen=True)
class Sample:
    data: bytes       # one access unit, length-prefixed NAL units
    duration: int     # in the track's timescale
    keyframe: bool


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


# -- H.264 byte formats -----------------------------------------------------------------------------
def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes 00 00 01 / 00 00 00 01 removed)."""
    units, pos, n = [], -1, len(data)
    i = data.find(b"\x00\x00\x01")
    while i != -1:
        if pos >= 0:
            units.append(data[pos:i])
        pos = i + 3
        i = data.find(b"\x00\x00\x01", pos)
    if pos >= 0:
        units.append(data[pos:n])
    # a 4-byte start code leaves its leading zero on the previous unit; NAL units never end in 0x00
    return [u.rstrip(b"\x00") for u in units if u.rstrip(b"\x00")]


def is_annexb(data: bytes) -> bool:
    return data.startswith(b"\x00\x00\x01") or data.startswith(b"\x00\x00\x00\x01")


def length_prefixed(data: bytes) -> bytes:
    """One access unit as MP4 sample data: 4-byte big-endian lengths, no parameter sets or delimiters."""
    if not is_annexb(data):
        return data  # already length-prefixed
    units = [u for u in split_annexb(data) if u[0] & 0x1F not in (_NAL_SPS, _NAL_PPS, _NAL_AUD)]
    return b"".join(struct.pack(">I", len(u)) + u for u in units)


def avcc_record(extradata: bytes) -> bytes:
    """The AVCDecoderConfigurationRecord from encoder extradata (Annex B SPS/PPS, or already avcC).

    Assumes 8-bit 4:2:0 for the High-profile extension fields (the only format written here).
    """
    if extradata[:1] == b"\x01":
        return bytes(extradata)
    units = split_annexb(bytes(extradata))
    sps = [u for u in units if u[0] & 0x1F == _NAL_SPS]
    pps = [u for u in units if u[0] & 0x1F == _NAL_PPS]
    if not sps or not pps:
        raise ValueError("the H.264 encoder gave no SPS/PPS in its global header; cannot write an mp4 track")
    profile, compat, level = sps[0][1], sps[0][2], sps[0][3]
    out = bytearray([1, profile, compat, level, 0xFF, 0xE0 | len(sps)])
    for u in sps:
        out += struct.pack(">H", len(u)) + u
    out.append(len(pps))
    for u in pps:
        out += struct.pack(">H", len(u)) + u
    if profile in _HIGH_PROFILES:
        out += bytes([0xFC | 1, 0xF8 | 0, 0xF8 | 0, 0])  # 4:2:0, 8-bit luma and chroma, no SPS extensions
    return bytes(out)


# -- segments ------------------------------------------------------------------------------------
def init_segment(width: int, height: int, timescale: int, avcc: bytes, track_id: int = 1) -> bytes:
    """``ftyp`` + ``moov`` for one avc1 video track whose samples all live in fragments."""
    ftyp = box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso5", b"iso6", b"avc1", b"mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, timescale, 0), struct.pack(">iH", 0x00010000, 0x0100),
                    bytes(10), _MATRIX, bytes(24), struct.pack(">I", track_id + 1))
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX, struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # language 'und'
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"vide", bytes(12), b"VideoHandler\x00")
    vmhd = full_box(b"vmhd", 0, 1, bytes(8))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    name = b"self-forcing"
    avc1 = box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", width, height),
               struct.pack(">III", 0x00480000, 0x00480000, 0), struct.pack(">H", 1),
               bytes([len(name)]) + name + bytes(31 - len(name)), struct.pack(">Hh", 0x0018, -1), box(b"avcC", avcc))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
               full_box(b"stts", 0, 0, struct.pack(">I", 0)), full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)), full_box(b"stco", 0, 0, struct.pack(">I", 0)))
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", vmhd, dinf, stbl)))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", track_id, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


def fragment(sequence: int, base_time: int, samples: list[Sample], track_id: int = 1) -> bytes:
    """One ``moof`` + ``mdat``: ``samples`` starting at decode time ``base_time`` (timescale units)."""
    if not samples:
        raise ValueError("a fragment needs at least one sample")
    mfhd = full_box(b"mfhd", 0, 0, struct.pack(">I", sequence))
    tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id))  # default-base-is-moof
    tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time))
    rows = b"".join(struct.pack(">III", s.duration, len(s.data), _SYNC_SAMPLE if s.keyframe else _NON_SYNC_SAMPLE)
                    for s in samples)

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(samples), data_offset), rows)
        return box(b"moof", mfhd, box(b"traf", tfhd, tfdt, trun))

    head = moof(0)
    head = moof(len(head) + 8)  # the data starts right after the mdat header
    return head + box(b"mdat", *(s.data for s in samples))


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of the top-level boxes of a (possibly partial) file; a cut box is left out."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size < 8 or pos + size > len(data):
            break
        out.append((kind, pos, size))
        pos += size
    return out
