"""Waiting until what ``workers.library.enqueue`` queued is done: ``manage.py enqueue --wait``.

First the targeted folder jobs (and those they fanned out into) run; then the
tracks they found are followed until each is tagged, failed or missing, and
has no tag job left to run. Everything a person should see comes out as
lines through ``say``: the folder jobs left, each track as it finishes with
the tags written (``Track.earmark_tags``), the counts, and at the end why the
wait failed, if it did.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.db.models import Q

from workers.library import paths, scan
from workers.library.enqueue import Outcome, Target
from workers.models import Job, Track

CHUNK = 500  # ids per query (SQLite bounds the number of parameters)


@dataclass
class WaitResult:
    tagged: list[int] = field(default_factory=list)  # track ids
    failed: list[str] = field(default_factory=list)  # "<path>: <why>", for tracks and folder jobs
    pending: list[int] = field(default_factory=list)  # track ids not finished when the wait gave up
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.timed_out


def format_tags(tags: dict) -> str:
    """``genre: ambient, electronic; mood: calm`` (what ``Track.earmark_tags`` holds)."""
    parts = [f"{category}: {', '.join(map(str, values))}" for category, values in (tags or {}).items() if values]
    return "; ".join(parts) or "no tags (no label was strong enough)"


def wait(outcomes: list[Outcome], targets: list[Target | None], timeout: float | None = None,
         say=print, interval: float = 0.25) -> WaitResult:
    """Block until every track the good paths lead to is finished, or ``timeout`` seconds have passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    result = WaitResult()
    pairs = [(o, t) for o, t in zip(outcomes, targets) if o.ok and t is not None]
    if not _wait_for_folders(pairs, deadline, say, interval, result):
        return _timed_out(result, "the folder scans had not finished", timeout, say)
    tracks = _tracks_of(pairs, result)
    say(f"following {len(tracks)} track(s)")
    left, last = set(tracks), None
    while left:
        for track_id, line, ok in _finished(left):
            left.discard(track_id)
            (result.tagged.append(track_id) if ok else result.failed.append(line))
            say(line if ok else f"failed {line}")
        counts = (len(tracks) - len(left), len(result.failed), len(left))
        if left and counts != last:
            say(f"progress: {counts[0]} of {len(tracks)} track(s) done ({counts[1]} failed), {counts[2]} waiting")
            last = counts
        if not left:
            break
        if deadline is not None and time.monotonic() >= deadline:
            result.pending = sorted(left)
            return _timed_out(result, f"{len(left)} track(s) not tagged yet", timeout, say)
        time.sleep(interval)
    say(f"done: {len(result.tagged)} track(s) tagged, {len(result.failed)} failed")
    return result


def _timed_out(result: WaitResult, what: str, timeout, say) -> WaitResult:
    result.timed_out = True
    queued = sum(Job.objects.filter(queue="tag", state=Job.State.QUEUED,
                                    track_id__in=result.pending[i : i + CHUNK]).count()
                 for i in range(0, len(result.pending), CHUNK))
    hint = f" ({queued} tag job(s) still queued: is a tagger running? see `manage.py workers`)" if queued else ""
    say(f"timed out after {timeout:g} s: {what}{hint}")
    for path in Track.objects.filter(id__in=result.pending[:20]).order_by("path").values_list("path", flat=True):
        say(f"  not done: {path}")
    return result


def _wait_for_folders(pairs, deadline, say, interval, result: WaitResult) -> bool:
    """Wait for the folder jobs and their fan-out; records the failed ones; False on timeout."""
    mine = {job_id: o.path for o, _ in pairs for job_id in o.job_ids}
    trees = [(t.library.id, t.folder, o.path) for o, t in pairs if t.recursive]
    last = None
    while True:
        for job_id, key, payload, library_id in Job.objects.filter(
                queue="scan", state__in=Job.ACTIVE_STATES, key__startswith="target:").values_list(
                "id", "key", "payload", "library_id"):
            for lib_id, tree, given in trees:  # jobs a tree's job fanned out into
                if lib_id == library_id and any(paths.is_within(paths.to_bytes(f), tree)
                                                for f in scan.job_folders(payload or {})):
                    mine.setdefault(job_id, given)
        rows = list(Job.objects.filter(id__in=list(mine)).values_list("id", "state", "last_error"))
        active = [job_id for job_id, state, _ in rows if state in Job.ACTIVE_STATES]
        for job_id, state, error in rows:
            if state in (Job.State.FAILED, Job.State.CANCELLED):
                result.failed.append(f"{mine[job_id]}: the scan of its folder {state}: {error or 'no reason given'}")
                say(f"failed {result.failed[-1]}")
        for job_id, state, _ in rows:
            if state not in Job.ACTIVE_STATES:
                mine.pop(job_id)
        if not active:
            return True
        if len(active) != last:
            say(f"scanning: {len(active)} folder job(s) left")
            last = len(active)
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tracks_of(pairs, result: WaitResult) -> list[int]:
    """The tracks the paths lead to now that their folders are scanned (a file not found is a failure)."""
    ids: dict[int, None] = {}
    for outcome, target in pairs:
        if target.track_path is not None:
            track_id = Track.objects.filter(path=target.track_path).values_list("id", flat=True).first()
            if track_id is None:
                result.failed.append(f"{outcome.path}: the scan of its folder found no such file")
            else:
                ids[track_id] = None
            continue
        folder = paths.to_text(target.folder)
        under = Q(folder=folder) | Q(folder__startswith=folder.rstrip("/") + "/")
        for track_id in Track.objects.filter(under, library=target.library).exclude(
                state=Track.State.MISSING).order_by("path").values_list("id", flat=True):
            ids[track_id] = None
    return list(ids)


def _finished(track_ids: set[int]) -> list[tuple[int, str, bool]]:
    """The tracks among these that are done: (id, the line to print, tagged or not)."""
    ids, done = sorted(track_ids), []
    for start in range(0, len(ids), CHUNK):
        done += _finished_among(ids[start : start + CHUNK])
    return done


def _finished_among(ids: list[int]) -> list[tuple[int, str, bool]]:
    busy = set(Job.objects.filter(queue="tag", state__in=Job.ACTIVE_STATES, track_id__in=ids)
               .values_list("track_id", flat=True))
    done = []
    for track_id, path, state, error, tags in Track.objects.filter(id__in=ids).exclude(id__in=busy).values_list(
            "id", "path", "state", "error", "earmark_tags"):
        if state == Track.State.TAGGED:
            done.append((track_id, f"tagged {path}: {format_tags(tags)}", True))
        elif state == Track.State.FAILED:
            done.append((track_id, f"{path}: {error or 'failed'}", False))
        elif state == Track.State.MISSING:
            done.append((track_id, f"{path}: the file is gone (missing)", False))
        else:  # scanned, with no tag job left: its last one failed for good, or none was queued
            last = Job.objects.filter(queue="tag", track_id=track_id).order_by("-id").values_list(
                "state", "last_error").first()
            if last and last[0] in (Job.State.FAILED, Job.State.CANCELLED):
                done.append((track_id, f"{path}: its tag job {last[0]}: {last[1] or 'no reason given'}", False))
    gone = set(ids) - {t for t, *_ in done} - set(Track.objects.filter(id__in=ids).values_list("id", flat=True))
    done += [(track_id, f"track {track_id}: it was removed from the library", False) for track_id in gone]
    return done
