"""``python -m bench.scan``: how fast scanner workers read a library, first time and unchanged.

The library is a demo library of ``--files`` short clips (``make_demo_library``,
about ten files per album folder, every format), made once and cached under
``var/bench-cache/`` keyed by its size and clip length. Rows, each the median of
``--repeats`` runs:

- **first scan** with N ``manage.py run_scanner --exit-when-idle`` processes on
  a fresh database, and then an **unchanged rescan** on that same database.
  The scan queue is paused, the scan requested, and the workers started; once
  every worker's meta row says ``idle`` (Python and Django start-up excluded),
  the queue is resumed and the clock runs from that commit until the scan's
  progress row says ``done`` (the finalize job has run), polled every 5 ms.
  Then the workers must exit 0 on their own and every file must be accounted
  for (first scan: all new; rescan: none read).
- **bare mutagen.File loop**: ``mutagen.File(path, easy=True)`` over the same
  files, warm page cache, in 1 and N processes (the first-scan ceiling).
- **bare os.scandir + stat loop**: walk the tree and ``stat`` every audio file,
  one process (the rescan ceiling).

Targets (foundation issue): first scan at least 50% of the mutagen ceiling
per process, read here as Earmark with N processes against the bare loop in
N processes (both share the same cores); unchanged rescan at least 20,000
files/s. Each repeat measures the ceilings beside Earmark's runs and the
ratios are medians of per-repeat ratios, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from bench.common import (ROOT, Procs, Workspace, connect, fmt_rate, fmt_ratio, machine_note, manage, median,
                          print_table, rate, scalar, setup_django, stopwatch, use_database, wait_until)

CACHE = ROOT / "var" / "bench-cache"
FIRST_SCAN_TARGET = 0.5
RESCAN_TARGET = 20_000


# --- the library ------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:g}"


def ensure_library(files: int, min_s: float, max_s: float, ws: Workspace) -> Path:
    """The cached demo library of ``files`` clips, made on first use (a marker file says it is complete)."""
    root = CACHE / f"demo-{files}-{_num(min_s)}-{_num(max_s)}s"
    marker = Path(f"{root}.done")
    if marker.exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"making the demo library {root} (once; cached) ...", file=sys.stderr, flush=True)
    out = manage("make_demo_library", root, "--tracks", files, "--min-seconds", min_s, "--max-seconds", max_s,
                 "--jobs", os.cpu_count() or 1, env=ws.env(ws.dir / "unused.sqlite3"), timeout=6 * 3600)
    marker.write_text(out.stdout)
    return root


def audio_files(root: Path) -> list[bytes]:
    """Every audio file under ``root`` by extension, as the scanner sees them (bytes paths)."""
    from workers.audio.formats import format_for_path

    out, stack = [], [os.fsencode(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif format_for_path(entry.name) and entry.is_file(follow_symlinks=False):
                    out.append(entry.path)
    return sorted(out)


# --- the ceilings -------------------------------------------------------------------


def _mutagen_loop(paths: list[bytes]) -> tuple[int, float]:
    """Files read and the CPU seconds it took."""
    import mutagen

    n, cpu = 0, time.process_time()
    for p in paths:
        if mutagen.File(p, easy=True) is not None:
            n += 1
    return n, time.process_time() - cpu


def bare_mutagen(paths: list[bytes], procs: int) -> tuple[float, float]:
    """Seconds (wall, CPU) for ``mutagen.File`` over every file, split across ``procs`` forked processes."""
    if procs == 1:
        with stopwatch() as elapsed:
            read, cpu = _mutagen_loop(paths)
        seconds = elapsed()
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.map(abs, range(procs))  # the processes are up before the clock starts
            chunks = [paths[i::procs] for i in range(procs)]
            with stopwatch() as elapsed:
                results = pool.map(_mutagen_loop, chunks, chunksize=1)
            seconds = elapsed()
        read, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
    if read != len(paths):
        raise RuntimeError(f"mutagen read {read} of {len(paths)} files")
    return seconds, cpu


def bare_scandir(root: Path, expected: int) -> float:
    """Seconds to walk the tree with ``os.scandir`` and ``stat`` every audio file."""
    from workers.audio.formats import format_for_path

    with stopwatch() as elapsed:
        n, stack = 0, [os.fsencode(root)]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif format_for_path(entry.name):
                        os.stat(entry.path)
                        n += 1
    seconds = elapsed()
    if n != expected:
        raise RuntimeError(f"scandir saw {n} of {expected} files")
    return seconds


# --- Earmark's scanner ---------------------------------------------------------------


def add_library(db: Path, root: Path) -> int:
    from workers.library.libraries import add_library as add

    use_database(db)
    lib_id = add("bench", str(root)).id
    use_database(db)
    return lib_id


def earmark_scan(ws: Workspace, db: Path, lib_id: int, procs: int, expected: int, first: bool) -> tuple[float, float]:
    """Seconds (wall, workers' CPU) from the moment the scan request becomes claimable until the scan is done."""
    from workers.jobs import queue
    from workers.library import scan
    from workers.models import Library

    use_database(db)
    queue.pause("scan")
    scan.request_scan(Library.objects.get(id=lib_id))
    previous = scan.progress(Library.objects.get(id=lib_id)).get("gen", 0)
    use_database(db)
    env = ws.env(db)
    args = [["run_scanner", "--exit-when-idle", "--number", i] for i in range(procs)]
    poll = connect(db)
    progress_key = scan.progress_key(lib_id)
    state_sql = ("SELECT json_extract(value, '$.state'), json_extract(value, '$.gen') FROM workers_meta WHERE key = ?")

    def scan_done() -> bool:
        row = poll.execute(state_sql, (progress_key,)).fetchone()
        if row and row[1] and row[1] > previous and row[0] == "failed":
            raise RuntimeError(f"the scan failed: {scalar(poll, 'SELECT value FROM workers_meta WHERE key = ?', (progress_key,))}")
        return bool(row and row[1] and row[1] > previous and row[0] == "done")

    label = f"scan-{'first' if first else 'rescan'}-{procs}p"
    try:
        with Procs(args, env, ws.log_dir, label) as workers:
            wait_until(lambda: scalar(poll, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%' "
                                            "AND json_extract(value, '$.state') = 'idle'") == procs,
                       timeout=120, message=f"{procs} idle scanner workers", procs=workers)
            cpu0 = workers.cpu_seconds()
            use_database(db)
            queue.resume("scan")  # an autocommit DELETE: the request is claimable from here
            visible = time.perf_counter()
            use_database(db)
            wait_until(scan_done, timeout=1800, interval=0.005, message="the scan to finish", procs=workers)
            seconds = time.perf_counter() - visible
            cpu = workers.cpu_seconds() - cpu0
            workers.check_exits(workers.wait(timeout=120))  # --exit-when-idle: they leave on their own
        value = json.loads(scalar(poll, "SELECT value FROM workers_meta WHERE key = ?", (progress_key,)))
        tracks = scalar(poll, "SELECT COUNT(*) FROM workers_track WHERE library_id = ? AND state = 'scanned'", (lib_id,))
    finally:
        poll.close()
    if value.get("files_seen") != expected or tracks != expected:
        raise RuntimeError(f"{label}: saw {value.get('files_seen')} files, {tracks} scanned tracks, expected {expected}: {value}")
    if first and value.get("new") != expected:
        raise RuntimeError(f"{label}: {value.get('new')} new of {expected}: {value}")
    if not first and value.get("files_read"):
        raise RuntimeError(f"{label}: an unchanged rescan read {value.get('files_read')} files: {value}")
    return seconds, cpu


# --- the report ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs", default="1,2,4", help="scanner process counts (comma-separated)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest demo clip")
    p.add_argument("--max-seconds", type=float, default=2.0, help="longest demo clip")
    p.add_argument("--keep", action="store_true", help="keep the temporary databases and worker logs")
    args = p.parse_args(argv)
    procs_list = [int(x) for x in args.procs.split(",") if x]
    reps = args.repeats
    setup_django()

    with Workspace(keep=args.keep) as ws:
        if args.keep:
            print(f"workspace: {ws.dir}")
        root = ensure_library(args.files, args.min_seconds, args.max_seconds, ws)
        paths = audio_files(root)
        n = len(paths)
        folders = len({os.path.dirname(p) for p in paths})
        print(f"bench.scan: {n:,} files in {folders:,} album folders ({root}), {reps} repeat(s); {machine_note()}",
              flush=True)
        _mutagen_loop(paths)  # warm the page cache (and mutagen's imports) before anything is timed

        mutagen_procs = sorted({1, *procs_list})
        first: dict[int, list[float]] = {k: [] for k in procs_list}
        rescan: dict[int, list[float]] = {k: [] for k in procs_list}
        ceiling: dict[int, list[float]] = {k: [] for k in mutagen_procs}
        cpu: dict[str, list[float]] = {}  # CPU microseconds per file, by row
        walk: list[float] = []

        def record(key: str, runs: list, timed: tuple[float, float]) -> float:
            runs.append(rate(n, timed[0]))
            cpu.setdefault(key, []).append(timed[1] / n * 1e6)
            return runs[-1]

        # Each repeat measures the ceilings right beside Earmark's runs, so that a
        # noisy spell on a shared machine weighs on both sides of each ratio.
        for rep in range(reps):
            for k in mutagen_procs:
                record(f"mutagen-{k}", ceiling[k], bare_mutagen(paths, k))
            with stopwatch() as elapsed:
                cpu0 = time.process_time()
                bare_scandir(root, n)
                timed = (elapsed(), time.process_time() - cpu0)
            record("walk", walk, timed)
            for procs in procs_list:
                db = ws.fresh_db()
                lib_id = add_library(db, root)
                record(f"first-{procs}", first[procs], earmark_scan(ws, db, lib_id, procs, n, first=True))
                record(f"rescan-{procs}", rescan[procs], earmark_scan(ws, db, lib_id, procs, n, first=False))
                ws.drop_db(db)
                print(f"  [{rep + 1}/{reps}] {procs} proc: first scan {fmt_rate(first[procs][-1])} files/s "
                      f"(mutagen {fmt_rate(ceiling[procs][-1])}), rescan {fmt_rate(rescan[procs][-1])} files/s",
                      file=sys.stderr, flush=True)

    rows: list[list] = []

    def add(label, procs, runs, key):
        rows.append([label, procs, " ".join(fmt_rate(r) for r in runs), fmt_rate(median(runs)),
                     f"{median(cpu[key]):,.0f}"])
        return median(runs)

    for k in procs_list:
        add("earmark first scan", k, first[k], f"first-{k}")
    m_rescan = {k: add("earmark unchanged rescan", k, rescan[k], f"rescan-{k}") for k in procs_list}
    for k in mutagen_procs:
        add("bare mutagen.File loop", k, ceiling[k], f"mutagen-{k}")
    m_walk = add("bare os.scandir+stat loop", 1, walk, "walk")
    print()
    print_table(["scan", "procs", "runs (files/s)", "median files/s", "CPU us/file"], rows,
                title=f"Scanning {n:,} files, ~{n / max(1, folders):.0f} per folder (median of {reps}; "
                      "CPU: all processes, workers' heartbeat threads included)")

    ratio_rows = []
    for k in procs_list:
        share = median([a / b for a, b in zip(first[k], ceiling[k])])
        ratio_rows.append([f"first scan {k} proc vs mutagen {k} proc", fmt_ratio(share),
                           "met" if share >= FIRST_SCAN_TARGET else "NOT met"])
    for k in procs_list:
        ratio_rows.append([f"first scan {k} proc vs mutagen, CPU per file", fmt_ratio(
            median([b / a for a, b in zip(cpu[f"first-{k}"], cpu[f"mutagen-{k}"])])), ""])
    best = max(procs_list, key=lambda k: m_rescan[k])
    ratio_rows.append([f"rescan best ({best} proc) vs target {RESCAN_TARGET:,} files/s",
                       fmt_ratio(m_rescan[best] / RESCAN_TARGET), "met" if m_rescan[best] >= RESCAN_TARGET else "NOT met"])
    ratio_rows.append([f"rescan best ({best} proc) vs bare scandir+stat", fmt_ratio(m_rescan[best] / m_walk), ""])
    print()
    print_table(["ratio", "value", ""], ratio_rows,
                title=f"Ratios (median of per-repeat ratios; targets: first scan >= {FIRST_SCAN_TARGET:.0%} of a bare "
                      f"mutagen loop in as many processes; rescan >= {RESCAN_TARGET:,} files/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
