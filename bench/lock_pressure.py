"""``python -m bench.lock_pressure [--minutes 5]``: 16 processes of mixed work on one SQLite file.

The prior system this project learns from died of "database is locked"
under 17 processes. This runs 16 real processes against one SQLite database
in WAL mode for the given time and counts every "database is locked" that
escapes anywhere (worker logs, job and track errors, the driver's and the
reader's own statements), and reports the claim latency each worker saw:
the time of ``queue.claim``, the one-statement claim, measured inside the
worker processes (so it includes every wait on SQLite's write lock).

The 16 processes, all through the real worker runtime (``workers.jobs.runtime.Runner``:
claims, heartbeat thread, lease extension, maintenance turns, batched completes):

* 5 scanners: the real ``ScanWorker`` over a library of 360 real audio files in 30 folders;
* 5 taggers without networks: the real ``TagWorker`` job code (checks, re-scan of changed
  files, ``Score`` rows, safe tag writes, the track row, the auto-calibration hook) with the
  network scores replaced by deterministic random ones (torch is not loaded: on this
  2-core machine 5 model runs would measure the CPU, not the database);
* 4 recalibrators: the real ``RecalibrateWorker`` (batches of 16, real file rewrites);
* 1 driver: keeps work coming, as people and schedules do: a rescan every 1.5 s, a few
  files touched every 4 s (the scanners re-read them, the taggers tag them again),
  re-tags every 3 s, a new calibration every 8 s (every tagged file rewritten);
* 1 reader: what the admin and the live dashboard read, in a tight loop (queue counts,
  live workers, tracks by state).

Each process writes what it measured to a JSON file when SIGTERM stops it;
the parent prints a table and the worst and 99th-percentile claim latency.
``tests/jobs/test_lock_pressure.py`` runs 45 s of the same (``--seconds 45``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = (("scanner", 5), ("tagger", 5), ("recalibrator", 4), ("driver", 1), ("reader", 1))
MODEL_VERSION = "MTT_musicnn@bench000+MSD_musicnn@bench000"
LOCKED = "database is locked"


# --------------------------------------------------------------------------- children

class _Stop:
    flag = False


def _on_term(signum, frame):
    _Stop.flag = True


def _timed_claims(latencies: list[float]) -> None:
    """Wrap ``workers.jobs.queue.claim`` (the runtime calls it through the module) to time every claim."""
    from workers.jobs import queue

    original = queue.claim

    def claim(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            latencies.append(time.perf_counter() - start)

    queue.claim = claim


def _no_network_tagger():
    """The real tagger's job code with made-up scores instead of the networks (no torch)."""
    import zlib
    from dataclasses import dataclass, field

    import numpy as np

    from workers.calibration.compute import LABEL_ORDER
    from workers.tagging.tag_worker import TagWorker

    @dataclass
    class Analysis:
        labels: tuple
        means: np.ndarray
        spreads: np.ndarray
        patches: int = 1
        seconds: float = 1.0
        timings: dict = field(default_factory=dict)
        patches_total: int = 1
        features: dict = field(default_factory=dict)  # nothing measured: no tempo, key or loudness tags

        def mappings(self):
            return (dict(zip(self.labels, map(float, self.means))), dict(zip(self.labels, map(float, self.spreads))))

    class Analyzer:
        """Stands in for ``pipeline.Analyzer``: made-up scores, the same for the same file (idempotent)."""

        model_version = MODEL_VERSION
        device = "cpu"

        def analyze(self, path: bytes, max_seconds=None, progress=None, until=None) -> Analysis:
            rng = np.random.default_rng(zlib.crc32(path))
            n = len(LABEL_ORDER)
            return Analysis(LABEL_ORDER, rng.random(n).astype(np.float32), (rng.random(n) * 0.1).astype(np.float32))

        def close(self):
            pass

    class NoNetworkTagger(TagWorker):
        def setup(self, ctx):
            self.analyzer = Analyzer()
            self.batch_size = 1

    return NoNetworkTagger()


def run_child(role: str, number: int, out: Path) -> None:
    import django

    django.setup()
    signal.signal(signal.SIGTERM, _on_term)
    result: dict = {"role": role, "number": number, "pid": os.getpid(), "errors": []}
    if role in ("scanner", "tagger", "recalibrator"):
        from workers.jobs.runtime import Runner

        latencies: list[float] = []
        _timed_claims(latencies)
        if role == "scanner":
            from workers.library.scan_worker import ScanWorker

            worker = ScanWorker()
        elif role == "tagger":
            worker = _no_network_tagger()
        else:
            from workers.calibration.recalibrate_worker import RecalibrateWorker

            worker = RecalibrateWorker()
        runner = Runner(worker, number=number)
        result["exit"] = runner.run()
        result.update(claims=latencies, done=runner.ctx.status.get("done", 0),
                      failed=runner.ctx.status.get("failed", 0))
    elif role == "driver":
        result.update(_drive())
    else:
        result.update(_read())
    out.write_text(json.dumps(result))


