"""Write numpy audio to a real file in any supported format, with user tags.

Tests, the demo library and benchmarks need genuine encoded files (real MP3
frames, real Ogg pages, real MP4 atoms) so that decoding and tag writing are
exercised the way a user's library exercises them. PyAV encodes; mutagen then
writes the user's tags the way common taggers do for that format, so that the
files look like what Picard or beets leave behind.

Everything is in memory per file; clips are short (seconds to minutes).
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from workers.audio.formats import ID3, MP4, VORBIS, AudioFormat, get_format

# FFmpeg layout names for the channel counts we produce.
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}

# Sample formats in the order we prefer to hand them to an encoder: float
# first (no quantisation of our own), then 16-bit, then 32-bit.
_SAMPLE_FORMAT_PREFERENCE = ("fltp", "flt", "s16p", "s16", "s32p", "s32")

# FFmpeg's own Vorbis encoder is marked experimental and refuses to open
# without ``strict``; FLAC level 5 is what the flac tool uses by default.
# LAME -q 7 and AAC's "fast" coder halve encoding time against the defaults
# at a quality that is plenty for test and demo files (a 30 s stereo MP3:
# 1.05 s -> 0.59 s; AAC: 0.49 s -> 0.28 s on this machine).
_ENCODER_OPTIONS = {
    "vorbis": {"strict": "experimental"},
    "flac": {"compression_level": "5"},
    "libmp3lame": {"compression_level": "7"},
    "aac": {"aac_coder": "fast"},
}

# Rates we fall back to when an encoder cannot take the input's rate.
_FALLBACK_RATES = (48000, 44100)

USER_TAG_KEYS = ("title", "artist", "album", "albumartist", "tracknumber",
                 "discnumber", "date", "genre")


def write_audio(
    path: str | os.PathLike,
    samples: np.ndarray,
    sample_rate: int,
    fmt: str,
    tags: dict | None = None,
    bitrate: int | None = None,
) -> None:
    """Encode ``samples`` (float32, shape (channels, n), in [-1, 1]) to ``path``.

    ``fmt`` is a key of ``formats.FORMATS``. The file is written whole at
    ``path`` (any existing file is replaced). Encoder limits are met rather
    than refused, so callers can ask for any combination: Opus is resampled to
    48 kHz, a rate an encoder lacks goes to 48 or 44.1 kHz, and more channels
    than the encoder takes (MP3: 2; FFmpeg's Vorbis encoder: exactly 2) are
    folded down (or mono duplicated) to stereo. ``tags`` holds any of
    ``USER_TAG_KEYS``; values are strings, ints, or lists of strings.
    """
    spec = get_format(fmt)
    audio = _as_planar_float(samples)
    audio = _fit_channels(audio, spec)
    _encode(os.fsdecode(os.fspath(path)), audio, int(sample_rate), spec, bitrate)
    if tags:
        write_user_tags(path, fmt, tags)


def _as_planar_float(samples: np.ndarray) -> np.ndarray:
    """Validate and normalise input to C-contiguous float32 (channels, n).

    A 1-D array is taken as mono, which is what most callers mean by it.
    Values are clipped so that a synthesizer's overshoot cannot wrap around
    in integer encoders.
    """
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2 or audio.shape[0] not in _LAYOUTS:
        raise ValueError(
            f"samples must be shaped (channels, n) with 1, 2 or 6 channels, got {audio.shape}"
        )
    if audio.shape[1] == 0:
        raise ValueError("samples are empty: nothing to encode")
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0))


def _fit_channels(audio: np.ndarray, spec: AudioFormat) -> np.ndarray:
    """Fold channels to what the format's encoder accepts.

    FFmpeg's native Vorbis encoder only takes stereo, LAME at most stereo.
    5.1 (FL FR FC LFE BL BR) folds down with the usual ITU weights; mono is
    duplicated for Vorbis so the content stays centred.
    """
    channels = audio.shape[0]
    needs_stereo = spec.codec == "vorbis" or channels > spec.max_channels
    if not needs_stereo or channels == 2:
        return audio
    if channels == 1:
        return np.repeat(audio, 2, axis=0)
    fl, fr, fc, _lfe, bl, br = audio
    left = fl + 0.7071 * fc + 0.7071 * bl
    right = fr + 0.7071 * fc + 0.7071 * br
    stereo = np.stack([left, right]) / 2.4142
    return np.ascontiguousarray(stereo.astype(np.float32))


def _pick_rate(codec: av.codec.Codec, rate: int, spec: AudioFormat) -> int:
    """The rate to encode at: the input's when the encoder allows it."""
    if spec.codec == "libopus":
        return 48000
    allowed = codec.audio_rates
    if not allowed or rate in allowed:
        return rate
    for fallback in _FALLBACK_RATES:
        if fallback in allowed:
            return fallback
    return max(allowed)


def _pick_sample_format(codec: av.codec.Codec) -> str:
    """The first sample format the encoder accepts in our preference order."""
    offered = [f.name for f in codec.audio_formats or ()]
    for name in _SAMPLE_FORMAT_PREFERENCE:
        if name in offered:
            return name
    raise RuntimeError(f"encoder {codec.name} offers no usable sample format: {offered}")


def _encode(path: str, audio: np.ndarray, rate: int, spec: AudioFormat,
            bitrate: int | None) -> None:
    """Run the PyAV encoder over the whole clip and mux it into ``path``.

    Input goes through an ``av.AudioResampler`` that converts to the
    encoder's sample format and rate and re-chunks to its frame size, so
    every codec gets exactly the frames it needs.
    """
    codec = av.codec.Codec(spec.codec, "w")
    out_rate = _pick_rate(codec, rate, spec)
    out_format = _pick_sample_format(codec)
    layout = _LAYOUTS[audio.shape[0]]
    # bitexact: fixed Ogg serial numbers and no "Lavf" encoder tag, so the
    # same samples always give the same bytes (the demo library relies on it).
    with av.open(path, "w", format=spec.container,
                 container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(spec.codec, rate=out_rate, layout=layout)
        stream.format = out_format
        stream.codec_context.options = _ENCODER_OPTIONS.get(spec.codec, {})
        if not spec.lossless:
            stream.bit_rate = bitrate or spec.default_bitrate
        # Open now: the frame size is only known once the encoder is open.
        stream.codec_context.open()
        frame_size = stream.codec_context.frame_size or 4096
        resampler = av.AudioResampler(
            format=out_format, layout=layout, rate=out_rate, frame_size=frame_size
        )
        for frame in _input_frames(audio, rate, layout):
            for converted in resampler.resample(frame):
                _mux(container, stream, converted)
        for converted in resampler.resample(None):
            _mux(container, stream, converted)
        for packet in stream.encode(None):
            container.mux(packet)


def _input_frames(audio: np.ndarray, rate: int, layout: str, block: int = 65536):
    """Yield fltp AudioFrames of ``block`` samples with sample-exact pts."""
    for start in range(0, audio.shape[1], block):
        chunk = np.ascontiguousarray(audio[:, start:start + block])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.time_base = Fraction(1, rate)
        frame.pts = start
        yield frame


def _mux(container, stream, frame) -> None:
    """Encode one frame and write whatever packets come out."""
    for packet in stream.encode(frame):
        container.mux(packet)


# --------------------------------------------------------------------- tags

def write_user_tags(path: str | os.PathLike, fmt: str, tags: dict) -> None:
    """Write ordinary user tags (title, artist, ...) the way taggers do.

    ID3v2.4 frames for MP3, WAV and AIFF; iTunes atoms for MP4; Vorbis
    comments for FLAC, Ogg Vorbis and Opus. Unknown keys are refused so a
    typo in a test does not silently write nothing.
    """
    unknown = set(tags) - set(USER_TAG_KEYS)
    if unknown:
        raise ValueError(f"unknown tag keys {sorted(unknown)}; known: {USER_TAG_KEYS}")
    values = {k: _as_strings(v) for k, v in tags.items() if v is not None}
    family = get_format(fmt).tag_family
    path = os.fsdecode(os.fspath(path))
    if family == ID3:
        _write_id3(path, fmt, values)
    elif family == MP4:
        _write_mp4(path, values)
    elif family == VORBIS:
        _write_vorbis(path, fmt, values)


def _as_strings(value) -> list[str]:
    """Tag values as a list of strings (lists stay multi-valued)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


_ID3_FRAMES = {
    "title": "TIT2", "artist": "TPE1", "album": "TALB", "albumartist": "TPE2",
    "tracknumber": "TRCK", "discnumber": "TPOS", "date": "TDRC", "genre": "TCON",
}


def _write_id3(path: str, fmt: str, values: dict[str, list[str]]) -> None:
    """ID3v2.4 in the MP3 header, or in the ``id3 `` chunk of WAV/AIFF."""
    from mutagen import id3
    from mutagen.aiff import AIFF
    from mutagen.mp3 import MP3
    from mutagen.wave import WAVE

    audio = {"mp3": MP3, "wav": WAVE, "aiff": AIFF}[fmt](path)
    if audio.tags is None:
        audio.add_tags()
    for key, texts in values.items():
        frame_id = _ID3_FRAMES[key]
        audio.tags.setall(frame_id, [getattr(id3, frame_id)(encoding=3, text=texts)])
    audio.save()


_MP4_ATOMS = {
    "title": "\xa9nam", "artist": "\xa9ART", "album": "\xa9alb", "albumartist": "aART",
    "date": "\xa9day", "genre": "\xa9gen",
}


def _write_mp4(path: str, values: dict[str, list[str]]) -> None:
    """iTunes atoms; track and disc numbers are (number, total) pairs."""
    from mutagen.mp4 import MP4 as MP4File

    audio = MP4File(path)
    if audio.tags is None:
        audio.add_tags()
    for key, texts in values.items():
        if key in ("tracknumber", "discnumber"):
            atom = "trkn" if key == "tracknumber" else "disk"
            audio.tags[atom] = [_number_pair(texts[0])]
        else:
            audio.tags[_MP4_ATOMS[key]] = texts
    audio.save()


def _number_pair(text: str) -> tuple[int, int]:
    """``"3/12"`` -> (3, 12); ``"3"`` -> (3, 0), as MP4 stores numbers."""
    number, _, total = text.partition("/")
    return int(number or 0), int(total or 0)


def _write_vorbis(path: str, fmt: str, values: dict[str, list[str]]) -> None:
    """Upper-case Vorbis comment fields, multi-valued as repeated fields."""
    from mutagen.flac import FLAC
    from mutagen.oggopus import OggOpus
    from mutagen.oggvorbis import OggVorbis

    audio = {"flac": FLAC, "ogg": OggVorbis, "opus": OggOpus}[fmt](path)
    if audio.tags is None:
        audio.add_tags()
    for key, texts in values.items():
        audio.tags[key.upper()] = texts
    audio.save()
