"""``python -m bench.chaos --minutes N``: SIGKILL chaos under supervisord, then every file checked.

A real supervisord from ``deploy/supervisord.conf`` runs 4 scanners, 2
taggers and 2 recalibrators on a real SQLite database and a small library of
real audio files (every format). Once half the library is tagged and a
calibration is in force (the warm-up), and while they go on working, a
driver keeps work coming
(incremental and full rescans, re-tagging, new calibrations that make the
recalibrators rewrite every file) and SIGKILLs a worker every second or two,
preferring busy ones; supervisord restarts each. When the time is up the
driver lets the queues drain, runs one more scan (as a scheduled rescan
would: it removes the temporary files of writers that died) and checks:

* every job is done, failed or cancelled with a reason; none is queued or running;
* no file's decoded audio changed (``decode()`` before and after, sample for sample);
* no ``.earmark-tmp-*`` file is left anywhere in the library, and none became a track;
* every track is tagged, and the tags in its file are the ones the database
  records (categories, model and calibration versions, size and mtime);
* no worker row is left once supervisord stops everything.

It prints kills survived, jobs retried and files checked, and exits 1 if any
check failed. The killer is "polite" in one way only: it never kills a worker
holding a job on its last allowed attempt, because a job that dies
``max_attempts`` times is quarantined by design (``tests/jobs/test_poison.py``
tests that); every other job may die, and does, mid-decode, mid-write or
mid-commit. Draining brings forward retries that wait on a backoff (a job
whose worker died twice waits one), so the run ends when the work does.

``tests/deploy/test_chaos.py`` runs the same driver and checks for about a minute;
this command runs them for as long as asked on a larger library.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

FORMATS = ("mp3", "flac", "ogg", "opus", "m4a", "alac", "wav", "aiff")
GROUPS = {"scanner": "scan", "tagger": "tag", "recalibrator": "calibrate"}
WORKERS = {"EARMARK_SCANNERS": 4, "EARMARK_TAGGERS": 2, "EARMARK_RECALIBRATORS": 2}


# --------------------------------------------------------------------- the library

def make_library(root: Path, tracks: int, seconds: tuple[float, float] = (2.0, 4.0), seed: int = 0) -> list[Path]:
    """``tracks`` short real files in every format, in Artist/Album folders, with the user's own tags."""
    from workers.audio.encode import write_audio
    from workers.audio.formats import get_format
    from workers.audio.synth import synth_clip

    rng = random.Random(seed)
    files = []
    for i in range(tracks):
        fmt = FORMATS[i % len(FORMATS)]
        artist, album = f"Artist {i % 3}", f"Album {i % 5}"
        path = Path(root) / artist / album / f"{i:02d} Song {i}{get_format(fmt).extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        secs = round(rng.uniform(*seconds), 2)
        write_audio(path, synth_clip(seed * 1000 + i, secs, 44100, 2), 44100, fmt,
                    tags={"title": f"Song {i}", "artist": artist, "album": album, "tracknumber": str(i + 1)})
        files.append(path)
    return files


def decoded_audio(files) -> dict[Path, np.ndarray]:
    from workers.audio.decode import decode

    return {Path(f): decode(f).samples for f in files}


def temp_files(root: Path) -> list[Path]:
    from workers.tagfiles.tempfiles import TEMP_PREFIX

    return sorted(p for p in Path(root).rglob(f"{TEMP_PREFIX}*"))


# ------------------------------------------------------------------------- chaos

STATUS_LINE = re.compile(r"^(\S+)\s+RUNNING\s+pid (\d+)", re.M)


@dataclass
class ChaosStats:
    kills: Counter = field(default_factory=Counter)  # by program group
    interrupted: int = 0  # jobs held by a worker at the moment it was killed
    spared: int = 0  # kills skipped: the victim held a job on its last attempt
    churn: Counter = field(default_factory=Counter)

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


