"""The recalibrator's ``Worker``: rewrite a track's tags from its stored scores, no networks.

Each ``calibrate`` job names a track (and, in its payload, the calibration
it was queued for). The worker builds the track's tags from the stored
``Score`` under the current calibration and writes them exactly as
``workers.tagging.apply.write_track_tags`` does for the tagger (the same
``write_file_tags``, the same re-scan of a file that changed), so a
recalibrated file is byte for byte what a fresh tagging would have
written, and a file whose tags come out the same is not touched. torch
is never imported here: many of these processes run beside the taggers at
almost no memory cost.

What differs from ``write_track_tags`` is when the track rows are updated:
once per batch, in one transaction, before the runtime completes the
batch's jobs, instead of one transaction per file. Right after a safe
write's fsyncs, a database write waits on the filesystem's journal, and
with several recalibrators each of those waits also holds SQLite's one
write lock; per batch the wait is paid once (``bench.calibration``).
Likewise the batch's tracks, libraries and scores are read in one query
(``read_ahead``). If a process dies between a write and its record, the
job was not completed either: it is retried, finds the file changed and
sends it back to the scanner, as for any file changed behind our back.
"""
from __future__ import annotations

import os
import time

from django.db.models import Subquery

from workers.calibration import compute
from workers.tagging import calibrated
from workers.library import folders, paths, scan
from workers.jobs import queue
from workers.models import Job, Track
from workers.jobs.queue import ClaimedJob
from workers.jobs.runtime import Context, PermanentError, Worker
from workers.tagfiles.errors import FileChangedError, TagWriteError
from workers.tagging import apply, scores
from workers.tagging.apply import FileChanged

#: Jobs claimed per statement: enough that the claim, the completion and
#: the read-ahead query cost little per file (a query's fixed cost is about
#: that of 20 of its rows), few enough that a stopping worker hands back
#: little and workers finish a queue together.
BATCH_SIZE = 16

LABELS_DIGEST = scores.labels_digest(compute.LABEL_ORDER)


class RecalibrateWorker(Worker):
    queue = "calibrate"
    batch_size = BATCH_SIZE

    def __init__(self):
        self.tracks: dict[int, Track] = {}  # by job id: the batch's tracks, read ahead
        self.roots: dict[tuple[int, str], bytes] = {}
        self.records = PendingRecords()

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        """One job; the batch's rows are recorded after its last job (or when they have waited too long)."""
        try:
            return self._process(job, ctx)
        finally:
            if not self.tracks or self.records.overdue():
                self.records.flush()

    def teardown(self) -> None:
        self.records.flush()

    def _process(self, job: ClaimedJob, ctx: Context) -> dict:
        if job.track_id is None:
            raise PermanentError("a calibrate job must name a track")
        track = self._track(job)
        if track is None:
            raise PermanentError("the track no longer exists")
        ctx.update(file=track.path)
        target = calibrated.current(expect=job.payload.get("calibration"))
        if track.state != Track.State.TAGGED:
            return {"skipped": f"the track is {track.state}, not tagged"}
        if not track.library.enabled:
            return {"skipped": f"the library {track.library.name} is disabled"}
        if track.calibration_version == target.version and not job.payload.get("force"):
            return {"skipped": "already written with this calibration"}
        means, spreads, model_version = self._stored_scores(track)
        self._check_inside_library(track)
        track = self._fresh(track)
        ctx.ensure_held(job.id)  # a job taken from us is written by its new holder, not twice at once
        try:
            changed = self._write(track, means, spreads, model_version, target)
        except FileChanged:
            return {"rescanned": self._after_rescan(track)}
        except TagWriteError as exc:
            if exc.permanent:
                raise PermanentError(exc.reason) from None
            raise
        return {"written": changed, "calibration": target.version}

    def _write(self, track: Track, means: dict, spreads: dict, model_version: str, target) -> bool:
        """``write_track_tags`` with the row update queued for the batch's one transaction; True if written."""
        try:
            written = apply.write_file_tags(track, means, spreads, model_version, target)
        except (FileChangedError, TagWriteError) as exc:  # as ``apply.reported``, after one more step:
            self.records.flush()  # a re-scan must see this batch's rows as written
            apply.raise_write_error(track, exc)
        self.records.add(track.id, written)
        return written.changed

    def _track(self, job: ClaimedJob) -> Track | None:
        """The job's track: from the batch read ahead, else (first job of a batch) read the batch now.

        Keyed by job id, so an entry can only ever serve the job it was read
        for: a track read for one batch is never reused, stale, by a later job.
        """
        track = self.tracks.pop(job.id, None)
        if track is None:
            self.tracks = read_ahead(job)
            track = self.tracks.pop(job.id, None) or load_tracks([job.track_id]).get(job.track_id)
        return track

    def _fresh(self, track: Track) -> Track:
        """The track row again when its file no longer matches the row read ahead.

        This or another recalibrator may have rewritten the file since this
        batch was read (two jobs for one track, queued for successive
        calibrations): then the row in the database (once our own pending
        records are in) is newer than ours, and the write must not mistake
        that for a user's edit (which re-scans and re-tags).
        """
        try:
            st = os.stat(paths.to_bytes(track.path))
        except OSError:
            return track  # the write reports it (vanished: the scanner marks it missing)
        if (st.st_size, st.st_mtime_ns) == (track.size, track.mtime_ns):
            return track
        self.records.flush()
        return load_tracks([track.id]).get(track.id) or track

    def _stored_scores(self, track: Track) -> tuple[dict, dict, str]:
        """The track's stored (means, spreads) as label mappings, and the models they came from."""
        score = getattr(track, "score", None)
        if score is None:
            raise PermanentError("no stored scores for this track; retag it")
        if score.labels_version != LABELS_DIGEST:
            raise PermanentError(f"scores of track {track.id} follow another label list; retag the track")
        labels = compute.LABEL_ORDER
        means, spreads = scores.unpack(score.means).tolist(), scores.unpack(score.spreads).tolist()
        if len(means) != len(labels) or len(spreads) != len(labels):
            raise PermanentError(f"scores of track {track.id} are truncated; retag the track")
        return dict(zip(labels, means)), dict(zip(labels, spreads)), score.model_version

    def _check_inside_library(self, track: Track) -> None:
        """The file must resolve inside its library's root, as for the tagger: never write elsewhere."""
        key = (track.library_id, track.library.root)
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = scan.resolved_root(track.library)
        if not paths.is_within(os.path.realpath(paths.to_bytes(track.path)), root):
            raise PermanentError(f"{track.path} is outside the library root {track.library.root}; not written")

    @staticmethod
    def _after_rescan(track: Track) -> str:
        """The file changed since its scan and was re-read: hand a still readable file back to the tagger."""
        state = Track.objects.filter(id=track.id).values_list("state", flat=True).first()
        if state == Track.State.SCANNED:
            queue.enqueue("tag", f"tag:{track.id}", track_id=track.id, library_id=track.library_id,
                          priority=folders.TAG_PRIORITY)
            return "the file changed since its scan; queued for tagging"
        return f"the file changed since its scan; the track is now {state}"


