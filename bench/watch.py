"""``python -m bench.watch``: how soon the watcher's new files are tagged, and what an idle watcher costs.

**Latency**, with real processes on a fresh SQLite database: ``run_watcher``,
one ``run_scanner`` and ``--taggers`` ``run_tagger --device cpu`` with the real
networks (installed once into ``var/bench-cache/models``, ``bench.tagger``;
``--stand-in`` uses ``bench.stand_in_tagger``, whose networks cost nothing, with
the same installed models).
Once every tagger's row says ``idle``, files are copied into the watched library
from demo clips (``make_demo_library``, ``--seconds`` long, cached):

- **single file**: one file into a known folder, ``--singles`` times, one at a time;
- **album**: ``--album-tracks`` files into a new folder, one after the other, ``--albums`` times
  (its first track and its last: the last waits for the taggers to get through the album).

The clock runs from the moment the copy finished (the last file's, for an album)
to the track's ``tagged_at`` (the album's last), read from the database; the
split is the targeted folder job's ``created_at``: **event → queued** (the settle
time, ``EARMARK_WATCH_SETTLE_SECONDS``, and the watcher's own work) and **queued →
tagged** (scanner and tagger). The target is 10 s from copy to tags.

**Idle cost**: a library of ``--idle-files`` empty files in folders of 100 (made
in a temporary directory), watched by ``run_watcher`` alone, with inotify and
then polled every ``--poll-seconds``: the CPU seconds the watcher used per minute
over ``--idle-seconds`` once it had started, the CPU its start took (Django, and the
walk that sets up the watches or the first stat walk), and its resident memory at the
end; beside an idle ``run_scanner`` (which polls the queue), as the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import ROOT, Procs, Workspace, connect, machine_note, manage, median, print_table, wait_until

CACHE = ROOT / "var" / "bench-cache"
TARGET_SECONDS = 10.0
TAGGER_IDLE = "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%:tag:%' AND value LIKE '%\"state\": \"idle\"%'"


def _utc(text: str | None) -> float | None:
    """A timestamp Django stored in SQLite (UTC text), as seconds since the epoch."""
    if not text:
        return None
    from datetime import datetime, timezone

    value = datetime.fromisoformat(str(text))
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered) + 0.5) - 1))]


def clips(count: int, seconds: float, ws: Workspace) -> list[Path]:
    """``count`` demo clips of ``seconds`` (mp3), made once and cached."""
    root = CACHE / f"watch-clips-{count}-{seconds:g}s"
    marker = Path(f"{root}.done")
    if not marker.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"making {count} clips in {root} (once; cached) ...", file=sys.stderr, flush=True)
        manage("make_demo_library", root, "--tracks", count, "--min-seconds", seconds, "--max-seconds", seconds,
               "--formats", "mp3", "--jobs", os.cpu_count() or 1, env=ws.env(ws.dir / "unused.sqlite3"), timeout=3600)
        marker.write_text("done")
    return sorted(p for p in root.rglob("*.mp3"))


def _library(env: dict, name: str, root: Path) -> None:
    manage("library", "add", name, root, "--no-scan", env=env)


def _tagged_at(conn, path: str) -> float | None:
    row = conn.execute("SELECT tagged_at FROM workers_track WHERE path = ? AND state = 'tagged'", (path,)).fetchone()
    return _utc(row[0]) if row else None


def _queued_at(conn, folder: str, after_id: int) -> float | None:
    """When the watcher's targeted job for ``folder`` (the first after job ``after_id``) was queued."""
    for created, payload in conn.execute("SELECT created_at, payload FROM workers_job WHERE queue = 'scan' "
                                         "AND key LIKE 'target:%' AND id > ? ORDER BY id", (after_id,)):
        if json.loads(payload).get("folder") == folder:
            return _utc(created)
    return None


def _last_job_id(conn) -> int:
    return conn.execute("SELECT COALESCE(MAX(id), 0) FROM workers_job").fetchone()[0]


