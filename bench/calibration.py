"""``python -m bench.calibration``: computing a calibration, and recalibrating files, against their ceilings.

Two measurements, each on fresh SQLite databases (``bench.common.Workspace``):

1. **Compute.** ``--tracks`` (100,000) synthetic tagged tracks with 100
   stored mean scores each (beta-distributed, a different shape per label)
   are written into a fresh database; then, in a fresh process each round,
   ``workers.calibration.compute`` loads every score row (split into the
   SQL query with its fetch, and the decode into one numpy matrix),
   computes the per-label percentiles and histograms, and saves the row.
   The last round also activates it, timing the enqueue of one
   ``calibrate`` job per track. Target: under 10 s in all.

2. **Recalibration.** Per format, ``--files`` short demo files
   (``workers.audio.demo``, ``--seconds`` long, with user tags) are scanned,
   given synthetic scores and tagged with calibration A. Each round then
   alternates the current calibration (B, A, B, ...) so that every file's
   tags change, and measures, with 1 and 2 processes:

   - **ceiling**: a bare loop of ``workers.tagfiles.safewrite.safe_write_tags`` over
     a copy of the same files with the tag sets the recalibrator writes
     (built beforehand): the safe write alone, forked processes, from the
     first write to the last;
   - **recalibrator**: ``manage.py run_recalibrator --exit-when-idle``
     processes draining one job per file, from the first claim to the last
     completion (job timestamps). The jobs wait in a paused queue until every
     process is up and idle, so that, as for the ceiling, no process start-up
     is counted and all start together.

   Files per second are medians over ``--rounds`` (7); the ratio is
   recalibrator / ceiling (target ≥ 70%), both of the medians and as the
   median of each round's ratio to the ceiling round beside it (rounds
   alternate which goes first), since the disk's fsync time drifts.

The page cache is warm (the files were just written), as for a
recalibration pass soon after a scan.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Procs, Workspace, connect, fmt_rate, machine_note, median, print_table, scalar, wait_until

DEFAULT_FORMATS = "mp3,flac"


# ---------------------------------------------------------------- child processes

def _django(db: str) -> None:
    """Set up Django on ``db`` in this (child) process; the parent passed the rest of the environment."""
    os.environ["DATABASE_URL"] = f"sqlite:///{db}"
    import django

    django.setup()


def child_synthesize(db: str, tracks: int) -> dict:
    """Write ``tracks`` tagged tracks with stored scores, as fast as SQLite takes them."""
    _django(db)
    import numpy as np
    from django.db import connection, transaction
    from django.utils import timezone

    from workers.calibration import compute, transfer
    from workers.tagging import calibrated
    from workers.models import Library, Score, Track
    from workers.tagging import scores

    start = time.perf_counter()
    library = Library.objects.create(name="synthetic", root="/nonexistent/synthetic")
    rng = np.random.default_rng(0)
    shapes = np.linspace(0.3, 2.0, len(compute.LABEL_ORDER))
    digest = scores.labels_digest(compute.LABEL_ORDER)
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    chunk = 10_000
    with transaction.atomic():
        for first in range(0, tracks, chunk):
            n = min(chunk, tracks - first)
            Track.objects.bulk_create([
                Track(library=library, path=f"/nonexistent/synthetic/{first + i:07d}.mp3", folder="/nonexistent",
                      state=Track.State.TAGGED, model_version="bench@1", calibration_version="uncalibrated")
                for i in range(n)], batch_size=2000)
            means = rng.beta(shapes, 8.0, size=(n, len(shapes))).astype("<f4")
            spreads = (means * 0.25).astype("<f4")
            ids = list(Track.objects.filter(library=library).order_by("-id").values_list("id", flat=True)[:n])[::-1]
            with connection.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {Score._meta.db_table} (track_id, model_version, labels_version, means, spreads, "
                    "patches, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(tid, "bench@1", digest, means[i].tobytes(), spreads[i].tobytes(), 10, now)
                     for i, tid in enumerate(ids)])
    return {"tracks": Track.objects.count(), "seconds": time.perf_counter() - start}


def child_compute(db: str, activate: bool) -> dict:
    """One calibration computation in a fresh process; optionally activate it (enqueue every track)."""
    _django(db)
    from workers.calibration import compute, transfer
    from workers.tagging import calibrated

    timings: dict[str, float] = {}
    start = time.perf_counter()
    row, _ = compute.compute(min_count=1, timings=timings)
    timings["compute"] = time.perf_counter() - start
    if activate:
        start = time.perf_counter()
        timings["jobs"] = compute.activate(row)
        timings["enqueue"] = time.perf_counter() - start
    return timings


def child_prepare(db: str, root: str) -> dict:
    """Scan the demo files, give them scores and two calibrations (A current, files written with A)."""
    _django(db)
    import numpy as np

    from django.utils import timezone

    from workers.calibration import compute, transfer
    from workers.tagging import calibrated
    from workers.jobs import queue
    from workers.library import scanner
    from workers.models import Library, Meta, Track
    from workers.tagging import scores
    from workers.tagging.apply import write_track_tags

    library = Library.objects.create(name="demo", root=root, write_mode=Library.WriteMode.MINIMAL)
    scanner.request_scan(library)
    while jobs := queue.claim("scan", "bench:prepare", "boot", 1):
        scanner.process_job(jobs[0].payload, jobs[0].library_id)
        queue.complete([jobs[0].id], "bench:prepare")
    rng = np.random.default_rng(1)
    tracks = Track.objects.filter(library=library, state=Track.State.SCANNED)
    for track in tracks:
        means = rng.beta(0.6, 6.0, len(compute.LABEL_ORDER)).astype("<f4")
        scores.save(track, "bench@1", compute.LABEL_ORDER, means, means * 0.3, patches=4)
    count = tracks.update(state=Track.State.TAGGED)
    a, _ = compute.compute(min_count=1)
    document = transfer.export_json(a)
    document["version"] = a.version + "-b"
    for stats in document["stats"].values():   # B: every label a little harder to reach
        stats["p95"] = min(stats["max"], stats["p95"] * 1.1)
    b, _ = transfer.import_json(document, source="bench")
    Meta.objects.update_or_create(key=calibrated.CURRENT_KEY, defaults={
        "value": {"id": a.id, "version": a.version, "track_count": a.track_count}, "updated_at": timezone.now()})
    cal_a = calibrated.current(max_age=0)
    for track in Track.objects.filter(library=library).select_related("library", "score"):
        means, spreads = scores.as_mappings(track.score, compute.LABEL_ORDER)
        write_track_tags(track, means, spreads, "bench@1", cal_a)
    return {"tracks": count, "a": a.version, "b": b.version}


def child_activate(db: str, version: str) -> dict:
    """Pause the calibrate queue, make ``version`` current and queue the rewrites.

    Returns the last job id before them and their count. The queue stays
    paused until every recalibrator is up (``recalibration_round``), so that
    no process's start-up time counts, as none does for the ceiling.
    """
    _django(db)
    from django.db.models import Max

    from workers.calibration import compute, transfer
    from workers.tagging import calibrated
    from workers.jobs import queue
    from workers.models import Calibration, Job

    queue.pause("calibrate")
    before = Job.objects.aggregate(m=Max("id"))["m"] or 0
    jobs = compute.activate(Calibration.objects.get(version=version))
    return {"after_id": before, "jobs": jobs}


def child_tagsets(db: str, root: str, copy_root: str, versions: list[str]) -> dict:
    """The exact tag fields the recalibrator writes, per calibration, keyed by the copy's path."""
    _django(db)
    from workers.calibration import compute, transfer
    from workers.tagging import calibrated
    from workers.library import paths
    from workers.models import Calibration, Track
    from workers.tagging import scores
    from workers.tagging.tagset import build_tags

    out: dict[str, dict] = {}
    for version in versions:
        cal = calibrated.LibraryCalibration.from_row(Calibration.objects.get(version=version))
        fields = {}
        for track in Track.objects.select_related("score"):
            means, spreads = scores.as_mappings(track.score, compute.LABEL_ORDER)
            copy = copy_root + paths.to_text(paths.to_bytes(track.path))[len(root):]
            fields[copy] = build_tags(means, spreads, cal, "minimal", models=track.score.model_version).fields()
        out[version] = fields
    return out


