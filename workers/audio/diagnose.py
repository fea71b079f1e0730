"""Why a file cannot be read, in words a person can act on.

FFmpeg's own errors ("Invalid data found when processing input") do not say
whether a file vanished, is a PNG renamed to .mp3, holds only an ID3 tag, or
was cut short mid-download. This module answers that from the filesystem and
the file's own bytes (signatures, Ogg pages, the WAV ``data`` chunk), without
PyAV, so ``decode`` can raise precise ``DecodeError``s and the scanner can
explain files its tag reader refused. ``decode`` imports it; it imports
nothing of the project.
"""
from __future__ import annotations

import errno
import os
import stat
import struct


# A decode that ends before this share of the declared duration (and more
# than TRUNCATION_MIN_GAP seconds short) means the file was cut off.
TRUNCATION_RATIO = 0.9
TRUNCATION_MIN_GAP = 1.0


class DecodeError(Exception):
    """A file could not be decoded; ``reason`` says why in plain words.

    ``kind`` is one of ``empty``, ``vanished``, ``unreadable``, ``not_audio``,
    ``corrupt``, ``truncated``: workers mark ``vanished`` files missing,
    may retry ``unreadable`` ones, and fail the rest for good.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    def __reduce__(self):  # picklable: a GPU tagger's decode processes return these
        return type(self), (self.kind, self.reason)


def native(path: str | bytes | os.PathLike) -> str:
    """A str path FFmpeg can open, even for names that are not UTF-8.

    The scanner holds bytes paths; ``os.fsdecode`` maps undecodable bytes to
    surrogates, which PyAV (like ``os``) encodes back to the exact bytes.
    """
    return os.fsdecode(os.fspath(path))


def check_file(path: str) -> None:
    """Turn the common filesystem failures into clear DecodeErrors early.

    FFmpeg reports a missing file, a directory and a zero-byte file with
    messages that do not say what happened; ``stat`` tells us plainly.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError("vanished", "vanished: the file no longer exists") from None
    except PermissionError:
        raise DecodeError("unreadable", "unreadable: permission denied") from None
    except OSError as exc:
        raise DecodeError("unreadable", f"unreadable: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError("not_audio", "not audio: not a regular file")
    if st.st_size == 0:
        raise DecodeError("empty", "empty file: it has 0 bytes")
    if not os.access(path, os.R_OK):
        raise DecodeError("unreadable", "unreadable: permission denied")


def os_error(exc: OSError) -> DecodeError:
    """Map an OSError raised while opening or reading to a DecodeError."""
    if exc.errno == errno.ENOENT:
        return DecodeError("vanished", "vanished: the file disappeared while being read")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DecodeError("unreadable", "unreadable: permission denied")
    message = exc.strerror or str(exc)
    return DecodeError("unreadable", f"unreadable: {message}")


def explain_unreadable(path: str | bytes | os.PathLike) -> str:
    """Why a file that no reader could open is not usable audio, in words, from its first bytes.

    For callers that met the failure elsewhere (the scanner's mutagen read):
    "not audio: the file is a PNG image", "not audio: the file holds only an
    ID3 tag and no audio after it", "corrupt: the file starts like a FLAC
    file but cannot be read (damaged or cut short)".
    """
    try:
        return unopenable(native(path)).reason
    except OSError as exc:
        return os_error(exc).reason


def unopenable(path: str) -> DecodeError:
    """Explain why FFmpeg found no format in the file, from its signature."""
    kind = sniff(path)
    if kind == _ID3_KIND and _id3_only(path):
        return DecodeError("not_audio", "not audio: the file holds only an ID3 tag and no audio after it")
    if kind in AUDIO_SIGNATURES:
        return DecodeError(
            "corrupt", f"corrupt: the file starts like {kind} but cannot be read (damaged or cut short)"
        )
    if kind:
        return DecodeError("not_audio", f"not audio: the file is {kind}")
    return DecodeError("not_audio", "not audio: the data is not in any audio format FFmpeg knows")


# -------------------------------------------------------- file signatures

_ID3_KIND = "an MP3 with an ID3 tag"
AUDIO_SIGNATURES = {
    _ID3_KIND, "a FLAC file", "an Ogg file", "a WAV file", "an AIFF file",
    "an MP4/M4A file", "an MP3 file",
}


def sniff(path: str) -> str | None:
    """What the first bytes say the file is, in words; None if unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head.startswith(b"ID3"):
        return _ID3_KIND
    if head.startswith(b"fLaC"):
        return "a FLAC file"
    if head.startswith(b"OggS"):
        return "an Ogg file"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "a WAV file"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "an AIFF file"
    if head[4:8] == b"ftyp":
        return "an MP4/M4A file"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "an MP3 file"
    return None


def _id3_only(path: str) -> bool:
    """True when an ID3v2 tag fills the whole file: a tag with no audio."""
    with open(path, "rb") as f:
        header = f.read(10)
        size_bytes = header[6:10]
        tag_size = 0
        for b in size_bytes:
            tag_size = (tag_size << 7) | (b & 0x7F)
        end = 10 + tag_size + (10 if header[5] & 0x10 else 0)  # footer flag
        f.seek(end)
        rest = f.read(4096)
    return not rest.strip(b"\x00")


def container_truncation(path: str, codec_container: str, decoded: float) -> str | None:
    """Truncation FFmpeg cannot see, found in the container's own structure.

    Ogg declares no duration (FFmpeg reads it off the last page, which for a
    cut file is wherever the cut fell), but a whole Ogg stream ends with a
    page flagged end-of-stream. FFmpeg sizes a WAV from the bytes present,
    but the ``data`` chunk header says how many there should be.
    """
    if codec_container == "ogg":
        return _ogg_truncation(path, decoded)
    if codec_container == "wav":
        return _wav_truncation(path, decoded)
    return None


def _ogg_truncation(path: str, decoded: float) -> str | None:
    """Check that the file's last Ogg page is whole and marked end-of-stream.

    Trailing junk after a complete page (some taggers append ID3v1) is
    tolerated: only a page cut by the end of file, or a final page that ends
    exactly at the end of file without the end mark, counts as truncation.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 131072))
        tail = f.read()
    base = size - len(tail)
    at = tail.rfind(b"OggS")
    if at < 0 or len(tail) - at < 27:
        return f"truncated: the Ogg stream breaks off after {decoded:.1f} s"
    flags, segments = tail[at + 5], tail[at + 26]
    table = tail[at + 27: at + 27 + segments]
    end = base + at + 27 + segments + sum(table)
    if len(table) < segments or end > size:
        return f"truncated: the Ogg stream breaks off mid-page after {decoded:.1f} s"
    if end == size and not flags & 0x04:
        return f"truncated: the Ogg stream stops after {decoded:.1f} s without its end-of-stream mark"
    return None


def _wav_truncation(path: str, decoded: float) -> str | None:
    """Compare the WAV ``data`` chunk's declared size with the bytes present."""
    with open(path, "rb") as f:
        f.seek(12)
        byte_rate = None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"fmt ":
                fmt = f.read(size + (size & 1))
                byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else None
                continue
            if chunk == b"data":
                present = os.path.getsize(path) - f.tell()
                if not byte_rate or size in (0, 0xFFFFFFFF) or present >= size:
                    return None  # streaming writers leave 0 or -1: no claim to check
                declared = size / byte_rate
                if is_truncated(decoded, declared):
                    return f"truncated: decoded {decoded:.1f} s of {declared:.1f} s"
                return None
            f.seek(size + (size & 1), 1)


def is_truncated(decoded: float, declared: float) -> bool:
    return decoded < TRUNCATION_RATIO * declared and declared - decoded > TRUNCATION_MIN_GAP
