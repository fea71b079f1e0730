"""Write Earmark's tags into a user's file without ever risking the file.

A tag write that dies half way (full disk, power cut, a mutagen bug, a
killed worker) must never leave a damaged song behind, and the audio must
never change. So ``safe_write_tags`` never edits the original:

1. refuse (``FileChangedError``) when the file is not what the scanner saw:
   another program may be editing it, and the scanner must look again;
2. do nothing when the file already holds exactly these tags, so that
   tagging twice, or recalibrating without effect, costs one tag parse;
3. clone the file into ``.earmark-tmp-*`` in the same directory (a reflink
   where the filesystem can, so the copy is nearly free; else an in-kernel
   copy) and write the tags into the clone;
4. verify the clone: the tags read back, the user's tags are unchanged, the
   stream parameters (duration, rate, channels, codec) match, the first
   packets still decode to the same samples, and the audio bytes are
   identical (see ``verify_same_audio`` for how, per format, and what it costs);
5. fsync the clone, give it the original's mode (and owner where allowed),
   ``os.replace`` it over the original and fsync the directory, so that after
   a crash the path holds either the old file or the new one, whole.

Any failure removes the clone and raises ``TagWriteError`` with a reason a
person can act on; the original is untouched. Leftover clones from killed
processes are found by their prefix, and their names say which process
wrote them (``.earmark-tmp-<host>-<pid>-<start>-…``), so the scanner
removes a dead writer's clone at once and never mistakes a clone for a
track (``remove_stale_temp_files``).

The caller resolves the path and checks it lies inside a library root; this
module refuses to operate on anything but a regular file at that path (a
symlink swapped in since the scan is refused, never followed).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import socket
import stat
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import av
import numpy as np

from workers.jobs import processes
from workers.tagfiles import namespace as tagfile
from workers.audio.formats import format_for_path

TEMP_PREFIX = ".earmark-tmp-"

# Linux ioctl that makes dst share src's blocks (btrfs, XFS, bcachefs, ...).
FICLONE = 0x40049409

# Declared durations may be re-estimated from the file size for headerless
# VBR MP3s; the byte comparison is the exact check, this one is a sanity net.
DURATION_TOLERANCE_S = 0.05
DURATION_TOLERANCE_RATIO = 0.001

# How many packets of the copy are decoded and compared with the original's:
# enough to prove that the decoder still opens and accepts the stream.
HEAD_PACKETS = 8
_PROBE_SIZE = 65536

_COPY_BLOCK = 8 << 20
_COMPARE_BLOCK = 1 << 20

_REASONS = {
    errno.ENOSPC: "no space left on device while writing tags",
    errno.EDQUOT: "disk quota exceeded while writing tags",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error (the disk may be failing)",
    errno.ENAMETOOLONG: "file name too long for a temporary copy",
    errno.EMFILE: "too many open files",
}


class SafeWriteError(Exception):
    """Base of the errors ``safe_write_tags`` raises."""


class FileChangedError(SafeWriteError):
    """The file differs from what the scanner recorded; rescan before tagging."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{reason}: {path}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable: a GPU tagger's decode processes write tags and raise these
        return type(self), (self.path, self.reason)


