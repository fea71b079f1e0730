"""From stored scores to tags in the file: shared by the tagger and the recalibrator (no torch).

Two halves, because the file and the database are best written at different
moments: ``write_file_tags`` builds the tag set from a track's scores and the
calibration (``plan``) and writes it through the safe writer (unless the
library's write mode is ``none``), touching no database, so a GPU tagger can
run the writes in its decode processes (``TagWrite.args``); ``record`` then
puts on the track row what was written, and
``raise_write_error`` turns a failed write into what the caller reports (a file
that changed since its scan is re-scanned, never overwritten).
``write_track_tags`` is the two in a row, for one file at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from django.db import transaction
from django.utils import timezone

from workers.jobs.runtime import PermanentError
from workers.library import fileinfo, folders, paths
from workers.models import Library, Track, TrackTag
from workers.tagfiles.errors import FileChangedError, TagWriteError, WriteResult
from workers.tagfiles.safewrite import safe_write_tags
from workers.tagfiles import standard
from workers.tagging import measures
from workers.tagging.tagset import GENRE_FLOOR, UNCALIBRATED, TagSet, build_tags


class FileChanged(Exception):
    """The file changed under us; it was re-scanned and will be tagged again."""


@dataclass
class Written:
    """What one tag write did: the tags, whether the file changed, and its size and mtime now."""

    tagset: TagSet
    changed: bool
    size: int
    mtime_ns: int
    model_version: str
    calibration_version: str
    seconds: float = 0.0  # spent in the safe writer
    device: int | None = None  # the file's identity now (a write gives it a new inode), when known
    inode: int | None = None
    audio_fingerprint: str = ""  # when the write computed it (the track had none)

    def row(self) -> dict:
        """The track fields that say these tags are in the file (and the file's identity, for moves)."""
        now = timezone.now()
        row = dict(state=Track.State.TAGGED, error="", model_version=self.model_version,
                   genre_low_confidence="genre" in self.tagset.low_confidence,
                   calibration_version=self.calibration_version, earmark_tags=self.tagset.as_dict()["categories"],
                   size=self.size, mtime_ns=self.mtime_ns, tagged_at=now, updated_at=now)
        if self.inode is not None:
            row.update(device=fileinfo.db_int(self.device), inode=fileinfo.db_int(self.inode))
        if self.audio_fingerprint:
            row["audio_fingerprint"] = self.audio_fingerprint
        return row

    def tag_rows(self, track_id: int) -> list[TrackTag]:
        """The track's ``TrackTag`` rows for these tags: every value of every category, with its strength."""
        strengths = self.tagset.strengths
        return [TrackTag(track_id=track_id, category=category, value=value, rank=rank,
                         strength=strengths.get(category, {}).get(value))
                for category, values in self.tagset.categories.items() for rank, value in enumerate(values)]


@dataclass
class TagWrite:
    """One track's tags, built and ready to go into its file."""

    track: Track
    tagset: TagSet
    model_version: str
    calibration_version: str

    @property
    def args(self) -> tuple | None:
        """``safe_write_tags`` arguments (plain data: any process can run it); None for write mode ``none``.

        The audio fingerprint (which finds the track again after a move) is
        asked for while the track has none: once per file, since no tag write
        changes it, and a rescan that finds the file changed clears it.
        """
        if self.track.library.write_mode == Library.WriteMode.NONE:
            return None
        return (paths.to_bytes(self.track.path), self.tagset, self.track.size, self.track.mtime_ns,
                standard_request(self.track.library, self.tagset, measures.standard_values(self.track)),
                not self.track.audio_fingerprint)

    def finish(self, result: WriteResult | None) -> Written:
        """The ``Written`` for ``safe_write_tags(*args)``'s result (None: nothing was to be written)."""
        if result is None:
            return Written(self.tagset, False, self.track.size, self.track.mtime_ns, self.model_version,
                           self.calibration_version)
        return Written(self.tagset, result.changed, result.size, result.mtime_ns, self.model_version,
                       self.calibration_version, sum(result.timings.values()), result.device, result.inode,
                       result.audio_fingerprint)


def plan(track: Track, means: dict, spreads: dict, model_version: str, calibration=None) -> TagWrite:
    """Build the track's tags from its scores under ``calibration`` and its library's write mode and policy."""
    calibration = calibration or UNCALIBRATED
    library = track.library
    mode = "full" if library.write_mode == Library.WriteMode.FULL else "minimal"
    tagset = build_tags(means, spreads, calibration, mode, models=model_version,
                        genre_floor=GENRE_FLOOR if writes_genres(library) else None)
    tagset = replace(tagset, measured=measures.namespace_fields(track))
    return TagWrite(track, tagset, model_version, calibration.version)


def writes_genres(library: Library) -> bool:
    """Whether the library's policy puts genres into the standard field (then every track gets one)."""
    return library.standard_tags != Library.StandardTags.OFF and bool(standard_limits(library).get("genre"))


def standard_limits(library: Library) -> dict[str, int]:
    """The library's categories for standard fields with their value limits (the defaults where unset)."""
    limits = library.standard_limits if isinstance(library.standard_limits, dict) else standard.DEFAULT_LIMITS
    return {name: int(limits[name]) for name in standard.CATEGORY_FIELDS if int(limits.get(name) or 0) > 0}


def standard_request(library: Library, tagset: TagSet, measured: dict | None = None) -> standard.Request:
    """What the safe writer puts in the file's standard fields for these tags (and the ``measured``
    BPM, key and ReplayGain values: ``measures.standard_values``), by the library's policy."""
    limits = standard_limits(library)
    values = {name: list(tagset.categories.get(name) or [])[:limit] for name, limit in limits.items()}
    values.update(measured or {})
    return standard.Request(library.standard_tags, values, library.id3v23_separator or standard.DEFAULT_SEPARATOR)


def write_file(write: TagWrite) -> Written:
    """Write the planned tags into the file; no database work.

    Raises ``FileChangedError`` or ``TagWriteError`` from the safe writer.
    """
    args = write.args
    return write.finish(safe_write_tags(*args) if args else None)


def write(planned: TagWrite) -> Written:
    """``write_file``, a failure reported on the track (``raise_write_error``)."""
    return reported(planned.track, lambda: write_file(planned))


def write_file_tags(track: Track, means: dict, spreads: dict, model_version: str, calibration=None) -> Written:
    """``plan`` then ``write_file``: the recalibrator's one step from stored scores to the file."""
    return write_file(plan(track, means, spreads, model_version, calibration))


def record(track: Track, written: Written) -> None:
    record_many([(track.id, written)])


def record_many(rows: list[tuple[int, Written]]) -> None:
    """Put on each track's row what was written, and replace its tag rows (what the admin filters on).

    One transaction for all: the recalibrator records a whole batch at once
    (every commit waits on the filesystem's journal after the writes' fsyncs).
    """
    if not rows:
        return
    with transaction.atomic():
        for track_id, written in rows:
            Track.objects.filter(id=track_id).update(**written.row())
        TrackTag.objects.filter(track_id__in=[track_id for track_id, _ in rows]).delete()
        TrackTag.objects.bulk_create([tag for track_id, written in rows for tag in written.tag_rows(track_id)])


def raise_write_error(track: Track, exc: Exception):
    """Report a failed ``write_file_tags``: re-scan a changed file (``FileChanged``), note a failed write."""
    if isinstance(exc, FileChangedError):
        folders.rescan_track(track)
        raise FileChanged(f"the file changed while it was being tagged ({exc.reason}); "
                          "it was re-scanned and will be tagged again") from None
    if isinstance(exc, TagWriteError):
        Track.objects.filter(id=track.id).update(error=f"tag write failed: {exc.reason}")
        if exc.permanent:  # retrying cannot help: fail the job at once, with the reason
            raise PermanentError(exc.reason) from None
    raise exc


def reported(track: Track, write) -> Written:
    """``write()`` (a ``write_file_tags`` wherever it ran); a failure is reported by ``raise_write_error``."""
    try:
        return write()
    except (FileChangedError, TagWriteError) as exc:
        raise_write_error(track, exc)


def write_track_tags(track: Track, means: dict, spreads: dict, model_version: str, calibration=None) -> Written:
    """Build and write one track's tags and record them on its row. Raises ``FileChanged``/``TagWriteError``."""
    written = write(plan(track, means, spreads, model_version, calibration))
    record(track, written)
    return written