def child_job_window(db: str, after_id: int) -> dict:
    """First claim to last completion of the jobs queued after ``after_id``, from their timestamps."""
    _django(db)
    from django.db.models import Count, Max, Min

    from workers.models import Job

    jobs = Job.objects.filter(queue="calibrate", id__gt=after_id)
    agg = jobs.aggregate(start=Min("started_at"), end=Max("finished_at"), n=Count("id"))
    done = jobs.filter(state="done").count()
    written = sum(1 for r in jobs.values_list("result", flat=True) if r and r.get("written"))
    return {"seconds": (agg["end"] - agg["start"]).total_seconds(), "jobs": agg["n"], "done": done,
            "written": written}


CHILDREN = {"_synthesize": child_synthesize, "_compute": child_compute, "_prepare": child_prepare,
            "_activate": child_activate, "_tagsets": child_tagsets, "_window": child_job_window}


def run_child(ws: Workspace, db: Path, name: str, *args) -> dict:
    """Run one child mode of this module in a fresh interpreter; returns its JSON answer."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bench.calibration", name, str(db), json.dumps(args)],
                          env=ws.env(db), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 1. compute

def bench_compute(ws: Workspace, tracks: int, rounds: int) -> list[list]:
    db = ws.fresh_db()
    made = run_child(ws, db, "_synthesize", tracks)
    print(f"  wrote {made['tracks']:,} synthetic tracks with scores in {made['seconds']:.1f} s "
          f"(database {db.stat().st_size / 1e6:.0f} MB)", flush=True)
    runs = [run_child(ws, db, "_compute", i == rounds - 1) for i in range(rounds)]
    ws.drop_db(db)
    keys = ("load_query", "load_decode", "load", "stats", "save", "compute")
    row = [f"{tracks:,} x 100", *(f"{median([r[k] for r in runs]):.2f}" for k in keys),
           f"{runs[-1]['enqueue']:.2f} ({runs[-1]['jobs']:,} jobs)"]
    return [row]


# ---------------------------------------------------------------- 2. recalibration

def _ceiling_worker(items, fields, barrier, results):
    """One forked ceiling process: wait for the others, then safe-write its share of files."""
    from workers.tagfiles.safewrite import safe_write_tags

    barrier.wait()
    start = time.time()
    for path in items:
        safe_write_tags(path, fields[path])
    results.put((start, time.time(), len(items)))


def ceiling_round(paths: list[str], fields: dict, procs: int) -> float:
    """Files per second of the bare safe write, ``procs`` forked processes sharing the files."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    shares = [paths[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_ceiling_worker, args=(share, fields, barrier, results)) for share in shares]
    for w in workers:
        w.start()
    spans = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    if any(w.exitcode for w in workers):
        raise RuntimeError("a ceiling process failed")
    return sum(n for _, _, n in spans) / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))


