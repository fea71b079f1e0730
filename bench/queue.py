"""``python -m bench.queue``: how fast the job queue drains no-op jobs on SQLite.

Rows, each the median of ``--repeats`` runs on a fresh database:

- **earmark**: N ``manage.py run_noop_worker`` processes (the real worker
  runtime: one-statement batch claims, heartbeat thread, leases, batched
  completes). The workers start on an empty queue and the clock starts only
  once every worker's ``worker:*`` meta row says ``idle`` (Python and Django
  start-up excluded). Then the driver enqueues ``--jobs`` jobs in one
  transaction; the clock runs from its commit until no job is queued or
  running, polled every 2 ms with one cheap indexed query on a plain
  ``sqlite3`` connection. Every job must end ``done`` and, after SIGTERM,
  every worker must exit 0 and leave no meta row.
- **bare sqlite3**: the ceiling. One in-process ``sqlite3`` connection with
  the same pragmas runs Earmark's claim statement (same SQL shape, same
  indexes, same parameters) and its complete statement in a loop, at batch
  1 and batch 10 (the issue's) and at the workers' ``--batch``, with no
  runtime around them.
- **django-tasks-db**: N ``db_worker`` processes on the same workload (no-op
  tasks, ``CONN_MAX_AGE=None``, ``--interval 0.05``, no start-up delay,
  ``-v 0``), timed the same way (polled every 10 ms); a worker counts as
  started once it has the database file open.

Each repeat runs every row once (a noisy spell on a shared machine then
spreads over all rows), each run on its own fresh database.

Then the ratios the foundation issue asks for: Earmark at the most
processes against the 10,000 jobs/s target, django-tasks-db and the ceiling.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path

from bench.common import (Procs, Workspace, connect, fmt_rate, fmt_ratio, machine_note, median, print_table, rate,
                          scalar, setup_django, stopwatch, use_database, wait_until)

TARGET = 10_000
QUEUE = "tag"
DEFAULT_BATCH = 100
TASKSDB_SETTINGS = "bench.tasksdb_settings"


def tasksdb_available() -> bool:
    try:
        import django_tasks_db  # noqa: F401
    except ImportError:
        return False
    return True


# --- enqueueing through the real code, in the driver ---------------------------


def enqueue_earmark(db: Path, n: int) -> float:
    """``n`` jobs through ``queue.enqueue_many``, visible all at once (one transaction); returns when they were."""
    from django.db import transaction

    from workers.jobs import queue

    use_database(db)
    jobs = [queue.NewJob(key=f"bench:{i}") for i in range(n)]
    with transaction.atomic():
        created = queue.enqueue_many(QUEUE, jobs)
    visible = time.perf_counter()  # the commit
    use_database(db)  # close the driver's connection: it takes no part in the run
    assert created == n, f"enqueued {created} of {n}"
    return visible


def enqueue_tasksdb(db: Path, n: int) -> float:
    from django.db import transaction
    from django_tasks_db.models import DBTaskResult, get_date_max

    use_database(db)
    rows = [DBTaskResult(args_kwargs={"args": [], "kwargs": {}}, task_path="bench.tasksdb_tasks.noop",
                         queue_name="default", backend_name="default", priority=0, run_after=get_date_max())
            for _ in range(n)]
    with transaction.atomic():
        DBTaskResult.objects.bulk_create(rows, batch_size=500)
    visible = time.perf_counter()
    use_database(db)
    return visible


# --- measurements -------------------------------------------------------------


def earmark_run(ws: Workspace, n: int, procs: int, batch: int) -> tuple[float, float]:
    """Seconds (wall, workers' CPU) from the enqueue commit until ``n`` jobs are done, with ``procs`` workers."""
    db = ws.fresh_db()
    env = ws.env(db)
    args = [["run_noop_worker", QUEUE, "--batch", batch, "--number", i] for i in range(procs)]
    poll = connect(db)
    try:
        with Procs(args, env, ws.log_dir, f"earmark-{procs}p-b{batch}") as workers:
            wait_until(lambda: scalar(poll, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%' "
                                            "AND json_extract(value, '$.state') = 'idle'") == procs,
                       timeout=120, message=f"{procs} idle earmark workers", procs=workers)
            cpu0 = workers.cpu_seconds()
            visible = enqueue_earmark(db, n)
            wait_until(lambda: not scalar(poll, "SELECT EXISTS(SELECT 1 FROM workers_job WHERE queue = ? "
                                                "AND state IN ('queued', 'running'))", (QUEUE,)),
                       timeout=600, interval=0.002, message="the queue to drain", procs=workers)
            seconds = time.perf_counter() - visible
            cpu = workers.cpu_seconds() - cpu0
            workers.check_exits(workers.terminate())
        done = scalar(poll, "SELECT COUNT(*) FROM workers_job WHERE state = 'done'")
        left = scalar(poll, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%'")
    finally:
        poll.close()
    if done != n:
        raise RuntimeError(f"earmark: {done} of {n} jobs done")
    if left:
        raise RuntimeError(f"earmark: {left} worker rows left behind after SIGTERM")
    ws.drop_db(db)
    return seconds, cpu


def _has_open(pid: int, path: Path) -> bool:
    """True once process ``pid`` holds ``path`` open (a worker that has started polling)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(os.path.join(fd_dir, fd)) == str(path) for fd in os.listdir(fd_dir))
    except OSError:
        return False


def tasksdb_run(ws: Workspace, n: int, procs: int) -> tuple[float, float]:
    from django_tasks_db.models import DBTaskResult

    table = DBTaskResult._meta.db_table
    db = ws.fresh_db(TASKSDB_SETTINGS)
    env = ws.env(db, TASKSDB_SETTINGS)
    args = [["db_worker", "--queue-name", "default", "--interval", "0.05", "--no-startup-delay", "--no-reload",
             "--worker-id", f"bench-{i}", "-v", "0"] for i in range(procs)]
    poll = connect(db)
    try:
        with Procs(args, env, ws.log_dir, f"tasksdb-{procs}p") as workers:
            wait_until(lambda: all(_has_open(p.pid, db) for p in workers.procs), timeout=120,
                       message=f"{procs} db_worker processes", procs=workers)
            time.sleep(0.2)  # past the first poll
            cpu0 = workers.cpu_seconds()
            visible = enqueue_tasksdb(db, n)
            wait_until(lambda: not scalar(poll, f"SELECT EXISTS(SELECT 1 FROM {table} "
                                                "WHERE status IN ('READY', 'RUNNING'))"),
                       timeout=900, message="the task queue to drain", procs=workers)
            seconds = time.perf_counter() - visible
            cpu = workers.cpu_seconds() - cpu0
            workers.check_exits(workers.terminate())
        done = scalar(poll, f"SELECT COUNT(*) FROM {table} WHERE status = 'SUCCESSFUL'")
    finally:
        poll.close()
    if done != n:
        raise RuntimeError(f"django-tasks-db: {done} of {n} tasks successful")
    ws.drop_db(db)
    return seconds, cpu


def _ts(dt: datetime) -> str:
    """A timestamp as Django stores it in SQLite (naive UTC text)."""
    return str(dt.astimezone(dt_timezone.utc).replace(tzinfo=None))


def bare_run(ws: Workspace, n: int, batch: int) -> tuple[float, float]:
    """The ceiling: Earmark's claim and complete statements in a tight in-process loop."""
    from workers.jobs.dialect import SQLITE_INIT

    db = ws.fresh_db()
    enqueue_earmark(db, n)
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    for pragma in filter(None, SQLITE_INIT.split(";")):
        conn.execute(pragma)
    claim_sql = (
        "UPDATE workers_job SET state = 'running', claimed_by = ?, boot_id = ?, lease_expires = ?, "
        "attempts = attempts + 1, started_at = ? "
        "WHERE id IN (SELECT id FROM workers_job WHERE queue = ? AND state = 'queued' AND run_after <= ? "
        "AND NOT EXISTS (SELECT 1 FROM workers_meta WHERE key = ?) "
        "ORDER BY priority, id LIMIT ?) "
        "RETURNING id, queue, key, payload, track_id, library_id, attempts, max_attempts"
    )
    worker, boot, paused = "worker:bench:tag:0", "0123456789abcdef", f"queue:{QUEUE}:paused"
    total = 0
    cpu0 = time.process_time()
    with stopwatch() as elapsed:
        while True:
            now = datetime.now(dt_timezone.utc)
            rows = conn.execute(claim_sql, (worker, boot, _ts(now + timedelta(seconds=300)), _ts(now), QUEUE,
                                            _ts(now), paused, batch)).fetchall()
            if not rows:
                break
            ids = [r[0] for r in rows]
            conn.execute(
                "UPDATE workers_job SET state = 'done', finished_at = ?, lease_expires = NULL, last_error = '' "
                f"WHERE id IN ({', '.join('?' * len(ids))}) AND state = 'running' AND claimed_by = ?",
                (_ts(datetime.now(dt_timezone.utc)), *ids, worker),
            )
            total += len(ids)
    seconds, cpu = elapsed(), time.process_time() - cpu0
    done = scalar(conn, "SELECT COUNT(*) FROM workers_job WHERE state = 'done'")
    conn.close()
    if total != n or done != n:
        raise RuntimeError(f"bare loop: {done} of {n} done")
    ws.drop_db(db)
    return seconds, cpu


# --- the report -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite",
                   help="postgres: the PostgreSQL benchmark (bench.queue_postgres; its own options)")
    p.add_argument("--procs", default="1,2,4", help="worker process counts (comma-separated)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"Earmark worker --batch (jobs per claim; default {DEFAULT_BATCH})")
    p.add_argument("--sweep", default="", help="also try these batch sizes at the most processes, e.g. 10,50,200")
    p.add_argument("--tasksdb-procs", default=None, help="django-tasks-db process counts (default: --procs)")
    p.add_argument("--no-tasksdb", action="store_true", help="skip the django-tasks-db anchor")
    p.add_argument("--keep", action="store_true", help="keep the temporary databases and worker logs")
    args, _ = p.parse_known_args(argv)
    if args.db == "postgres":  # before Django is set up here: that module points Django at PostgreSQL itself
        from bench import queue_postgres

        return queue_postgres.main(argv)
    args = p.parse_args(argv)

    procs_list = [int(x) for x in args.procs.split(",") if x]
    tasksdb_procs = [int(x) for x in (args.tasksdb_procs or args.procs).split(",") if x]
    n, reps = args.jobs, args.repeats
    setup_django(TASKSDB_SETTINGS if tasksdb_available() else "project.settings")
    have_tasksdb = tasksdb_available() and not args.no_tasksdb

    print(f"bench.queue: {n:,} no-op jobs, {reps} repeat(s), SQLite; {machine_note()}", flush=True)
    # Each repeat runs every configuration once, so that a noisy spell on a shared
    # machine spreads over all rows instead of sinking one of them.
    configs: list[tuple[str, str, object, object, object]] = []  # (key, label, procs, batch, run)
    for procs in procs_list:
        configs.append((f"earmark-{procs}", "earmark run_noop_worker", procs, args.batch,
                        lambda ws, procs=procs: earmark_run(ws, n, procs, args.batch)))
    for batch in [int(x) for x in args.sweep.split(",") if x and int(x) != args.batch]:
        configs.append((f"earmark-{max(procs_list)}-b{batch}", "earmark run_noop_worker", max(procs_list), batch,
                        lambda ws, batch=batch: earmark_run(ws, n, max(procs_list), batch)))
    bare_batches = sorted({1, 10, args.batch})  # the issue's two, and the workers' own batch size
    for batch in bare_batches:
        configs.append((f"bare-{batch}", "bare sqlite3 claim+complete", "1 (in-process)", batch,
                        lambda ws, batch=batch: bare_run(ws, n, batch)))
    if have_tasksdb:
        for procs in tasksdb_procs:
            configs.append((f"tasksdb-{procs}", "django-tasks-db db_worker", procs, 1,
                            lambda ws, procs=procs: tasksdb_run(ws, n, procs)))
    runs: dict[str, list[float]] = {key: [] for key, *_ in configs}
    cpu: dict[str, list[float]] = {key: [] for key, *_ in configs}  # CPU microseconds per job
    with Workspace(keep=args.keep) as ws:
        if args.keep:
            print(f"workspace: {ws.dir}")
        for rep in range(reps):
            for key, label, procs, batch, run in configs:
                seconds, cpu_seconds = run(ws)
                runs[key].append(rate(n, seconds))
                cpu[key].append(cpu_seconds / n * 1e6)
                print(f"  [{rep + 1}/{reps}] {label}, {procs} proc, batch {batch}: {fmt_rate(runs[key][-1])} jobs/s, "
                      f"{cpu[key][-1]:.0f} us CPU/job", file=sys.stderr, flush=True)

    rows = [[label, procs, batch, " ".join(fmt_rate(r) for r in runs[key]), fmt_rate(median(runs[key])),
             f"{median(cpu[key]):,.0f}"] for key, label, procs, batch, _ in configs]
    if not have_tasksdb:
        rows.append(["django-tasks-db db_worker", "-", "-", "skipped (not installed or --no-tasksdb)", "-", "-"])
    medians = {key: median(r) for key, r in runs.items()}
    print()
    print_table(["queue", "procs", "batch", "runs (jobs/s)", "median jobs/s", "CPU us/job"], rows,
                title=f"Draining {n:,} no-op jobs (median of {reps}; CPU: all worker processes, heartbeats included)")

    top = max(procs_list)
    ours = medians[f"earmark-{top}"]

    def paired(other: str) -> float:
        """The median over repeats of the ratio within each repeat (robust to slow spells)."""
        return median([a / b for a, b in zip(runs[f"earmark-{top}"], runs[other])])

    tasksdb = {k: v for k, v in medians.items() if k.startswith("tasksdb-")}
    ratio_rows = [[f"earmark {top} proc vs target {TARGET:,} jobs/s", fmt_ratio(ours / TARGET),
                   "met" if ours >= TARGET else "NOT met"]]
    if tasksdb:
        best_key = max(tasksdb, key=tasksdb.get)
        ratio_rows.append([f"earmark {top} proc vs django-tasks-db best ({best_key.split('-')[1]} proc)",
                           fmt_ratio(ours / tasksdb[best_key]), ""])
        if f"tasksdb-{top}" in tasksdb:
            ratio_rows.append([f"earmark {top} proc vs django-tasks-db {top} proc", fmt_ratio(paired(f"tasksdb-{top}")),
                               ""])
    else:
        ratio_rows.append(["earmark vs django-tasks-db", "-", "skipped"])
    for batch in bare_batches:
        ratio_rows.append([f"earmark {top} proc vs bare sqlite3 batch {batch}", fmt_ratio(paired(f"bare-{batch}")), ""])
    print()
    print_table(["ratio", "value", ""], ratio_rows,
                title=f"Ratios (earmark workers at --batch {args.batch}; against anchors: median of per-repeat ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
