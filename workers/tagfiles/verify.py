"""Proving that a tag write left the audio unchanged: stream parameters, decoded head packets, audio bytes.

Used by ``workers.tagfiles.safewrite`` on every clone before it replaces the
original; per format, the audio bytes outside the tag regions are compared
(MP3 frames, FLAC frames, IFF chunks, Ogg pages without their comment header).
"""
from __future__ import annotations

import mmap
import os
import zlib
from dataclasses import dataclass

import av
import numpy as np

from workers.audio.frames import frame_array
from workers.audio.formats import format_for_path
from workers.tagfiles.errors import TagWriteError

# Declared durations may be re-estimated from the file size for headerless
# VBR MP3s; the byte comparison is the exact check, this one is a sanity net.
DURATION_TOLERANCE_S = 0.05
DURATION_TOLERANCE_RATIO = 0.001

# How many packets of the copy are decoded and compared with the original's:
# enough to prove that the decoder still opens and accepts the stream.
HEAD_PACKETS = 8
_PROBE_SIZE = 65536
_COMPARE_BLOCK = 1 << 20


def verify_same_audio(original: str, copy: str, fmt: str | None = None) -> str:
    """Prove the copy carries the original's audio unchanged; return the method.

    Always: the declared stream parameters match (codec, sample rate,
    channels, duration within tolerance, read as ``decode.probe`` reads
    them) and the first ``HEAD_PACKETS`` packets of both decode to identical
    samples (the copy still opens and decodes): about 1 ms for both files.
    Then the audio itself, exactly:

    * ``bytes`` (MP3, FLAC, WAV, AIFF): the tag writer moves the audio as
      one block, so the bytes after the ID3v2 tag (MP3, including an ID3v1
      tail), STREAMINFO plus everything after the metadata blocks (FLAC), or
      every RIFF/IFF chunk except the ID3 chunk (WAV/AIFF) must be equal.
      A straight memcmp at page-cache speed: ~1 ms per 2.5 MB.
    * ``ogg pages`` (Ogg Vorbis, Opus): mutagen rewrites the comment pages
      and renumbers every later page, so each audio page must equal its
      counterpart in everything but sequence number and CRC, and the copy's
      numbering and CRCs must be valid. ~3 ms for a 4-minute file.
    * ``packets`` (M4A AAC/ALAC, and chained or multiplexed Ogg): rewriting
      MP4 tags moves chunk offsets, so the demuxed packets (payload bytes and
      timestamps) and codec extradata are compared through FFmpeg. About
      5 µs per packet pair: ~55 ms for a 4-minute AAC file, ~25 ms for ALAC.
    """
    fmt = fmt or format_for_path(original)
    _compare_heads(original, copy)
    if fmt in _BYTE_REGIONS:
        _compare_regions(original, copy, _BYTE_REGIONS[fmt])
        return "bytes"
    if fmt in _OGG_HEADER_PACKETS:
        try:
            _compare_ogg(original, copy, fmt)
            return "ogg pages"
        except _NotSimpleOgg:
            pass
    _compare_packets(original, copy)
    return "packets"


def _mismatch(what: str) -> TagWriteError:
    return TagWriteError(f"verification failed: {what}", stage="verify")


@dataclass(frozen=True)
class _StreamHead:
    """What the container declares about the audio, and its first samples."""

    codec: str
    sample_rate: int
    channels: int
    duration: float | None
    frames: list[np.ndarray]


def _read_head(path: str) -> _StreamHead:
    """Open once: declared stream parameters plus the first decoded frames.

    ``probesize`` is capped because FFmpeg otherwise reads up to 5 MB of a
    WAV's PCM just to "probe" it (20 ms a file); every format here declares
    its parameters in its headers. Both files are opened the same way, so
    what is compared is like for like.
    """
    try:
        with av.open(path, options={"probesize": str(_PROBE_SIZE)}) as container:
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            frames = []
            for i, packet in enumerate(container.demux(stream)):
                if i >= HEAD_PACKETS:
                    break
                frames.extend(frame_array(frame) for frame in packet.decode())
            return _StreamHead(ctx.name, int(ctx.sample_rate or 0), int(ctx.channels or 0),
                               _declared_duration(container, stream), frames)
    except (av.error.FFmpegError, IndexError) as exc:
        raise _mismatch(f"cannot open or decode {os.path.basename(path)}: {exc}") from exc


