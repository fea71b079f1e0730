"""The audio formats Earmark reads, writes test files in, and tags.

One table, keyed by the short format names used everywhere in the project
(``Track.format``, the demo library's ``--formats``, the tag writer's dispatch):
``mp3 flac ogg opus m4a alac wav aiff``.

``format_for_path`` decides by extension alone, because the scanner calls it
for every directory entry and must not open files to do so. Extension alone
cannot tell AAC from ALAC inside ``.m4a``; both share the MP4 tag family, so
the scanner stores ``m4a`` and the decoder's ``probe`` reports the real codec.

Deliberately not audio here:

* ``.aac`` (raw ADTS): it has no tag container, so Earmark could never write
  its results into it; treating it as audio would only produce failed jobs.
* ``.mp4``/``.m4v`` video files are usually films; ``.mp4`` is accepted
  because some rippers write audio-only MP4 with that extension, and the
  decoder rejects files with no audio stream with a clear reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ID3 = "id3"
MP4 = "mp4"
VORBIS = "vorbis"


@dataclass(frozen=True)
class AudioFormat:
    """How one format is stored: where it lives, how it is encoded, how tagged.

    ``container`` is the FFmpeg muxer name PyAV writes with; ``codec`` the
    FFmpeg encoder used to make test and demo files (``vorbis`` is FFmpeg's
    native, experimental encoder because this PyAV build has no libvorbis).
    ``max_channels`` is what that encoder accepts; ``encode.write_audio``
    folds wider input down to it.
    """

    key: str
    extensions: tuple[str, ...]
    container: str
    codec: str
    tag_family: str
    lossless: bool
    max_channels: int
    default_bitrate: int | None = None

    @property
    def extension(self) -> str:
        """The extension new files of this format get (with the dot)."""
        return self.extensions[0]


FORMATS: dict[str, AudioFormat] = {
    f.key: f
    for f in (
        AudioFormat("mp3", (".mp3",), "mp3", "libmp3lame", ID3, False, 2, 192_000),
        AudioFormat("flac", (".flac",), "flac", "flac", VORBIS, True, 8),
        AudioFormat("ogg", (".ogg", ".oga"), "ogg", "vorbis", VORBIS, False, 2, 160_000),
        AudioFormat("opus", (".opus",), "ogg", "libopus", VORBIS, False, 8, 128_000),
        AudioFormat("m4a", (".m4a", ".mp4"), "ipod", "aac", MP4, False, 8, 192_000),
        AudioFormat("alac", (".m4a",), "ipod", "alac", MP4, True, 8),
        AudioFormat("wav", (".wav",), "wav", "pcm_s16le", ID3, True, 8),
        AudioFormat("aiff", (".aiff", ".aif", ".aifc"), "aiff", "pcm_s16be", ID3, True, 8),
    )
}

# Extension -> format key. ``.m4a`` maps to ``m4a`` (AAC or ALAC: same tags).
EXTENSIONS: dict[str, str] = {}
for _fmt in FORMATS.values():
    for _ext in _fmt.extensions:
        EXTENSIONS.setdefault(_ext, _fmt.key)
del _fmt, _ext


def get_format(key: str) -> AudioFormat:
    """The format for ``key``, or a ValueError naming the known keys."""
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(
            f"unknown audio format {key!r}; known: {', '.join(FORMATS)}"
        ) from None


def format_for_path(path: str | bytes | os.PathLike) -> str | None:
    """The format key for a file name by its extension, or None if not audio.

    Accepts bytes because the scanner walks with bytes paths (see
    ``workers.library.paths``); the comparison is case-insensitive (``.MP3``).
    Hidden AppleDouble files (``._name.mp3``) are not audio.
    """
    name = os.fsdecode(os.path.basename(os.fspath(path)))
    if name.startswith("._"):
        return None
    ext = os.path.splitext(name)[1].lower()
    return EXTENSIONS.get(ext)


def tag_family(key: str) -> str:
    """``"id3"``, ``"mp4"`` or ``"vorbis"``: which tag writer a format needs."""
    return get_format(key).tag_family