def latency(args, ws: Workspace) -> list[list]:
    """Rows of the latency table: copy → queued, queued → tagged, copy → tagged, for singles and albums."""
    need = args.singles + args.albums * args.album_tracks
    sources = clips(max(need, 1), args.seconds, ws)
    db = ws.fresh_db()
    library = ws.dir / "library"
    (library / "Singles").mkdir(parents=True)
    from bench.tagger import models_dir

    env = ws.env(db, EARMARK_IDLE_POLL_SECONDS="0.05", EARMARK_TORCH_THREADS="1", EARMARK_MODELS_DIR=models_dir(),
                 EARMARK_WATCH_SETTLE_SECONDS=args.settle, EARMARK_LOG_LEVEL="INFO")
    _library(env, "bench", library)
    conn = connect(db)
    tagger = ("-m", "bench.stand_in_tagger") if args.stand_in else (str(ROOT / "manage.py"),)
    with Procs([["run_watcher"]], env, ws.log_dir, "watcher") as watcher, \
            Procs([["run_scanner"]], env, ws.log_dir, "scanner") as scanner, \
            Procs([["run_tagger", "--device", "cpu", "--number", n] for n in range(args.taggers)], env, ws.log_dir,
                  "tagger", program=tagger) as taggers:
        wait_until(lambda: conn.execute(TAGGER_IDLE).fetchone()[0] == args.taggers, timeout=600,
                   message="idle taggers", procs=taggers)
        wait_until(lambda: conn.execute("SELECT COUNT(*) FROM workers_job WHERE queue='scan' AND state IN "
                                        "('queued','running')").fetchone()[0] == 0
                   and conn.execute("SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'watch:%'").fetchone()[0],
                   timeout=120, message="the watcher's start-up scan", procs=watcher)
        rows, results = [], {"single file": [], "album, first track": [], "album, last track": []}
        pool = iter(sources)
        for i in range(args.singles):
            last = _last_job_id(conn)
            dest = library / "Singles" / f"{i:03d}.mp3"
            shutil.copyfile(next(pool), dest)
            done = time.time()
            tagged = wait_until(lambda: _tagged_at(conn, str(dest)), timeout=120, interval=0.02,
                                message=f"{dest} tagged", procs=taggers)
            results["single file"].append((done, _queued_at(conn, str(dest.parent), last), tagged))
        for a in range(args.albums):
            last = _last_job_id(conn)
            album = library / f"Album {a:02d}"
            album.mkdir()
            files = []
            for t in range(args.album_tracks):
                files.append(album / f"{t:02d}.mp3")
                shutil.copyfile(next(pool), files[-1])
            done = time.time()
            wait_until(lambda: all(_tagged_at(conn, str(f)) for f in files), timeout=600, interval=0.02,
                       message=f"{album} tagged", procs=taggers)
            queued, times = _queued_at(conn, str(album), last), [_tagged_at(conn, str(f)) for f in files]
            results["album, first track"].append((done, queued, min(times)))
            results["album, last track"].append((done, queued, max(times)))
            jobs = conn.execute("SELECT COUNT(*) FROM workers_job WHERE key LIKE 'target:%' AND id > ?",
                                (last,)).fetchone()[0]
            if jobs != 1:
                print(f"note: album {a} made {jobs} folder jobs", file=sys.stderr)
        for proc in (watcher, scanner, taggers):
            proc.check_exits(proc.terminate(60))
    for kind, runs in results.items():
        if not runs:
            continue
        queued = [q - d for d, q, _ in runs if q]
        tagged = [t - q for _, q, t in runs if q]
        total = [t - d for d, _, t in runs]
        rows.append([kind, len(runs), f"{median(queued):.2f}", f"{p95(queued):.2f}", f"{median(tagged):.2f}",
                     f"{p95(tagged):.2f}", f"{median(total):.2f}", f"{p95(total):.2f}",
                     "yes" if p95(total) <= TARGET_SECONDS else "no"])
    return rows


