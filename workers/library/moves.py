"""Moves keep their analysis: a new path that holds a known track's file takes over that track's row.

A file renamed or moved within a filesystem keeps its inode, so a folder
scan that meets a new path asks whether a track of any library already has
that ``(device, inode)`` (``find``). It is the same file, moved, when

- that track's old path no longer exists (a path that still exists is a
  hard link or a different file: then the new path is a new track);
- the sizes are equal;
- the audio fingerprints are equal (``workers.audio.fingerprint``): a freed
  inode that the filesystem gave to another file is told apart this way.
  A track that has no fingerprint yet (tagged before Earmark kept them, or
  never tagged) is confirmed by its exact ``mtime_ns`` instead, which a
  rename keeps and another file has only by a miracle.

The row then gets the new path, folder and library (``write``); its id, its
scores, its ``TrackTag`` rows and its state stay, so a tagged file is not
analysed again and no tag job is queued for it. A moved file whose mtime
changed (its tags were edited too) keeps its row but is due for tagging,
as a changed file is.

The fingerprint costs tens of milliseconds a file (it reads the whole file),
so it is computed only for the new paths that passed the cheap tests
above; every other new file costs one indexed query per folder.

Races, all settled by conditional writes in the folder's transaction: the
old folder may be scanned before the new one (the track is then ``missing``
for a moment, and the move restores its state) or after it (the track is no
longer in that folder, and ``track_rows.mark_missing`` never touches a
track stamped by this scan or moved to another library), and two new paths
may claim one track (two hard links of a file whose old name is gone): the
move is written only while the row still has the old path, and the loser
is inserted as a new track.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from workers.audio.fingerprint import audio_fingerprint
from workers.library import paths
from workers.models import Job, Track

TRACK = Track._meta.db_table
JOB = Job._meta.db_table
_CHUNK = 900  # parameters per statement (SQLite's bound)


@dataclass
class Move:
    """A new path found to be the file of track ``id`` (whose row had ``old_path``)."""

    id: int
    old_path: str
    old_library_id: int
    new: object  # the folder's ``NewTrack`` for the path: inserted instead when the move loses a race
    fields: dict  # what the move writes on the row
    state: str  # the row's state after the move
    model_version: str
    has_tag_job: bool
    needs_tag: bool = False  # set by the folder scan (its model version decides)
    features_version: str = ""


@dataclass
class _Known:
    id: int
    library_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    state: str
    model_version: str
    fingerprint: str
    was_tagged: bool
    has_tag_job: bool
    features_version: str = ""


def find(new_tracks: list) -> list[Move]:
    """The moves among a folder's new tracks (``NewTrack``s, read without error); the database is only read."""
    readable = [t for t in new_tracks if t.row.get("state") == Track.State.SCANNED and t.row.get("inode") is not None]
    if not readable:
        return []
    known = _known_by_identity(readable)
    if not known:
        return []
    moves, claimed = [], set()
    for track in readable:
        row = track.row
        candidates = [k for k in known.get((row["device"], row["inode"]), ())
                      if k.id not in claimed and k.path != row["path"] and k.size == row["size"]
                      and _gone(k.path)]
        fingerprint = None
        for k in candidates:
            if k.fingerprint:
                if fingerprint is None:
                    fingerprint = audio_fingerprint(paths.to_bytes(row["path"]))
                if fingerprint != k.fingerprint:
                    continue
            elif k.mtime_ns != row["mtime_ns"]:
                continue
            claimed.add(k.id)
            moves.append(_move(track, k))
            break
    return moves


def write(moves: list[Move], library_id: int, gen: int) -> list[Move]:
    """Give each moved track its new path (inside the folder's transaction); returns the moves that lost.

    A move is written only while the row still has the path it had when the
    folder was read: one that another folder's job moved meanwhile (the other
    name of a hard-linked file) or a library removal deleted is not, and its
    path becomes a new track. ``scan_gen`` never goes down.
    """
    lost = []
    for move in moves:
        written = Track.objects.filter(id=move.id, path=move.old_path).update(
            **move.fields, scan_gen=Greatest(F("scan_gen"), Value(gen)), updated_at=timezone.now())
        if not written:
            lost.append(move)
        elif move.old_library_id != library_id:  # its queued tag job goes with it
            Job.objects.filter(track_id=move.id, state__in=Job.ACTIVE_STATES).update(library_id=library_id)
    return lost


def _known_by_identity(tracks: list) -> dict[tuple[int, int], list[_Known]]:
    """The tracks of any library with these tracks' (device, inode), by identity, oldest first."""
    by_device: dict[int, list[int]] = {}
    for t in tracks:
        by_device.setdefault(t.row["device"], []).append(t.row["inode"])
    known: dict[tuple[int, int], list[_Known]] = {}
    with connection.cursor() as cur:  # the (device, inode) index; one statement per folder and device
        for device, inodes in by_device.items():
            for start in range(0, len(inodes), _CHUNK):
                chunk = inodes[start : start + _CHUNK]
                cur.execute(
                    f"SELECT t.id, t.library_id, t.path, t.size, t.mtime_ns, t.state, t.model_version, "
                    f"t.audio_fingerprint, t.tagged_at IS NOT NULL, t.inode, "
                    f"EXISTS (SELECT 1 FROM {JOB} j WHERE j.queue = 'tag' AND j.key = 'tag:' || t.id "
                    f"AND j.state IN ('queued', 'running')), t.features_version "
                    f"FROM {TRACK} t WHERE t.device = %s AND t.inode IN ({', '.join(['%s'] * len(chunk))}) "
                    f"ORDER BY t.id", [device, *chunk])
                for (track_id, library_id, path, size, mtime_ns, state, model_version, fingerprint, tagged,
                     inode, has_job, features_version) in cur.fetchall():
                    known.setdefault((device, inode), []).append(_Known(
                        track_id, library_id, path, size, mtime_ns, state, model_version or "", fingerprint or "",
                        bool(tagged), bool(has_job), features_version or ""))
    return known


def _gone(path: str) -> bool:
    """Whether nothing is at the track's old path any more (an unreadable parent proves nothing)."""
    try:
        os.lstat(paths.to_bytes(path))
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _move(track, known: _Known) -> Move:
    """The move of ``known`` to the new track's path: the file's fresh facts, the row's analysis kept."""
    fields = {k: v for k, v in track.row.items() if k not in ("state", "error", "scan_gen")}
    if track.row["mtime_ns"] != known.mtime_ns:  # edited as well as moved: due for tagging, as a changed file
        state, model_version = Track.State.SCANNED, ""
        fields.update(model_version="", calibration_version="")
    elif known.state == Track.State.TAGGED or (known.state == Track.State.MISSING and known.was_tagged
                                               and known.model_version):
        state, model_version = Track.State.TAGGED, known.model_version  # missing: its old folder went first
    else:  # scanned, new, failed (read fine just now), or missing before it was tagged
        state, model_version = Track.State.SCANNED, known.model_version
    fields["state"] = state  # always: another folder's job may have marked it missing since it was read
    if state != Track.State.TAGGED:
        fields["error"] = ""
    return Move(known.id, known.path, known.library_id, track, fields, state, model_version, known.has_tag_job,
                features_version=known.features_version)