class Chaos:
    """Kills workers under ``sup`` (a ``tests.supervisor_harness.Supervisor``) and keeps work coming."""

    def __init__(self, sup, library, host: str, seed: int = 1, kill_every: tuple[float, float] = (0.6, 2.0),
                 churn_every: float = 4.0, log=print):
        self.sup, self.library, self.host = sup, library, host
        self.rng = random.Random(seed)
        self.kill_every, self.churn_every = kill_every, churn_every
        self.stats = ChaosStats()
        self.log = log
        self._churn_step = 0

    def running(self) -> dict[str, int]:
        """``{"tagger:tagger_00": pid}`` for every RUNNING worker (past its startsecs)."""
        out = self.sup.ctl("status", check=False).stdout
        return {name: int(pid) for name, pid in STATUS_LINE.findall(out) if name.split(":")[0] in GROUPS}

    def _key(self, name: str) -> str:
        """The worker id (``Job.claimed_by``) of the supervisord process ``name``."""
        group, proc = name.split(":")
        return f"worker:{self.host}:{GROUPS[group]}:{int(proc.rsplit('_', 1)[1])}"

    def _held(self) -> dict[str, list[tuple[int, int]]]:
        """``{worker id: [(attempts, max attempts), ...]}`` for every job held right now, in one query."""
        from workers.models import Job

        held: dict[str, list[tuple[int, int]]] = {}
        for key, attempts, limit in Job.objects.filter(state="running").values_list("claimed_by", "attempts",
                                                                                   "max_attempts"):
            held.setdefault(key, []).append((attempts, limit))
        return held

    def kill_one(self, wait_for_busy: float = 1.0) -> str | None:
        """SIGKILL one running worker: mostly (85%) one with work in hand, waiting up to a second for one."""
        procs = self.running()
        if not procs:
            return None
        want_busy = self.rng.random() < 0.85
        deadline = time.monotonic() + wait_for_busy
        while True:
            held = self._held()
            busy = [n for n in procs if held.get(self._key(n))]
            if busy or not want_busy or time.monotonic() >= deadline:
                break
            time.sleep(0.03)
        name = self.rng.choice(sorted(busy if busy and want_busy else procs))
        mine = held.get(self._key(name), [])
        if any(attempts >= limit for attempts, limit in mine):
            self.stats.spared += 1
            return None
        try:
            os.kill(procs[name], signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.stats.kills[name.split(":")[0]] += 1
        self.stats.interrupted += len(mine)
        return name

    def churn(self) -> str:
        """One more piece of work, in turn: rescans (incremental and full), re-tags, new calibrations.

        Re-tags come twice a round: rescans of unchanged files (full ones
        too) give the taggers nothing to do, and they must die with work in
        hand as well.
        """
        from workers.library import folders, scan

        steps = ("rescan", "calibration", "retag", "calibration", "full rescan", "retag", "calibration")
        step = steps[self._churn_step % len(steps)]
        self._churn_step += 1
        if step in ("rescan", "full rescan"):
            scan.request_scan(self.library, full=step == "full rescan")
        elif step == "retag":
            retag_some(self.library, self.rng, share=1.0)
        else:
            new_calibration(self._churn_step, self.rng)
        self.stats.churn[step] += 1
        return step

    def warm_up(self, tagged: int, timeout: float) -> None:
        """Let work flow before the killing starts: ``tagged`` tracks tagged and a calibration in force.

        So that every kind of worker has work throughout the chaos: taggers
        restarting over and over from the first second would leave the
        recalibrators nothing to rewrite.
        """
        from workers.calibration import compute, transfer
        from workers.tagging import calibrated
        from workers.models import Track

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if Track.objects.filter(library=self.library, state="tagged").count() >= tagged:
                if calibrated.current_row() is None:
                    new_calibration(0, self.rng, first_at=tagged)
                return
            time.sleep(0.25)
        raise AssertionError(f"fewer than {tagged} tracks tagged after {timeout:.0f}s of warm-up")

    def run(self, seconds: float, until=None, at_most: float | None = None) -> ChaosStats:
        """Kill and churn for ``seconds``; then on, up to ``at_most`` seconds in all, until ``until(stats)``.

        How many kills land on a worker with a job in hand depends on the
        machine's load; a test that needs some of each says so with ``until``
        rather than hoping the fixed period brought them.
        """
        started = time.monotonic()
        end, limit = started + seconds, started + max(seconds, at_most or seconds)
        next_churn = time.monotonic() + self.churn_every
        while time.monotonic() < end or (until and not until(self.stats) and time.monotonic() < limit):
            time.sleep(self.rng.uniform(*self.kill_every))
            victim = self.kill_one()
            if victim:
                self.log(f"  killed {victim}")
            if time.monotonic() >= next_churn:
                self.log(f"  churn: {self.churn()}")
                next_churn = time.monotonic() + self.churn_every
        return self.stats


def retag_some(library, rng: random.Random, share: float = 0.3) -> int:
    """Queue tag jobs for some tagged tracks (tagging twice must give the same file)."""
    from workers.jobs import queue
    from workers.library import folders, scan
    from workers.models import Track

    ids = list(Track.objects.filter(library=library, state="tagged").values_list("id", flat=True))
    chosen = rng.sample(ids, max(1, int(len(ids) * share))) if ids else []
    return queue.enqueue_many("tag", [queue.NewJob(key=f"tag:{i}", track_id=i, library_id=library.id,
                                                   priority=folders.TAG_PRIORITY) for i in chosen])


def new_calibration(n: int, rng: random.Random, first_at: int = 4) -> int:
    """A slightly different calibration made current: every tagged file is due for a rewrite.

    The first is computed from the stored scores once ``first_at`` tracks
    are tagged (as ``manage.py calibrate`` would). After that the current
    calibration is exported, its percentiles nudged inwards, and imported
    and activated as a new version, exactly as a person importing another
    library's calibration would. Returns the jobs queued.
    """
    from workers.calibration import compute, transfer
    from workers.tagging import calibrated

    row = calibrated.current_row()
    if row is None:
        try:
            return compute.recalibrate(min_count=first_at).jobs
        except compute.NotEnoughTracks:
            return 0
    doc = transfer.export_json(row)
    for stats in doc["stats"].values():
        span = stats["p95"] - stats["p5"]
        stats["p5"] += span * rng.uniform(0.0, 0.15)
        stats["p95"] -= span * rng.uniform(0.0, 0.15)
    doc["version"] = f"{row.version.split('-chaos')[0][:60]}-chaos{n}"
    new, _ = transfer.import_json(doc, source="bench.chaos")
    return compute.activate(new)


# ------------------------------------------------------------------ settle, check

def settle(timeout: float, what: str = "the queues to drain") -> None:
    """Wait until no job is queued or running; retries waiting on a backoff are brought forward."""
    from django.utils import timezone

    from workers.models import Job

    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        Job.objects.filter(state="queued", run_after__gt=timezone.now()).update(run_after=timezone.now())
        if Job.objects.filter(state__in=Job.ACTIVE_STATES).exists():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.5:  # nothing came back (a rescue, a rescan's tag job)
            return
        time.sleep(0.25)
    from workers.jobs.queue import counts

    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {counts()}")


def final_scan(library, timeout: float) -> None:
    """One more incremental scan, as a scheduled rescan would run, and its follow-up work."""
    from workers.library import folders, scan

    before = scan.progress(library).get("gen", 0)
    scan.request_scan(library)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = scan.progress(library)
        if state.get("gen", 0) > before and state.get("state") in ("done", "failed"):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"the final scan did not finish in {timeout:.0f}s: {scan.progress(library)}")
    settle(timeout, "the work after the final scan")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    tracks_tagged: int = 0
    jobs: Counter = field(default_factory=Counter)
    jobs_retried: int = 0