def _cpu_and_rss(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return cpu, rss


def make_idle_library(root: Path, files: int, per_folder: int = 100) -> int:
    """``files`` empty .mp3 files in folders of ``per_folder``, two levels deep; returns the folder count."""
    folders = 0
    for start in range(0, files, per_folder):
        folder = root / f"Artist {start // (per_folder * 10):04d}" / f"Album {start // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        folders += 1
        for n in range(start, min(files, start + per_folder)):
            (folder / f"{n:06d}.mp3").touch()
    return folders


def idle(args, ws: Workspace) -> list[list]:
    """Rows of the idle table: the watcher alone on a big library, with inotify and polled."""
    root = ws.dir / "idle-library"
    print(f"making {args.idle_files:,} empty files ...", file=sys.stderr, flush=True)
    folders = make_idle_library(root, args.idle_files)
    db = ws.fresh_db()
    with Procs([["run_scanner"]], ws.env(db), ws.log_dir, "idle-scanner") as scanner:
        conn = connect(db)
        wait_until(lambda: conn.execute("SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%:scan:%'")
                   .fetchone()[0], timeout=120, message="the scanner's row", procs=scanner)
        start_cpu, _ = _cpu_and_rss(scanner.procs[0].pid)
        time.sleep(min(args.idle_seconds, 10))
        end_cpu, rss = _cpu_and_rss(scanner.procs[0].pid)
        scanner.check_exits(scanner.terminate(60))
    rows = [["baseline: an idle run_scanner", "-", "-", f"{start_cpu:.2f}",
             f"{(end_cpu - start_cpu) * 60 / min(args.idle_seconds, 10):.3f}", f"{rss:.0f}"]]
    for mode in ("inotify", "poll"):
        db = ws.fresh_db()
        env = ws.env(db, EARMARK_WATCH_SCAN_ON_START="false")
        _library(env, "idle", root)
        conn = connect(db)
        if mode == "poll":
            conn.execute("UPDATE workers_library SET watch = 'poll', poll_seconds = ?", (args.poll_seconds,))
        with Procs([["run_watcher"]], env, ws.log_dir, f"idle-{mode}") as watcher:
            status = wait_until(lambda: conn.execute("SELECT value FROM workers_meta WHERE key LIKE 'watch:%'")
                                .fetchone(), timeout=600, message="the watcher's status", procs=watcher)
            value = json.loads(status[0])
            start_cpu, _ = _cpu_and_rss(watcher.procs[0].pid)
            time.sleep(args.idle_seconds)
            end_cpu, rss = _cpu_and_rss(watcher.procs[0].pid)
            watcher.check_exits(watcher.terminate(60))
        rows.append([f"{mode}" + (f" every {args.poll_seconds:g} s" if mode == "poll" else ""),
                     f"{args.idle_files:,}", f"{value.get('folders', folders):,}", f"{start_cpu:.2f}",
                     f"{(end_cpu - start_cpu) * 60 / args.idle_seconds:.3f}", f"{rss:.0f}"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--singles", type=int, default=10, help="single files copied in, one at a time")
    parser.add_argument("--albums", type=int, default=5, help="albums copied in, one at a time")
    parser.add_argument("--album-tracks", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--taggers", type=int, default=2, help="CPU taggers (supervisord's default without GPUs)")
    parser.add_argument("--settle", type=float, default=2.0, help="EARMARK_WATCH_SETTLE_SECONDS")
    parser.add_argument("--stand-in", action="store_true", help="networks that cost nothing (bench.stand_in_tagger)")
    parser.add_argument("--idle-files", type=int, default=100_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="the polled idle library's interval")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--no-idle", dest="idle", action="store_false")
    parser.add_argument("--keep", action="store_true", help="keep the workspace (logs, databases)")
    args = parser.parse_args(argv)
    with Workspace(prefix="earmark-bench-watch-", keep=args.keep) as ws:
        print(f"Watcher benchmark: {machine_note()}; settle {args.settle:g} s; workspace {ws.dir}")
        if args.latency:
            taggers = f"{args.taggers} CPU tagger(s), " + ("stand-in networks" if args.stand_in else "real networks")
            print_table(["copied in", "runs", "event->queued med", "p95", "queued->tagged med", "p95",
                         "event->tagged med", "p95", f"<= {TARGET_SECONDS:g} s"], latency(args, ws),
                        title=f"\nLatency, seconds ({args.seconds:g} s mp3 clips, albums of {args.album_tracks}; "
                              f"1 watcher, 1 scanner, {taggers})")
        if args.idle:
            print_table(["idle watcher", "files", "folders", "start CPU s", "CPU s per min", "RSS MB"], idle(args, ws),
                        title=f"\nIdle cost over {args.idle_seconds:g} s (the watcher process alone)")


if __name__ == "__main__":
    main()