def recalibration_round(ws: Workspace, db: Path, version: str, procs: int, tag: str) -> tuple[float, dict]:
    """Files per second of ``procs`` recalibrator processes draining one job per file.

    The jobs wait in a paused queue until every process has started and
    reported idle; then the pause is lifted (the workers notice within
    50 ms), so all of them start on the jobs together.
    """
    queued = run_child(ws, db, "_activate", version)
    with Procs([["run_recalibrator", "--exit-when-idle"] for _ in range(procs)], ws.env(db), ws.log_dir,
               tag) as group:
        conn = connect(db)
        try:
            idle = ("SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%:calibrate:%' "
                    "AND json_extract(value, '$.state') = 'idle'")
            wait_until(lambda: scalar(conn, idle) == procs, 120, message="idle recalibrators", procs=group)
            conn.execute("DELETE FROM workers_meta WHERE key = 'queue:calibrate:paused'")
        finally:
            conn.close()
        group.check_exits(group.wait(600))
    window = run_child(ws, db, "_window", queued["after_id"])
    if window["done"] != queued["jobs"] or window["written"] != queued["jobs"]:
        raise RuntimeError(f"expected {queued['jobs']} files rewritten, got {window}")
    return window["jobs"] / window["seconds"], window


def bench_format(ws: Workspace, fmt: str, files: int, seconds: float, rounds: int, procs_list: list[int],
                 music_dir: Path) -> list[list]:
    """Ceiling and recalibrator files/s for one format, per process count (rows of the table)."""
    from workers.audio.demo import build_library
    from workers.tagfiles.safewrite import safe_write_tags

    root = music_dir / f"demo-{fmt}"
    build_library(root, files, seed=7, min_seconds=seconds, max_seconds=seconds, formats=(fmt,), jobs=os.cpu_count())
    copy = music_dir / f"ceiling-{fmt}"
    shutil.copytree(root, copy)
    db = ws.fresh_db()
    prepared = run_child(ws, db, "_prepare", str(root))
    versions = [prepared["b"], prepared["a"]]
    fields = run_child(ws, db, "_tagsets", str(root), str(copy), versions)
    copy_paths = sorted(fields[versions[0]])
    for path in copy_paths:  # the copies start as the originals do: written with A
        safe_write_tags(path, fields[versions[1]][path])
    size_mb = sum(os.path.getsize(p) for p in copy_paths) / len(copy_paths) / 1e6
    rows = []
    for procs in procs_list:
        ceiling, recal = [], []
        for r in range(rounds):
            version = versions[r % 2]
            # Alternate which goes first, so a drift in the disk's speed favours neither.
            for which in (("ceiling", "recal") if r % 2 == 0 else ("recal", "ceiling")):
                if which == "ceiling":
                    ceiling.append(ceiling_round(copy_paths, fields[version], procs))
                else:
                    recal.append(recalibration_round(ws, db, version, procs, f"recal-{fmt}-{procs}-{r}")[0])
        if rounds % 2:  # leave both sides written with the same calibration for the next process count
            ceiling_round(copy_paths, fields[versions[1]], procs)
            recalibration_round(ws, db, versions[1], procs, f"recal-{fmt}-{procs}-reset")
        c, m = median(ceiling), median(recal)
        paired = median([x / y for x, y in zip(recal, ceiling)])
        rows.append([fmt, f"{size_mb:.2f}", procs, len(copy_paths), fmt_rate(c), fmt_rate(m), f"{m / c:.0%}",
                     f"{paired:.0%}", " ".join(fmt_rate(x) for x in ceiling), " ".join(fmt_rate(x) for x in recal)])
        print(f"  {fmt} x{procs}: ceiling {c:,.0f}/s, recalibrator {m:,.0f}/s ({m / c:.0%}; paired {paired:.0%})",
              flush=True)
    ws.drop_db(db)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        print(json.dumps(CHILDREN[argv[0]](argv[1], *json.loads(argv[2]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracks", type=int, default=100_000, help="synthetic tracks for the compute benchmark")
    p.add_argument("--compute-rounds", type=int, default=3)
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated demo formats")
    p.add_argument("--files", type=int, default=300, help="demo files per format")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each demo file")
    p.add_argument("--rounds", type=int, default=7, help="recalibration rounds per process count")
    p.add_argument("--procs", default="1,2", help="recalibrator process counts")
    p.add_argument("--dir", default=None,
                   help="where to put the demo files (default: the workspace; /dev/shm: a disk without fsync cost)")
    p.add_argument("--skip-compute", action="store_true")
    p.add_argument("--skip-recalibration", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the workspace (databases, logs)")
    args = p.parse_args(argv)

    print(f"bench.calibration on {machine_note()}", flush=True)
    with Workspace(prefix="earmark-bench-calibration-", keep=args.keep) as ws:
        if not args.skip_compute:
            print("computing calibrations...", flush=True)
            rows = bench_compute(ws, args.tracks, args.compute_rounds)
            print_table(["tracks x labels", "query+fetch s", "decode s", "load s", "stats s", "save s", "total s",
                         "activate s"], rows,
                        title=f"\nCalibration compute, median of {args.compute_rounds} fresh processes "
                              "(total = load + stats + save; target < 10 s)")
        if not args.skip_recalibration:
            print("\nrecalibrating files...", flush=True)
            rows = []
            music_dir = Path(tempfile.mkdtemp(prefix="earmark-bench-music-", dir=args.dir)) if args.dir else ws.dir
            try:
                for fmt in [f for f in args.formats.split(",") if f]:
                    rows += bench_format(ws, fmt, args.files, args.seconds, args.rounds,
                                         [int(n) for n in args.procs.split(",")], music_dir)
            finally:
                if args.dir:
                    shutil.rmtree(music_dir, ignore_errors=True)
            print_table(["format", "MB", "procs", "files", "ceiling/s", "recalibrator/s", "ratio", "paired",
                         "ceiling rounds/s", "recalibrator rounds/s"], rows,
                        title=f"\nRecalibration, files/s, median of {args.rounds} rounds of {args.seconds:g} s demo "
                              f"files in {args.dir or ws.dir.parent} "
                              "(ceiling: bare safe_write_tags loop; ratio: of the medians; paired: median of "
                              "each round's ratio to its neighbouring ceiling round; target >= 70%)")
        if args.keep:
            print(f"\nworkspace kept: {ws.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
