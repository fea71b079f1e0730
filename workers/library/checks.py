"""File facts before a worker touches a file: the track still exists, its file lies inside the library and is unchanged.

A tag job is claimed minutes or days after its scan; the file may have been
edited, moved, deleted, or replaced by a symlink that leads out of the
library meanwhile. Every worker that reads a file checks it here first, so
that nothing outside a library root is ever read and a changed file is
re-scanned instead of analysed from stale facts.
"""
from __future__ import annotations

import os

from workers.jobs.runtime import PermanentError
from workers.library import folders, paths, scan
from workers.models import Track


def tracks_by_id(track_ids: list[int]) -> dict[int, Track]:
    """The tracks with their libraries, in one query (the user's tags are not needed to check a file)."""
    return Track.objects.select_related("library").defer("tags").in_bulk(track_ids)


def track_for_job(track_id: int) -> Track:
    """``checked`` for one job's track."""
    return checked(tracks_by_id([track_id]).get(track_id))


def checked(track: Track | None) -> Track:
    """The track, its file inside the library and unchanged since its scan (else re-scanned).

    A file that is gone marks the track missing (returned so, not raised:
    the job is done, there is nothing to tag).
    """
    if track is None:
        raise PermanentError("the track no longer exists")
    path = paths.to_bytes(track.path)
    if not paths.is_within(os.path.realpath(path), scan.resolved_root(track.library)):
        raise PermanentError(f"{track.path} is outside the library root {track.library.root}; not read")
    try:
        st = os.stat(path)
    except FileNotFoundError:  # unless a scan found it moved meanwhile (``workers.library.moves``)
        Track.objects.filter(id=track.id, path=track.path).update(state=Track.State.MISSING)
        track.state = Track.State.MISSING
        return track
    if (st.st_size, st.st_mtime_ns) != (track.size, track.mtime_ns):
        track = folders.rescan_track(track)
        if track is None:
            raise PermanentError("the file changed since it was scanned and can no longer be read")
    return track