class PendingRecords:
    """Track rows to update once their files are written: one transaction for a whole batch.

    ``overdue`` bounds how long a record waits (a slow disk, a large
    batch), since the runtime may complete finished jobs before the batch
    ends and a job should not be done long before its track says so.
    """

    MAX_WAIT_S = 0.25

    def __init__(self):
        self.rows: list[tuple[int, apply.Written]] = []
        self.since = 0.0

    def add(self, track_id: int, written: "apply.Written") -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows.append((track_id, written))

    def overdue(self) -> bool:
        return bool(self.rows) and time.monotonic() - self.since > self.MAX_WAIT_S

    def flush(self) -> int:
        """Write every pending row in one transaction; returns how many."""
        rows, self.rows = self.rows, []
        apply.record_many(rows)
        return len(rows)


def read_ahead(job: ClaimedJob) -> dict[int, Track]:
    """``{job id: track}`` (with library and scores) for every job held by ``job``'s holder, in one query.

    The runtime claims a batch in one statement, so "the running jobs claimed
    by this job's holder" is exactly the batch: reading them together costs
    one query per batch instead of one per job. A job no longer held (its
    lease expired and it was rescued) is simply not found.
    """
    holder = Job.objects.filter(id=job.id, state=Job.State.RUNNING).values("claimed_by")[:1]
    held = (Job.objects.filter(queue=job.queue, state=Job.State.RUNNING, claimed_by=Subquery(holder),
                               track__isnull=False)
            .select_related("track__library", "track__score").defer(*UNUSED_JOB_FIELDS))
    return {j.id: j.track for j in held}


def load_tracks(track_ids) -> dict[int, Track]:
    """Tracks by id with their library and stored scores, in one query."""
    return {t.id: t for t in Track.objects.select_related("library", "score").defer("tags").filter(id__in=track_ids)}


#: Columns ``read_ahead`` has no use for: of the job only the id and the track
#: are read; the user's own tags (a JSON document per track, lyrics and all)
#: play no part in Earmark's, and the tags last written are replaced.
UNUSED_JOB_FIELDS = ("payload", "result", "last_error", "key", "claimed_by", "boot_id", "run_after", "created_at",
                     "started_at", "finished_at", "lease_expires", "track__tags", "track__earmark_tags",
                     "track__library__last_scan_error")