def _guarded(stats: dict, name: str, fn):
    """Run one statement group, timing it and keeping any error (a locked database included)."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
        stats["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    stats["latencies"].append(time.perf_counter() - start)
    stats["ops"][name] = stats["ops"].get(name, 0) + 1


def _drive() -> dict:
    from bench.chaos import new_calibration, retag_some
    from workers.calibration import compute
    from workers.tagging import calibrated
    from workers.library import scan
    from workers.models import Library, Track

    rng = random.Random(5)
    stats = {"errors": [], "latencies": [], "ops": {}}
    library = Library.objects.get()
    files = sorted(Path(library.root).rglob("*.*"))
    every = {"rescan": 1.5, "touch": 4.0, "retag": 3.0, "calibration": 8.0}
    due = {k: time.monotonic() + v for k, v in every.items()}
    n = 0

    def touch():
        for path in rng.sample(files, 5):
            os.utime(path)

    def calibrate():
        nonlocal n
        n += 1
        if calibrated.current_row() is None:
            if Track.objects.filter(state="tagged").count() >= 20:
                compute.recalibrate(min_count=20)
        else:
            new_calibration(n, rng)

    actions = {"rescan": lambda: scan.request_scan(library), "touch": touch,
               "retag": lambda: retag_some(library, rng, 0.05), "calibration": calibrate}
    _guarded(stats, "rescan", actions["rescan"])
    while not _Stop.flag:
        time.sleep(0.1)
        for name, when in due.items():
            if time.monotonic() >= when and not _Stop.flag:
                _guarded(stats, name, actions[name])
                due[name] = time.monotonic() + every[name]
    return stats


def _read() -> dict:
    from django.db.models import Count

    from workers.jobs import queue, registry
    from workers.models import Track

    stats = {"errors": [], "latencies": [], "ops": {}}

    def read():
        queue.counts()
        registry.live_workers()
        list(Track.objects.values("state").annotate(n=Count("id")))

    while not _Stop.flag:
        _guarded(stats, "dashboard read", read)
        time.sleep(0.05)
    return stats


# ---------------------------------------------------------------------------- parent

def make_library(root: Path, folders: int = 30, per_folder: int = 12) -> int:
    """Real audio files: four short templates (one per format) copied into many album folders."""
    import shutil

    from workers.audio.encode import write_audio
    from workers.audio.synth import synth_clip

    templates = root.parent / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    made = []
    for i, fmt in enumerate(["mp3", "flac", "ogg", "wav"]):
        path = templates / f"t{i}.{fmt}"
        write_audio(path, synth_clip(i, 1.0, 22050, 2), 22050, fmt, tags={"title": f"t{i}", "artist": "Bench"})
        made.append(path)
    count = 0
    for f in range(folders):
        album = root / f"Artist {f % 6}" / f"Album {f}"
        album.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            src = made[(f + i) % len(made)]
            shutil.copyfile(src, album / f"{i:02d} track{src.suffix}")
            count += 1
    return count


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run(seconds: float, keep: bool = False, out=print) -> dict:
    from bench.common import Workspace, machine_note

    with Workspace(prefix="earmark-lock-", keep=keep) as ws:
        db = ws.fresh_db()
        env = ws.env(db, EARMARK_HEARTBEAT_INTERVAL=1, EARMARK_HEARTBEAT_TIMEOUT=6, EARMARK_IDLE_POLL_SECONDS=0.2,
                     EARMARK_STOP_GRACE_SECONDS=5, EARMARK_CALIBRATION_MIN_TRACKS=50,
                     EARMARK_CALIBRATION_CHECK_SECONDS=2, EARMARK_MODELS_DIR=ws.dir / "no-models")
        root = ws.dir / "library"
        files = make_library(root)
        subprocess.run([sys.executable, str(ROOT / "manage.py"), "library", "add", "bench", str(root)], env=env,
                       cwd=ROOT, check=True, capture_output=True)
        total = sum(n for _, n in ROLES)
        out(f"Lock pressure: {total} processes (" + ", ".join(f"{n} {r}{'s' if n > 1 else ''}" for r, n in ROLES)
            + f") on one SQLite file for {seconds:g} s; {files} files ({machine_note()})")
        procs = []
        for role, n in ROLES:
            for i in range(n):
                result = ws.dir / f"{role}-{i}.json"
                log = open(ws.log_dir / f"{role}-{i}.log", "wb")
                procs.append((role, i, result, ws.log_dir / f"{role}-{i}.log", subprocess.Popen(
                    [sys.executable, "-m", "bench.lock_pressure", "--child", role, "--number", str(i),
                     "--out", str(result)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
                log.close()
        started = time.monotonic()
        time.sleep(seconds)
        alive = sum(p.poll() is None for *_, p in procs)
        for *_, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for *_, p in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        ran = time.monotonic() - started
        return _report(procs, codes, alive, ran, db, out)


def _report(procs, codes, alive, ran, db: Path, out) -> dict:
    results, locked_in_logs = [], 0
    for (role, i, result, log, _), code in zip(procs, codes):
        text = log.read_text(errors="replace")
        locked_in_logs += text.count(LOCKED)
        data = json.loads(result.read_text()) if result.exists() else {"role": role, "errors": ["no result"]}
        data.update(exit=code, traceback="Traceback" in text)
        results.append(data)
    conn = sqlite3.connect(db)
    jobs = dict(((q, s), n) for q, s, n in conn.execute("SELECT queue, state, COUNT(*) FROM workers_job GROUP BY 1, 2"))
    locked_in_db = conn.execute("SELECT COUNT(*) FROM workers_job WHERE last_error LIKE ?", [f"%{LOCKED}%"]).fetchone()[0]
    locked_in_db += conn.execute("SELECT COUNT(*) FROM workers_track WHERE error LIKE ?", [f"%{LOCKED}%"]).fetchone()[0]
    tracks = dict(conn.execute("SELECT state, COUNT(*) FROM workers_track GROUP BY 1").fetchall())
    calibrations = conn.execute("SELECT COUNT(*) FROM workers_calibration").fetchone()[0]
    conn.close()
    locked_in_ops = sum(LOCKED in e for r in results for e in r.get("errors", []))

    rows, every_claim, summary = [], [], {"roles": {}}
    for role, _ in ROLES[:3]:
        mine = [r for r in results if r["role"] == role]
        claims = [c for r in mine for c in r.get("claims", [])]
        every_claim += claims
        done = sum(r.get("done", 0) for r in mine)
        summary["roles"][role] = {"processes": len(mine), "done": done, "claims": len(claims),
                                  "worst_ms": max(claims, default=0) * 1000, "p99_ms": percentile(claims, 99) * 1000}
        rows.append([role, len(mine), done, len(claims), f"{percentile(claims, 50) * 1000:.1f}",
                     f"{percentile(claims, 99) * 1000:.1f}", f"{max(claims, default=0) * 1000:.1f}"])
    rows.append(["all workers", sum(r[1] for r in rows), sum(r[2] for r in rows), len(every_claim),
                 f"{percentile(every_claim, 50) * 1000:.1f}", f"{percentile(every_claim, 99) * 1000:.1f}",
                 f"{max(every_claim, default=0) * 1000:.1f}"])
    from bench.common import print_table

    class _Out:
        def write(self, s):
            out(s.rstrip("\n")) if s.strip() else None

        def flush(self):
            pass

    print_table(["role", "processes", "jobs done", "claims", "claim p50 ms", "claim p99 ms", "worst ms"], rows,
                out=_Out())
    driver = next(r for r in results if r["role"] == "driver")
    reader = next(r for r in results if r["role"] == "reader")
    out("driver: " + ", ".join(f"{k} {v}" for k, v in sorted(driver.get("ops", {}).items()))
        + f"; worst {max(driver.get('latencies', [0])) * 1000:.0f} ms")
    out(f"reader: {len(reader.get('latencies', []))} dashboard reads, worst "
        f"{max(reader.get('latencies', [0])) * 1000:.0f} ms")
    out("jobs: " + ", ".join(f"{q} {s} {n}" for (q, s), n in sorted(jobs.items()))
        + "; tracks: " + ", ".join(f"{s} {n}" for s, n in sorted(tracks.items())) + f"; calibrations: {calibrations}")
    locked = locked_in_logs + locked_in_db + locked_in_ops
    out(f'"{LOCKED}" errors: {locked} (logs {locked_in_logs}, job and track errors {locked_in_db}, '
        f"driver and reader {locked_in_ops})")
    out(f"processes alive at the end: {alive} of {len(procs)}; exit codes after SIGTERM: {sorted(set(codes))}")
    worst, p99 = max(every_claim, default=0) * 1000, percentile(every_claim, 99) * 1000
    out(f"worst claim latency: {worst:.0f} ms; p99 claim latency: {p99:.0f} ms; over {ran:.0f} s")
    other_errors = [e for r in results for e in r.get("errors", []) if LOCKED not in e]
    if other_errors:
        out(f"other errors in the driver and reader ({len(other_errors)}): {other_errors[:5]}")
    summary.update(locked=locked, alive=alive, processes=len(procs), exit_codes=codes, worst_claim_ms=worst,
                   p99_claim_ms=p99, claims=len(every_claim), tracebacks=sum(r["traceback"] for r in results),
                   driver_ops=driver.get("ops", {}), reader_reads=len(reader.get("latencies", [])),
                   other_errors=other_errors, jobs={f"{q}:{s}": n for (q, s), n in jobs.items()}, tracks=tracks,
                   calibrations=calibrations, seconds=ran)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="How long the 16 processes work (default 5).")
    parser.add_argument("--seconds", type=float, default=None, help="The same in seconds (overrides --minutes).")
    parser.add_argument("--json", default=None, help="Also write the summary as JSON to this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the workspace (database, logs).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--number", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.number, Path(args.out))
        return 0
    summary = run(args.seconds if args.seconds is not None else args.minutes * 60, keep=args.keep)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    ok = summary["locked"] == 0 and summary["alive"] == summary["processes"] and not any(summary["exit_codes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