class TagWriteError(SafeWriteError):
    """The tags could not be written safely; the original is untouched.

    ``reason`` is for people (the admin shows it); ``errno`` and ``stage``
    (``read``, ``copy``, ``write``, ``verify``, ``replace``) are for code,
    e.g. to stop retrying on a read-only filesystem.
    """

    def __init__(self, reason: str, *, stage: str = "", errno_: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.errno = errno_

    def __reduce__(self):
        return _tag_write_error, (self.reason, self.stage, self.errno)


def _tag_write_error(reason: str, stage: str, errno_: int | None) -> TagWriteError:
    return TagWriteError(reason, stage=stage, errno_=errno_)


@dataclass(frozen=True)
class WriteResult:
    """What happened, and the file's new identity for the database.

    ``size`` and ``mtime_ns`` describe the file now at the path, written or
    not. ``copy_method`` is ``reflink``, ``copy_file_range`` or ``copy``;
    ``verify_method`` is ``bytes`` or ``packets``. ``owner_preserved`` is
    False when the process could not give the new file the original's owner
    and group (it then belongs to the worker's user). ``timings`` are
    seconds per stage, for benchmarks and the admin.
    """

    path: str
    changed: bool
    size: int
    mtime_ns: int
    copy_method: str | None = None
    verify_method: str | None = None
    owner_preserved: bool = True
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- the write

def safe_write_tags(
    path: str | bytes | os.PathLike,
    tags,
    expected_size: int | None = None,
    expected_mtime_ns: int | None = None,
    *,
    fmt: str | None = None,
) -> WriteResult:
    """Replace Earmark's tags in ``path`` with ``tags``, safely (module docstring).

    ``tags`` is a ``TagSet`` (its ``fields()`` are written) or a mapping of
    tag keys to values as ``tagfile.normalize_fields`` accepts.
    ``expected_size`` / ``expected_mtime_ns`` are what the scanner recorded;
    when given and different, ``FileChangedError`` is raised. ``fmt`` defaults
    to what the extension says.
    """
    path = os.fsdecode(path)
    fmt = fmt or format_for_path(path)
    wanted = _fields(tags)
    timings: dict[str, float] = {}

    before = _stat_regular(path)
    _check_expected(path, before, expected_size, expected_mtime_ns)
    with _stage("read", timings, path):
        original = tagfile.open_tags(path, fmt)
        if original.earmark() == wanted:
            return WriteResult(path, False, before.st_size, before.st_mtime_ns, timings=timings)
        original.check_rewritable()
        user_before = original.user()

    directory, name = os.path.split(path)
    fd, tmp = _make_temp(directory, name)
    try:
        with _stage("copy", timings, path):
            copy_method = _clone_into(path, fd, before.st_size)
        with _stage("write", timings, path):
            tagfile.write_earmark_tags(tmp, wanted, fmt)
        with _stage("verify", timings, path):
            _verify_tags(tmp, fmt, wanted, user_before)
            verify_method = verify_same_audio(path, tmp, fmt)
        with _stage("replace", timings, path):
            owner_kept = _match_metadata(fd, before)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            _check_unchanged(path, before)
            os.replace(tmp, path)
            tmp = None
            _fsync_directory(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            _remove_quietly(tmp)

    after = os.stat(path)
    return WriteResult(path, True, after.st_size, after.st_mtime_ns, copy_method,
                       verify_method, owner_kept, timings)


@contextmanager
def _stage(name: str, timings: dict[str, float], path: str):
    """Time one stage and turn anything it raises into a clear TagWriteError.

    ``FileChangedError`` and ``TagWriteError`` pass through unchanged; the
    original vanishing while it is read or copied is a ``FileChangedError``
    (the scanner marks it missing); any other OSError (also one wrapped by
    mutagen) is named by its errno, so a full disk reads "no space left on
    device while writing tags"; a
    ``TagFileError`` keeps its own explanation; anything else (a parse or
    decoder failure) is prefixed with what was being done.
    """
    start = time.perf_counter()
    try:
        yield
    except SafeWriteError:
        raise
    except tagfile.TagFileError as exc:
        raise TagWriteError(str(exc), stage=name) from exc
    except Exception as exc:
        oserror = tagfile.find_oserror(exc)
        if oserror is not None and oserror.errno == errno.ENOENT and name in ("read", "copy"):
            raise FileChangedError(path, "the file no longer exists") from exc
        if oserror is not None:
            raise TagWriteError(_os_reason(oserror, name), stage=name, errno_=oserror.errno) from exc
        raise TagWriteError(f"{_STAGE_WORDS[name]}: {exc}", stage=name) from exc
    finally:
        timings[name] = time.perf_counter() - start


_STAGE_WORDS = {
    "read": "cannot read the file's tags",
    "copy": "cannot copy the file",
    "write": "cannot write the tags",
    "verify": "verification failed",
    "replace": "cannot replace the original",
}


def _os_reason(exc: OSError, stage: str) -> str:
    """A person-readable reason for an OSError, naming the cause first."""
    reason = _REASONS.get(exc.errno)
    if reason is None:
        reason = f"{_STAGE_WORDS[stage]}: {exc.strerror or exc}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = f"{reason} ({_STAGE_WORDS[stage]})"
    return reason


# ------------------------------------------------------ identity and checks

def _fields(tags) -> tagfile.Fields:
    """A TagSet's fields, or a plain mapping's, validated and normalised."""
    return tagfile.normalize_fields(tags.fields() if hasattr(tags, "fields") else tags)


def _stat_regular(path: str) -> os.stat_result:
    """lstat the path; a vanished file or a non-regular one has changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileChangedError(path, "the file no longer exists") from None
    except OSError as exc:
        raise TagWriteError(_os_reason(exc, "read"), stage="read", errno_=exc.errno) from exc
    if not stat.S_ISREG(st.st_mode):
        raise FileChangedError(path, "the path is no longer a regular file")
    return st


def _check_expected(path: str, st: os.stat_result, size: int | None, mtime_ns: int | None) -> None:
    """Refuse a file whose size or mtime differ from the scanner's record."""
    if size is not None and st.st_size != size:
        raise FileChangedError(path, f"the file's size changed since the scan ({size} -> {st.st_size} bytes)")
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        raise FileChangedError(path, "the file was modified since the scan")


def _check_unchanged(path: str, before: os.stat_result) -> None:
    """Re-check just before replacing, so a concurrent edit is not lost.

    Between reading the original and replacing it, a user's tagger may have
    saved it; replacing would silently drop that edit.
    """
    now = _stat_regular(path)
    if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (
        before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns
    ):
        raise FileChangedError(path, "the file changed while its tags were being written")


def _verify_tags(tmp: str, fmt: str | None, wanted: tagfile.Fields, user_before: dict) -> None:
    """The copy holds exactly our tags, and the user's tags as they were."""
    written = tagfile.open_tags(tmp, fmt)
    if written.earmark() != wanted:
        raise TagWriteError("verification failed: the written tags do not read back", stage="verify")
    if written.user() != user_before:
        raise TagWriteError("verification failed: the user's own tags would change", stage="verify")


# ------------------------------------------------------------------ copying

def _make_temp(directory: str, name: str) -> tuple[int, str]:
    """Create the clone's file next to the original: same filesystem, so the
    final rename is atomic; the original's extension, so tag libraries and
    FFmpeg recognise the format from the name as they do for the original."""
    suffix = os.path.splitext(name)[1]
    try:
        return tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{writer_tag()}-", suffix=suffix, dir=directory or ".")
    except OSError as exc:
        raise TagWriteError(_os_reason(exc, "copy"), stage="copy", errno_=exc.errno) from exc


def _clone_into(src_path: str, dst_fd: int, size: int) -> str:
    """Fill ``dst_fd`` with ``src_path``'s bytes; return the method used.

    A reflink first (shared blocks, copy-on-write: near-free on btrfs/XFS),
    then ``copy_file_range`` (in-kernel, may itself share blocks on NFS 4.2
    or XFS), then a plain read/write loop for filesystems that refuse both.
    """
    with open(src_path, "rb") as src:
        src_fd = src.fileno()
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return "reflink"
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
        try:
            _copy_file_range(src_fd, dst_fd, size)
            return "copy_file_range"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        os.lseek(src_fd, 0, os.SEEK_SET)
        os.lseek(dst_fd, 0, os.SEEK_SET)
        os.ftruncate(dst_fd, 0)
        while block := os.read(src_fd, _COPY_BLOCK):
            view = memoryview(block)
            while view:
                view = view[os.write(dst_fd, view):]
        return "copy"


def _copy_file_range(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy the whole file in the kernel, tolerating short copies."""
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is None:
        raise OSError(errno.ENOSYS, "copy_file_range unavailable")
    copied = 0
    while True:
        n = copy_range(src_fd, dst_fd, max(size - copied, _COPY_BLOCK), copied, copied)
        if n == 0:
            break
        copied += n
    if copied < size:
        raise OSError(errno.EIO, f"short copy: {copied} of {size} bytes")


def _match_metadata(fd: int, original: os.stat_result) -> bool:
    """Give the copy the original's permission bits, owner and group.

    ``mkstemp`` creates 0600 files; without this a shared library's files
    would become unreadable to the music server. Changing the owner needs
    privileges a worker usually lacks: then the new file stays the worker's
    and this returns False (the caller reports it).
    """
    os.fchmod(fd, stat.S_IMODE(original.st_mode))
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) == (original.st_uid, original.st_gid):
        return True
    try:
        os.fchown(fd, original.st_uid, original.st_gid)
    except PermissionError:
        return False
    # chown clears set-id bits on some systems; restore them.
    os.fchmod(fd, stat.S_IMODE(original.st_mode))
    return True


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; filesystems that cannot sync a directory say so with EINVAL."""
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(dfd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _host_digest() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


_writer: tuple[int, str] | None = None


def writer_tag() -> str:
    """``<host digest>-<pid>-<process start time>``: who writes a clone, in its name."""
    global _writer
    pid = os.getpid()
    if _writer is None or _writer[0] != pid:  # computed once per process (a fork gets its own)
        _writer = (pid, f"{_host_digest()}-{pid}-{processes.start_time(pid) or '0'}")
    return _writer[1]


_TEMP_NAME = re.compile(rb"^" + re.escape(TEMP_PREFIX.encode()) + rb"([0-9a-f]{8})-(\d+)-(\d+)-")


def _writer_is_dead(name: bytes) -> bool:
    """True when the clone's name says it was written by a process of this host that no longer runs."""
    match = _TEMP_NAME.match(name)
    if match is None or match.group(1).decode() != _host_digest():
        return False  # another host's writer (a shared NAS) or an old-style name: only age tells
    pid, start = int(match.group(2)), match.group(3).decode()
    return pid != os.getpid() and processes.is_gone(pid, "" if start == "0" else start)


def remove_stale_temp_files(directory: str | bytes | os.PathLike, older_than: float = 3600.0) -> int:
    """Delete the ``.earmark-tmp-*`` clones in ``directory`` that no live writer will finish.

    Left behind only when a worker was killed mid-write (every failure path
    removes its own). A clone whose name says its writer ran on this host
    and has died is removed at once; any other (another host's writer, an
    old-style name) once it is older than ``older_than`` seconds, so a scanner
    never deletes the clone a live worker is writing right now. Returns how
    many were removed.
    """
    directory = os.fsencode(directory)
    prefix = TEMP_PREFIX.encode()
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if _writer_is_dead(entry.name) or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


# ------------------------------------------------------------- verification

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
                frames.extend(frame.to_ndarray() for frame in packet.decode())
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
