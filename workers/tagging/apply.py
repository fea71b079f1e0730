"""From stored scores to tags in the file: shared by the tagger and the recalibrator (no torch).

``write_track_tags`` builds the tag set for a track from its scores and the
current calibration, writes it through the safe writer (unless the library's
write mode is ``none``), and records on the track what was written. A file
that changed since its scan is re-scanned, never overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from workers import paths, scanner
from workers.models import Library, Track
from workers.safewrite import FileChangedError, TagWriteError, safe_write_tags
from workers.tagging.tagset import UNCALIBRATED, TagSet, build_tags


class FileChanged(Exception):
    """The file changed under us; it was re-scanned and will be tagged again."""


@dataclass
class Written:
    tagset: TagSet
    changed: bool


def write_track_tags(track: Track, means: dict, spreads: dict, model_version: str, calibration=None) -> Written:
    """Build and write one track's tags; updates the track row. Raises ``FileChanged``/``TagWriteError``."""
    calibration = calibration or UNCALIBRATED
    library: Library = track.library
    mode = "full" if library.write_mode == Library.WriteMode.FULL else "minimal"
    tagset = build_tags(means, spreads, calibration, mode, models=model_version)
    changed, size, mtime_ns = False, track.size, track.mtime_ns
    if library.write_mode != Library.WriteMode.NONE:
        try:
            result = safe_write_tags(paths.to_bytes(track.path), tagset, track.size, track.mtime_ns)
        except FileChangedError as exc:
            scanner.rescan_track(track)
            raise FileChanged(f"the file changed while it was being tagged ({exc.reason}); "
                              "it was re-scanned and will be tagged again") from None
        except TagWriteError as exc:
            Track.objects.filter(id=track.id).update(error=f"tag write failed: {exc.reason}")
            raise
        changed, size, mtime_ns = result.changed, result.size, result.mtime_ns
    Track.objects.filter(id=track.id).update(
        state=Track.State.TAGGED, error="", model_version=model_version, calibration_version=calibration.version,
        earmark_tags=tagset.as_dict()["categories"], size=size, mtime_ns=mtime_ns, tagged_at=timezone.now(),
        updated_at=timezone.now(),
    )
    return Written(tagset, changed)