def _declared_duration(container, stream) -> float | None:
    """Seconds the file claims (the stream's own, else the container's), as
    ``workers.audio.decode.probe`` reports it."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _compare_heads(original: str, copy: str) -> None:
    """Same codec, rate, channels; durations within tolerance; same first samples."""
    a, b = _read_head(original), _read_head(copy)
    for name in ("codec", "sample_rate", "channels"):
        if getattr(a, name) != getattr(b, name):
            raise _mismatch(f"{name} changed from {getattr(a, name)} to {getattr(b, name)}")
    if (a.duration is None) != (b.duration is None):
        raise _mismatch("the declared duration appeared or vanished")
    if a.duration is not None:
        tolerance = max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_RATIO * a.duration)
        if abs(a.duration - b.duration) > tolerance:
            raise _mismatch(f"duration changed from {a.duration:.3f} s to {b.duration:.3f} s")
    if not b.frames:
        raise _mismatch("the copy's audio does not decode")
    if len(a.frames) != len(b.frames) or any(
        x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a.frames, b.frames)
    ):
        raise _mismatch("the copy's first decoded samples differ from the original's")


def _compare_packets(original: str, copy: str) -> None:
    """Demux both files in lockstep; every packet's bytes and timing equal."""
    with av.open(original) as ca, av.open(copy) as cb:
        sa, sb = ca.streams.audio[0], cb.streams.audio[0]
        if sa.codec_context.extradata != sb.codec_context.extradata:
            raise _mismatch("the codec setup data (extradata) changed")
        count = 0
        for pa, pb in _zip_strict(ca.demux(sa), cb.demux(sb)):
            if pa is None or pb is None:
                raise _mismatch(f"the number of audio packets changed (after {count})")
            if (pa.pts, pa.dts, pa.duration) != (pb.pts, pb.dts, pb.duration) or bytes(pa) != bytes(pb):
                raise _mismatch(f"audio packet {count} differs")
            count += 1


def _zip_strict(a, b):
    """Pairs from two iterators; a missing partner shows up as None."""
    sentinel = object()
    a, b = iter(a), iter(b)
    while True:
        x, y = next(a, sentinel), next(b, sentinel)
        if x is sentinel and y is sentinel:
            return
        yield (None if x is sentinel else x), (None if y is sentinel else y)


# Byte regions: each maker lists (name, offset, length) of what must not change.

def _mp3_regions(f) -> list[tuple[str, int, int]]:
    """Everything after the ID3v2 tag (MPEG frames, APE, ID3v1 tail)."""
    size = os.fstat(f.fileno()).st_size
    start = _id3v2_size(f.read(10))
    return [("mpeg audio", start, size - start)]


def _id3v2_size(header: bytes) -> int:
    """Total bytes of an ID3v2 tag from its header (0 if none)."""
    if len(header) < 10 or not header.startswith(b"ID3"):
        return 0
    body = 0
    for b in header[6:10]:
        body = (body << 7) | (b & 0x7F)
    footer = 10 if header[5] & 0x10 else 0
    return 10 + body + footer


def _flac_regions(f) -> list[tuple[str, int, int]]:
    """STREAMINFO (block 0) and every byte after the last metadata block."""
    size = os.fstat(f.fileno()).st_size
    offset = _id3v2_size(f.read(10))
    f.seek(offset)
    if f.read(4) != b"fLaC":
        raise _mismatch("not a FLAC stream")
    offset += 4
    regions = []
    while True:
        f.seek(offset)
        header = f.read(4)
        if len(header) < 4:
            raise _mismatch("FLAC metadata runs past the end of the file")
        kind, length = header[0] & 0x7F, int.from_bytes(header[1:4], "big")
        if kind == 0:
            regions.append(("streaminfo", offset + 4, length))
        offset += 4 + length
        if header[0] & 0x80:
            break
    regions.append(("flac frames", offset, size - offset))
    return regions


def _iff_regions(f, little_endian: bool) -> list[tuple[str, int, int]]:
    """Every top-level chunk of a RIFF (WAV) or FORM (AIFF) file but the ID3 one."""
    size = os.fstat(f.fileno()).st_size
    if f.read(12)[:4] not in (b"RIFF", b"FORM"):
        raise _mismatch("not a RIFF/IFF file")
    regions = [("form type", 8, 4)]
    offset = 12
    order = "little" if little_endian else "big"
    while offset + 8 <= size:
        f.seek(offset)
        chunk = f.read(8)
        chunk_id, length = chunk[:4], int.from_bytes(chunk[4:8], order)
        length = min(length, size - offset - 8)
        if chunk_id.strip().upper() != b"ID3":
            regions.append((chunk_id.decode("latin-1"), offset + 8, length))
        offset += 8 + length + (length & 1)
    return regions


_BYTE_REGIONS = {
    "mp3": _mp3_regions,
    "flac": _flac_regions,
    "wav": lambda f: _iff_regions(f, little_endian=True),
    "aiff": lambda f: _iff_regions(f, little_endian=False),
}


