"""``python -m bench.queue --db postgres``: how fast the job queue drains no-op jobs on PostgreSQL.

Everything runs on one PostgreSQL server with its default durability
(``synchronous_commit=on``, ``fsync=on``): a throwaway one started by
``tests/pg.py`` in a temporary folder, or the one ``--database-url`` names
(its user must be allowed to create databases). Each measurement gets a
database of its own, copied from a template migrated once. Rows, each the
median of ``--repeats`` runs:

- **earmark**: N ``manage.py run_noop_worker`` processes (the real runtime:
  one-statement ``FOR UPDATE SKIP LOCKED`` batch claims, heartbeat thread,
  leases, batched completes, LISTEN for wake-ups). The clock starts at the
  commit of one transaction that enqueues ``--jobs`` jobs, once every worker
  says ``idle``, and stops when no job is queued or running (polled every
  10 ms on a separate psycopg connection).
- **bare SKIP LOCKED**: the ceiling. ``--bare-procs`` processes, each one
  psycopg connection in autocommit, loop over Earmark's claim statement and
  its complete statement at batch 1 and batch 10, with nothing around them.
- **procrastinate**: N ``procrastinate`` worker processes (the Python anchor;
  LISTEN/NOTIFY on, a no-op task), timed the same way from the commit of one
  batch defer of ``--jobs`` jobs.
- **idle start latency**: with ``--latency-procs`` idle Earmark workers and a
  10 s idle poll (so only a notification can explain a quick start), one job
  at a time is enqueued; the latency runs from just before the enqueue to the
  claim that starts it (the job's ``started_at``). p50 and p95 over
  ``--latency-samples`` jobs.

Targets (issue 7): at 4 processes ≥ 5,000 jobs/s and ≥ 7× procrastinate; p95
idle start latency ≤ 50 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
import time
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path
from urllib.parse import quote

from bench.common import (Procs, Workspace, fmt_rate, fmt_ratio, machine_note, manage, median, print_table, rate,
                          setup_django, stopwatch, use_database, wait_until)

TARGET = 5_000
PROCRASTINATE_RATIO_TARGET = 7.0
LATENCY_TARGET_S = 0.050
QUEUE = "tag"
DEFAULT_BATCH = 100
PROCRASTINATE_QUEUE = "bench"

CLAIM_SQL = (
    "UPDATE workers_job SET state = 'running', claimed_by = %s, boot_id = %s, lease_expires = %s, "
    "attempts = attempts + 1, started_at = %s "
    "WHERE id IN (SELECT id FROM workers_job WHERE queue = %s AND state = 'queued' AND run_after <= %s "
    "AND NOT EXISTS (SELECT 1 FROM workers_meta WHERE key = %s) "
    "ORDER BY priority, id LIMIT %s FOR UPDATE SKIP LOCKED) "
    "RETURNING id, queue, key, payload, track_id, library_id, attempts, max_attempts"
)


# --- the server and its databases -------------------------------------------------------


class PgDatabases:
    """One PostgreSQL server (throwaway or given) and fresh databases copied from migrated templates."""

    def __init__(self, url: str | None = None):
        self.server = None
        if url is None:
            from tests.pg import PostgresServer

            self.server = PostgresServer().start()  # default durability: synchronous_commit=on
            url = self.server.url("postgres")
        import environ

        self.base = environ.Env.db_url_config(url)
        self.templates: dict[str, str] = {}
        self.count = 0

    def url(self, name: str) -> str:
        """A ``DATABASE_URL`` for database ``name`` on this server (for worker processes)."""
        b = self.base
        auth = quote(b["USER"], safe="") + (f":{quote(b['PASSWORD'], safe='')}" if b.get("PASSWORD") else "")
        return f"postgres://{auth}@{b['HOST']}:{b['PORT']}/{name}"

    def conninfo(self, name: str) -> str:
        """A libpq connection string for database ``name`` (for psycopg and procrastinate)."""
        from psycopg.conninfo import make_conninfo

        b = self.base
        parts = {"host": b["HOST"], "port": b["PORT"], "user": b["USER"], "password": b.get("PASSWORD"), "dbname": name}
        return make_conninfo(**{k: v for k, v in parts.items() if v not in (None, "")})

    def _admin(self, sql: str, *names: str) -> None:
        import psycopg
        from psycopg import sql as pgsql

        with psycopg.connect(self.conninfo(self.base["NAME"] or "postgres"), autocommit=True) as conn:
            conn.execute(pgsql.SQL(sql).format(*map(pgsql.Identifier, names)))

    def template(self, kind: str, ws: Workspace) -> str:
        """A database with Earmark's schema (``earmark``) or procrastinate's (``procrastinate``), made once."""
        if kind not in self.templates:
            name = f"bench_template_{kind}_{os.getpid()}"
            self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
            self._admin("CREATE DATABASE {}", name)
            if kind == "earmark":
                manage("migrate", "--noinput", env=ws.env(Path("unused"), DATABASE_URL=self.url(name)))
            else:
                app = procrastinate_app(self.conninfo(name), sync=True)
                with app.open():
                    app.schema_manager.apply_schema()
            self.templates[kind] = name
        return self.templates[kind]

    def fresh(self, kind: str, ws: Workspace) -> str:
        template = self.template(kind, ws)
        self.count += 1
        name = f"bench_{kind}_{os.getpid()}_{self.count}"
        self._admin("CREATE DATABASE {} TEMPLATE {}", name, template)
        return name

    def drop(self, name: str) -> None:
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.conninfo(self.base["NAME"] or "postgres")) as conn:
            return conn.execute("SHOW server_version").fetchone()[0].split()[0]

    def close(self) -> None:
        for name in self.templates.values():
            self.drop(name)
        if self.server is not None:
            self.server.stop()


def poller(pg: PgDatabases, name: str):
    """A plain autocommit connection for the driver's polls (cheap, no Django)."""
    import psycopg

    return psycopg.connect(pg.conninfo(name), autocommit=True)


