"""Build real audio files, good and bad, for tests.

Good files are genuinely encoded (``workers.audio.encode``) so tests exercise
the decoder and tag writers on the bytes real libraries hold. Bad files are
the kinds of damage real libraries contain: empty files, junk with an audio
extension, images renamed to .mp3, downloads cut short, broken ID3 headers,
tags with nothing after them. Every maker returns the ``Path`` it wrote.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from workers.audio.encode import write_audio
from workers.audio.formats import get_format
from workers.audio.synth import synth_clip


def make_file(tmp_path: Path, fmt: str, seconds: float = 1.0, channels: int = 2,
              sample_rate: int = 44100, tags: dict | None = None, seed: int = 0,
              name: str | None = None, samples: np.ndarray | None = None,
              bitrate: int | None = None) -> Path:
    """Encode a music-like clip (or the given ``samples``) as ``fmt``.

    ``name`` defaults to ``<fmt>-<channels>ch-<rate>.<ext>`` so several
    variants can share one ``tmp_path``. ``samples`` overrides the synthesized
    clip, for tests that need a known signal (then ``seconds``, ``channels``
    and ``seed`` are ignored).
    """
    spec = get_format(fmt)
    if samples is None:
        samples = synth_clip(seed, seconds, sample_rate, channels)
    samples = np.atleast_2d(samples)
    path = Path(tmp_path) / (name or f"{fmt}-{samples.shape[0]}ch-{sample_rate}{spec.extension}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, samples, sample_rate, fmt, tags=tags, bitrate=bitrate)
    return path


def tone(seconds: float, sample_rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A plain sine, float32 1-D, for tests that check levels exactly."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --------------------------------------------------------------- bad files

def make_empty(tmp_path: Path, name: str = "empty.mp3") -> Path:
    """A zero-byte file with an audio extension."""
    path = Path(tmp_path) / name
    path.write_bytes(b"")
    return path


def make_random_bytes(tmp_path: Path, name: str = "noise.flac", size: int = 8192, seed: int = 0) -> Path:
    """Random bytes with an audio extension: no format recognises them."""
    path = Path(tmp_path) / name
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def png_bytes(width: int = 4, height: int = 4) -> bytes:
    """A valid RGB PNG, written by hand: signature, IHDR, IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = b"".join(b"\x00" + bytes([200, 40, 40]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def make_image_as_audio(tmp_path: Path, name: str = "cover.mp3") -> Path:
    """A real PNG image saved under an audio extension (a common mix-up)."""
    path = Path(tmp_path) / name
    path.write_bytes(png_bytes())
    return path


def make_truncated(tmp_path: Path, fmt: str, fraction: float = 0.4, seconds: float = 3.0,
                   channels: int = 2, sample_rate: int = 44100, seed: int = 0) -> Path:
    """A good file cut at ``fraction`` of its bytes, like a broken download.

    The full file is written first and then truncated in place, so headers
    still declare the full duration.
    """
    path = make_file(tmp_path, fmt, seconds=seconds, channels=channels, sample_rate=sample_rate,
                     seed=seed, name=f"truncated-{fmt}{get_format(fmt).extension}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def id3_header(size: int, version: int = 4, syncsafe: bool = True) -> bytes:
    """An ID3v2 header declaring ``size`` tag bytes after it.

    ``syncsafe=False`` writes the size as a plain big-endian integer, whose
    bytes can have the high bit set: invalid, as some broken taggers wrote.
    """
    if syncsafe:
        size_bytes = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    else:
        size_bytes = struct.pack(">I", size)
    return b"ID3" + bytes([version, 0, 0]) + size_bytes


def make_corrupt_id3_mp3(tmp_path: Path, seconds: float = 2.0, name: str = "corrupt-id3.mp3") -> Path:
    """An MP3 whose ID3v2 header is broken: wrong size bytes and junk frames.

    The header's size field has the high bit set (not syncsafe) and the
    frames after it are garbage, then real MPEG audio follows.
    """
    audio_path = make_file(tmp_path, "mp3", seconds=seconds, name="_audio-for-corrupt-id3.mp3")
    audio = audio_path.read_bytes()
    audio_path.unlink()
    junk = np.random.default_rng(7).bytes(200)
    path = Path(tmp_path) / name
    path.write_bytes(id3_header(0x0000FF80, syncsafe=False) + b"TIT2\xff\xff\xff\xff\x00\x00" + junk + audio)
    return path


def make_id3_only(tmp_path: Path, name: str = "tag-only.mp3") -> Path:
    """A well-formed ID3v2.4 tag with a title, and no audio after it."""
    text = b"\x03" + "Nothing Follows".encode("utf-8")
    frame = b"TIT2" + bytes((len(text) >> s) & 0x7F for s in (21, 14, 7, 0)) + b"\x00\x00" + text
    body = frame + b"\x00" * 64  # padding, as taggers leave
    path = Path(tmp_path) / name
    path.write_bytes(id3_header(len(body)) + body)
    return path


# ------------------------------------------------------------ reading back

def read_user_tags(path: Path) -> dict[str, str]:
    """The ordinary tags of a file as ``{key: first value}``, via mutagen.

    Reads what ``write_user_tags`` writes, independently of it, so tests
    compare against what players see. Track numbers come back as "n/total"
    (or "n" when no total is stored).
    """
    import mutagen
    from mutagen.id3 import ID3
    from mutagen.mp4 import MP4

    audio = mutagen.File(path)
    if audio is None or audio.tags is None:
        return {}
    tags = audio.tags
    out: dict[str, str] = {}
    if isinstance(tags, ID3):
        frames = {"title": "TIT2", "artist": "TPE1", "album": "TALB", "albumartist": "TPE2",
                  "tracknumber": "TRCK", "discnumber": "TPOS", "date": "TDRC", "genre": "TCON"}
        for key, frame_id in frames.items():
            if frame_id in tags:
                out[key] = str(tags[frame_id].text[0])
    elif isinstance(audio, MP4):
        atoms = {"title": "\xa9nam", "artist": "\xa9ART", "album": "\xa9alb", "albumartist": "aART",
                 "date": "\xa9day", "genre": "\xa9gen"}
        for key, atom in atoms.items():
            if atom in tags:
                out[key] = str(tags[atom][0])
        for key, atom in (("tracknumber", "trkn"), ("discnumber", "disk")):
            if atom in tags:
                number, total = tags[atom][0]
                out[key] = f"{number}/{total}" if total else str(number)
    else:
        for key, values in tags.items():
            if values:
                out.setdefault(key.lower(), str(values[0]))
    return out