def check(library, audio_before: dict[Path, np.ndarray]) -> Report:
    """Every invariant the chaos run must keep (module docstring); problems are listed, not raised."""
    from django.db.models import Count

    from workers.library import paths
    from workers.audio.decode import decode
    from workers.models import Job, Track
    from workers.tagfiles.tempfiles import TEMP_PREFIX
    from workers.tagfiles.namespace import read_earmark_tags
    from workers.tagging.tagset import CATEGORIES

    report = Report()
    problems = report.problems
    for row in Job.objects.values("state").annotate(n=Count("id")):
        report.jobs[row["state"]] = row["n"]
    for job in Job.objects.filter(state__in=Job.ACTIVE_STATES):
        problems.append(f"job {job.id} ({job.queue} {job.key}) is still {job.state}")
    for job in Job.objects.filter(state__in=["failed", "cancelled"], last_error=""):
        problems.append(f"job {job.id} ({job.queue} {job.key}) is {job.state} without a reason")
    report.jobs_retried = Job.objects.filter(attempts__gt=1).count()

    leftovers = temp_files(Path(library.root))
    problems += [f"temporary file left behind: {p}" for p in leftovers]
    problems += [f"a temporary file became a track: {p}"
                 for p in Track.objects.filter(path__contains=TEMP_PREFIX).values_list("path", flat=True)]

    for path, before in audio_before.items():
        try:
            after = decode(path).samples
        except Exception as exc:  # noqa: BLE001 - reported as a problem
            problems.append(f"{path} no longer decodes: {exc}")
            continue
        if before.shape != after.shape or not np.array_equal(before, after):
            problems.append(f"{path}: the decoded audio changed")
        report.files_checked += 1

    failed_tag_tracks = set(Job.objects.filter(queue="tag", state="failed").values_list("track_id", flat=True))
    for track in Track.objects.filter(library=library):
        path = paths.to_bytes(track.path)
        if track.state != Track.State.TAGGED:
            if track.id not in failed_tag_tracks:
                problems.append(f"{track.path} is {track.state} ({track.error or 'no error'}), not tagged")
            continue
        report.tracks_tagged += 1
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) != (track.size, track.mtime_ns):
            problems.append(f"{track.path}: size/mtime in the database differ from the file")
        tags = read_earmark_tags(os.fsdecode(path))
        for category in CATEGORIES:
            if tags.get(category, []) != (track.earmark_tags or {}).get(category, []):
                problems.append(f"{track.path}: {category} in the file {tags.get(category, [])} "
                                f"!= database {(track.earmark_tags or {}).get(category, [])}")
        version = (tags.get("version") or [""])[0]
        if f"models={track.model_version} " not in version or \
                not version.split(" calibration=")[-1].startswith(track.calibration_version or "?"):
            problems.append(f"{track.path}: version tag {version!r} does not name models {track.model_version} "
                            f"and calibration {track.calibration_version}")
    return report