def scalar(conn, sql: str, params=()) -> object:
    """The first column of the first row, or None when there is no row."""
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


# --- Earmark ---------------------------------------------------------------------------------


def enqueue_earmark(name: str, n: int, key_prefix: str = "bench") -> None:
    """``n`` jobs through ``queue.enqueue_many``, in one transaction (one commit, one notification)."""
    from workers.jobs import queue

    use_database(name)
    created = queue.enqueue_many(QUEUE, [queue.NewJob(key=f"{key_prefix}:{i}") for i in range(n)])
    assert created == n, f"enqueued {created} of {n}"


def idle_workers(conn) -> int:
    return scalar(conn, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%%' AND value->>'state' = 'idle'")


def start_earmark_workers(pg: PgDatabases, ws: Workspace, name: str, procs: int, batch: int, label: str,
                          **env_extra) -> Procs:
    env = ws.env(Path("unused"), DATABASE_URL=pg.url(name), **env_extra)
    args = [["run_noop_worker", QUEUE, "--batch", batch, "--number", i] for i in range(procs)]
    return Procs(args, env, ws.log_dir, label)


def earmark_run(pg: PgDatabases, ws: Workspace, n: int, procs: int, batch: int) -> float:
    """Seconds from the enqueue commit until ``n`` jobs are done, with ``procs`` workers."""
    name = pg.fresh("earmark", ws)
    conn = poller(pg, name)
    try:
        with start_earmark_workers(pg, ws, name, procs, batch, f"pg-earmark-{procs}p-b{batch}") as workers:
            wait_until(lambda: idle_workers(conn) == procs, timeout=120, message=f"{procs} idle workers",
                       procs=workers)
            with stopwatch() as elapsed:
                enqueue_earmark(name, n)
                wait_until(lambda: not scalar(conn, "SELECT EXISTS(SELECT 1 FROM workers_job WHERE queue = %s "
                                                    "AND state IN ('queued', 'running'))", (QUEUE,)),
                           timeout=600, message="the queue to drain", procs=workers)
            seconds = elapsed()
            workers.check_exits(workers.terminate())
        done = scalar(conn, "SELECT COUNT(*) FROM workers_job WHERE state = 'done'")
        left = scalar(conn, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%%'")
    finally:
        conn.close()
        use_database("postgres")  # the driver lets go of the database before it is dropped
    pg.drop(name)
    if done != n or left:
        raise RuntimeError(f"earmark: {done} of {n} jobs done, {left} worker rows left after SIGTERM")
    return seconds


def start_latencies(pg: PgDatabases, ws: Workspace, procs: int, samples: int) -> list[float]:
    """Seconds from just before each enqueue to the claim that starts the job, one job at a time."""
    from workers.jobs import queue

    name = pg.fresh("earmark", ws)
    conn = poller(pg, name)
    out = []
    try:
        with start_earmark_workers(pg, ws, name, procs, 1, f"pg-latency-{procs}p",
                                   EARMARK_IDLE_POLL_SECONDS=10) as workers:
            wait_until(lambda: idle_workers(conn) == procs, timeout=120, message=f"{procs} idle workers",
                       procs=workers)
            use_database(name)
            queue.has_pending(QUEUE)  # the driver's connection is open before the clock runs
            time.sleep(0.5)  # past each worker's first claim after it began to listen
            for i in range(samples):
                before = datetime.now(dt_timezone.utc)
                queue.enqueue(QUEUE, f"latency-{i}")
                started = wait_until(
                    lambda: scalar(conn, "SELECT started_at FROM workers_job WHERE key = %s AND state = 'done'",
                                   (f"latency-{i}",)),
                    timeout=30, interval=0.001, message=f"latency job {i}", procs=workers)
                out.append((started - before).total_seconds())
                time.sleep(0.02)
            workers.check_exits(workers.terminate())
    finally:
        conn.close()
        use_database("postgres")
    pg.drop(name)
    return out


# --- the ceiling: a bare SKIP LOCKED loop -----------------------------------------------------------


def _bare_loop(conninfo: str, batch: int, number: int, go, counts) -> None:
    """One process of the ceiling: Earmark's claim and complete statements, nothing else."""
    import psycopg

    worker, boot, paused = f"worker:bare:{QUEUE}:{number}", "0123456789abcdef", f"queue:{QUEUE}:paused"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        go.wait()
        total = 0
        while True:
            now = datetime.now(dt_timezone.utc)
            ids = [r[0] for r in conn.execute(CLAIM_SQL, (worker, boot, now + timedelta(seconds=300), now, QUEUE,
                                                          now, paused, batch)).fetchall()]
            if not ids:
                break
            conn.execute(
                "UPDATE workers_job SET state = 'done', finished_at = %s, lease_expires = NULL, last_error = '' "
                f"WHERE state = 'running' AND claimed_by = %s AND id IN ({', '.join(['%s'] * len(ids))})",
                (datetime.now(dt_timezone.utc), worker, *ids))
            total += len(ids)
    counts.put(total)


def bare_run(pg: PgDatabases, ws: Workspace, n: int, procs: int, batch: int) -> float:
    name = pg.fresh("earmark", ws)
    enqueue_earmark(name, n)
    use_database("postgres")
    ctx = multiprocessing.get_context("spawn")
    go, counts = ctx.Event(), ctx.Queue()
    loops = [ctx.Process(target=_bare_loop, args=(pg.conninfo(name), batch, i, go, counts)) for i in range(procs)]
    for p in loops:
        p.start()
    time.sleep(1.0)  # every process connected and waiting
    with stopwatch() as elapsed:
        go.set()
        total = sum(counts.get(timeout=600) for _ in loops)
    seconds = elapsed()
    for p in loops:
        p.join(30)
    pg.drop(name)
    if total != n:
        raise RuntimeError(f"bare loop: {total} of {n} done")
    return seconds


# --- the anchor: procrastinate -------------------------------------------------------------------------


def procrastinate_app(conninfo: str, sync: bool = False):
    """A procrastinate app with one no-op task (async, as procrastinate's own examples write them)."""
    import procrastinate

    # Made inside a function on purpose; under ``python -m`` it warns that this module is __main__.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)

    connector = (procrastinate.SyncPsycopgConnector if sync else procrastinate.PsycopgConnector)(conninfo=conninfo)
    app = procrastinate.App(connector=connector)

    @app.task(name="noop", queue=PROCRASTINATE_QUEUE)
    async def noop():
        return None

    return app


def procrastinate_worker(conninfo: str, concurrency: int) -> None:
    """The body of one procrastinate worker process (started by ``procrastinate_run``)."""
    app = procrastinate_app(conninfo)

    async def run():
        async with app.open_async():
            await app.run_worker_async(queues=[PROCRASTINATE_QUEUE], concurrency=concurrency, wait=True,
                                       listen_notify=True)

    asyncio.run(run())


def procrastinate_available() -> bool:
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        return False
    return True


def _defer_procrastinate(conninfo: str, n: int) -> None:
    app = procrastinate_app(conninfo, sync=True)
    with app.open():
        task = app.tasks["noop"]
        for start in range(0, n, 5000):  # one transaction per call; two calls for 10,000 jobs
            task.batch_defer(*[{} for _ in range(min(5000, n - start))])


def procrastinate_run(pg: PgDatabases, ws: Workspace, n: int, procs: int, concurrency: int) -> float:
    import subprocess

    name = pg.fresh("procrastinate", ws)
    conn = poller(pg, name)
    env = ws.env(Path("unused"), DATABASE_URL=pg.url(name))
    workers: list[subprocess.Popen] = []
    try:
        for i in range(procs):
            log = open(ws.log_dir / f"procrastinate-{procs}p-{i}.log", "wb")
            code = ("from bench.queue_postgres import procrastinate_worker; "
                    f"procrastinate_worker({pg.conninfo(name)!r}, {concurrency})")
            workers.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=Path(__file__).resolve().parent.parent))
        wait_until(lambda: scalar(conn, "SELECT COUNT(*) FROM procrastinate_workers") == procs, timeout=120,
                   message=f"{procs} procrastinate workers")
        time.sleep(0.3)  # past their first fetch
        with stopwatch() as elapsed:
            _defer_procrastinate(pg.conninfo(name), n)
            wait_until(lambda: not scalar(conn, "SELECT EXISTS(SELECT 1 FROM procrastinate_jobs "
                                                "WHERE status IN ('todo', 'doing'))"),
                       timeout=900, message="procrastinate's queue to drain")
        seconds = elapsed()
        done = scalar(conn, "SELECT COUNT(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        conn.close()
    pg.drop(name)
    if done != n:
        raise RuntimeError(f"procrastinate: {done} of {n} jobs succeeded")
    return seconds


# --- the report ------------------------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.queue --db postgres", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=["postgres"], default="postgres", help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs", default="1,2,4", help="worker process counts (comma-separated)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="Earmark worker --batch (jobs per claim)")
    p.add_argument("--bare-procs", type=int, default=None, help="processes of the bare loop (default: most --procs)")
    p.add_argument("--procrastinate-procs", default=None,
                   help="procrastinate process counts (default: the most --procs; it is slow)")
    p.add_argument("--procrastinate-concurrency", type=int, default=8,
                   help="jobs each procrastinate worker runs at once (default 8: its best here; 1 is ~35%% slower)")
    p.add_argument("--no-procrastinate", action="store_true", help="skip the procrastinate anchor")
    p.add_argument("--latency-procs", type=int, default=None,
                   help="idle workers in the latency run (default: most --procs)")
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--database-url", default=None,
                   help="an existing server (postgres://user:pass@host:port/db; the user creates databases)")
    p.add_argument("--keep", action="store_true", help="keep the worker logs")
    return p.parse_args(argv)