# Ogg: mutagen rewrites the comment header pages and renumbers every page
# after them (new sequence number and CRC); everything else in an audio page
# (flags, granule position, serial, lacing, payload) must stay as it was.

_OGG_HEADER_PACKETS = {"ogg": 3, "opus": 2}   # Vorbis: id, comment, setup; Opus: head, tags
_BITSWAP = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


class _NotSimpleOgg(Exception):
    """A chained or multiplexed Ogg file: compare packets instead."""


def _ogg_pages(data) -> list[tuple[int, int, int]]:
    """(start, end, completed packets so far) for every page of one logical stream."""
    pages, pos, packets, serial = [], 0, 0, None
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS" or pos + 27 > len(data):
            raise _mismatch(f"broken Ogg page at byte {pos}")
        nsegs = data[pos + 26]
        lacing = data[pos + 27:pos + 27 + nsegs]
        end = pos + 27 + nsegs + sum(lacing)
        if end > len(data):
            raise _mismatch(f"Ogg page at byte {pos} runs past the end of the file")
        page_serial = data[pos + 14:pos + 18]
        if serial is None:
            serial = page_serial
        elif page_serial != serial or data[pos + 5] & 0x02:
            raise _NotSimpleOgg()
        packets += sum(1 for n in lacing if n < 255)
        pages.append((pos, end, packets))
        pos = end
    return pages


def _ogg_audio_pages(data, header_packets: int) -> list[tuple[int, int]]:
    """The pages after the one that completes the codec's header packets."""
    pages = _ogg_pages(data)
    for i, (_, _, packets) in enumerate(pages):
        if packets >= header_packets:
            return [(start, end) for start, end, _ in pages[i + 1:]]
    raise _mismatch("the Ogg headers never end")


def _ogg_page_ok(data, start: int, end: int) -> bool:
    """Check one page's CRC (Ogg's CRC-32 is zlib's on bit-reversed bytes)."""
    page = bytes(data[start:end])
    stored = page[22:26]
    body = (page[:22] + b"\0\0\0\0" + page[26:]).translate(_BITSWAP)
    crc = (~zlib.crc32(body, 0xFFFFFFFF)) & 0xFFFFFFFF
    return crc.to_bytes(4, "big").translate(_BITSWAP) == stored


def _compare_ogg(original: str, copy: str, fmt: str) -> None:
    """Audio pages equal but for sequence number and CRC; the copy's pages valid.

    The copy's sequence numbers must run without gaps and every CRC must
    hold, or demuxers would drop pages as damaged. Raises _NotSimpleOgg for
    chained or multiplexed files.
    """
    with open(original, "rb") as fa, open(copy, "rb") as fb, \
            mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as a, \
            mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as b:
        count = _OGG_HEADER_PACKETS[fmt]
        pages_a, pages_b = _ogg_audio_pages(a, count), _ogg_audio_pages(b, count)
        if len(pages_a) != len(pages_b):
            raise _mismatch(f"the number of audio pages changed ({len(pages_a)} -> {len(pages_b)})")
        for n, ((sa, ea), (sb, eb)) in enumerate(zip(pages_a, pages_b)):
            if a[sa + 4:sa + 18] != b[sb + 4:sb + 18] or a[sa + 26:ea] != b[sb + 26:eb]:
                raise _mismatch(f"audio page {n} differs")
        sequence = None
        for start, end, _ in _ogg_pages(b):
            number = int.from_bytes(b[start + 18:start + 22], "little")
            if sequence is not None and number != sequence + 1:
                raise _mismatch(f"the copy's Ogg page numbers jump at byte {start}")
            sequence = number
            if not _ogg_page_ok(b, start, end):
                raise _mismatch(f"the copy's Ogg page at byte {start} has a bad checksum")


def _compare_regions(original: str, copy: str, regions_of) -> None:
    """The listed regions of both files hold the same bytes, in order."""
    with open(original, "rb") as fa, open(copy, "rb") as fb:
        ra, rb = regions_of(fa), regions_of(fb)
        if [(n, l) for n, _, l in ra] != [(n, l) for n, _, l in rb]:
            raise _mismatch(f"the audio layout changed: {[(n, l) for n, _, l in ra]} -> {[(n, l) for n, _, l in rb]}")
        for (name, off_a, length), (_, off_b, _) in zip(ra, rb):
            if not _same_bytes(fa, off_a, fb, off_b, length):
                raise _mismatch(f"the {name} bytes differ")


def _same_bytes(fa, off_a: int, fb, off_b: int, length: int) -> bool:
    """Compare ``length`` bytes at two offsets, a block at a time."""
    fa.seek(off_a)
    fb.seek(off_b)
    while length > 0:
        n = min(_COMPARE_BLOCK, length)
        if fa.read(n) != fb.read(n):
            return False
        length -= n
    return True