# ----------------------------------------------------------------------- the command

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="How long to kill workers (default 5).")
    parser.add_argument("--tracks", type=int, default=40, help="Files in the library (default 40).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="Keep the workspace (database, library, logs).")
    args = parser.parse_args(argv)

    from bench.common import Workspace, machine_note, setup_django, use_database
    from bench.tagger import models_dir

    models = models_dir()
    setup_django()
    from tests.supervisor_harness import Supervisor
    from workers.library import folders, scan
    from workers.library.libraries import add_library
    from workers.models import Meta

    with Workspace(prefix="earmark-chaos-", keep=args.keep) as ws:
        db = ws.fresh_db()
        use_database(db)
        env = ws.env(db, EARMARK_MODELS_DIR=models, EARMARK_HEARTBEAT_INTERVAL=1, EARMARK_HEARTBEAT_TIMEOUT=6,
                     EARMARK_IDLE_POLL_SECONDS=0.2, EARMARK_LOG_LEVEL="INFO",
                     EARMARK_CALIBRATION_MIN_TRACKS=max(4, args.tracks // 2), EARMARK_CALIBRATION_CHECK_SECONDS=1)
        root = ws.dir / "library"
        print(f"Chaos: {args.minutes:g} min of SIGKILLs, 4 scanners, 2 taggers, 2 recalibrators, "
              f"{args.tracks} files ({machine_note()})")
        files = make_library(root, args.tracks, seed=args.seed)
        before = decoded_audio(files)
        library = add_library("chaos", str(root))
        scan.request_scan(library)
        sup = Supervisor(env, ws.dir / "sup", EARMARK_TAGGER_AUTOSTART="true", EARMARK_RECALIBRATOR_AUTOSTART="true",
                         **WORKERS).start()
        started = time.monotonic()
        try:
            chaos = Chaos(sup, library, host=env["EARMARK_HOSTNAME"], seed=args.seed, log=lambda s: None)
            chaos.warm_up(max(4, args.tracks // 2), timeout=300)
            stats = chaos.run(args.minutes * 60)
            settle(300)
            final_scan(library, 300)
            report = check(library, before)
            sup.ctl("stop", "all")
            if Meta.objects.filter(key__startswith="worker:").exists():
                report.problems.append("worker rows were left after supervisorctl stop all")
        finally:
            sup.stop()
        kills = ", ".join(f"{g} {n}" for g, n in sorted(stats.kills.items()))
        print(f"run: {time.monotonic() - started:.0f} s; work added: "
              + ", ".join(f"{k} {v}" for k, v in sorted(stats.churn.items())))
        print(f"kills survived: {stats.total_kills} ({kills}); {stats.interrupted} jobs were in hand when "
              f"their worker died; {stats.spared} kills spared a job on its last attempt")
        print(f"jobs retried: {report.jobs_retried} (claimed more than once); jobs: "
              + ", ".join(f"{k} {v}" for k, v in sorted(report.jobs.items())))
        print(f"files checked: {report.files_checked} (audio identical), {report.tracks_tagged} tracks tagged with "
              f"tags matching the database, {len(temp_files(root))} temporary files left")
        if report.problems:
            print(f"PROBLEMS ({len(report.problems)}):")
            for p in report.problems[:50]:
                print(f"  {p}")
            return 1
        print("all checks passed")
        return 0


if __name__ == "__main__":
    sys.exit(main())