def plan(args, n: int) -> list[tuple[str, str, object, object, object]]:
    """(key, label, procs, batch, run) for every throughput measurement of one repeat."""
    procs_list = [int(x) for x in args.procs.split(",") if x]
    top = max(procs_list)
    bare_procs = args.bare_procs or top
    configs = []
    for procs in procs_list:
        configs.append((f"earmark-{procs}", "earmark run_noop_worker", procs, args.batch,
                        lambda pg, ws, procs=procs: earmark_run(pg, ws, n, procs, args.batch)))
    for batch in (1, 10):
        configs.append((f"bare-{batch}", "bare psycopg SKIP LOCKED claim+complete", bare_procs, batch,
                        lambda pg, ws, batch=batch: bare_run(pg, ws, n, bare_procs, batch)))
    if procrastinate_available() and not args.no_procrastinate:
        for procs in [int(x) for x in (args.procrastinate_procs or str(top)).split(",") if x]:
            label = f"procrastinate worker, concurrency {args.procrastinate_concurrency}"
            configs.append((f"procrastinate-{procs}", label, procs, "-",
                            lambda pg, ws, procs=procs: procrastinate_run(pg, ws, n, procs,
                                                                          args.procrastinate_concurrency)))
    return configs


def report(args, n: int, configs, runs: dict, latencies: list[float], latency_procs: int) -> None:
    reps = args.repeats
    rows = [[label, procs, batch, " ".join(fmt_rate(r) for r in runs[key]), fmt_rate(median(runs[key]))]
            for key, label, procs, batch, _ in configs]
    if not any(key.startswith("procrastinate-") for key, *_ in configs):
        rows.append(["procrastinate worker", "-", "-", "skipped (not installed or --no-procrastinate)", "-"])
    print()
    print_table(["queue (PostgreSQL)", "procs", "batch", "runs (jobs/s)", "median jobs/s"], rows,
                title=f"Draining {n:,} no-op jobs on PostgreSQL (median of {reps})")
    print()
    print_table(["idle worker start latency", "procs", "samples", "p50 ms", "p95 ms", "max ms"],
                [["earmark, LISTEN/NOTIFY (idle poll 10 s)", latency_procs, len(latencies),
                  f"{median(latencies) * 1000:.1f}", f"{p95(latencies) * 1000:.1f}",
                  f"{max(latencies) * 1000:.1f}"]])
    top = max(int(x) for x in args.procs.split(",") if x)
    ours = median(runs[f"earmark-{top}"])

    def paired(other: str) -> float:
        return median([a / b for a, b in zip(runs[f"earmark-{top}"], runs[other])])

    ratio_rows = [[f"earmark {top} proc vs target {TARGET:,} jobs/s", fmt_ratio(ours / TARGET),
                   "met" if ours >= TARGET else "NOT met"]]
    if f"procrastinate-{top}" in runs:
        vs = paired(f"procrastinate-{top}")
        ratio_rows.append([f"earmark {top} proc vs procrastinate {top} proc (target {PROCRASTINATE_RATIO_TARGET:.0f}x)",
                           fmt_ratio(vs), "met" if vs >= PROCRASTINATE_RATIO_TARGET else "NOT met"])
    else:
        ratio_rows.append(["earmark vs procrastinate", "-", "skipped"])
    for batch in (1, 10):
        ratio_rows.append([f"earmark {top} proc vs bare SKIP LOCKED batch {batch}",
                           fmt_ratio(paired(f"bare-{batch}")), ""])
    ratio_rows.append([f"idle start p95 vs target {LATENCY_TARGET_S * 1000:.0f} ms",
                       fmt_ratio(p95(latencies) / LATENCY_TARGET_S),
                       "met" if p95(latencies) <= LATENCY_TARGET_S else "NOT met"])
    print()
    print_table(["ratio", "value", ""], ratio_rows,
                title=f"Ratios (earmark workers at --batch {args.batch}; against anchors: median of per-repeat ratios)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.jobs
    pg = PgDatabases(args.database_url)
    try:
        os.environ["DATABASE_URL"] = pg.url("postgres")
        setup_django("project.settings")
        configs = plan(args, n)
        latency_procs = args.latency_procs or max(int(x) for x in args.procs.split(",") if x)
        print(f"bench.queue --db postgres: {n:,} no-op jobs, {args.repeats} repeat(s), PostgreSQL {pg.version()} "
              f"(synchronous_commit=on); {machine_note()}", flush=True)
        runs: dict[str, list[float]] = {key: [] for key, *_ in configs}
        with Workspace(prefix="earmark-bench-pg-", keep=args.keep) as ws:
            if args.keep:
                print(f"workspace: {ws.dir}")
            for rep in range(args.repeats):  # every configuration once per repeat: noise spreads over all rows
                for key, label, procs, batch, run in configs:
                    runs[key].append(rate(n, run(pg, ws)))
                    print(f"  [{rep + 1}/{args.repeats}] {label}, {procs} proc, batch {batch}: "
                          f"{fmt_rate(runs[key][-1])} jobs/s", file=sys.stderr, flush=True)
            latencies = start_latencies(pg, ws, latency_procs, args.latency_samples)
        report(args, n, configs, runs, latencies, latency_procs)
    finally:
        from django.db import connections

        connections.close_all()
        pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
