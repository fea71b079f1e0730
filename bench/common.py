"""Shared helpers for the benchmarks: fresh databases, child processes, timing, tables.

Every measurement gets a database of its own: the schema is migrated once per
settings module into a template file (a real ``manage.py migrate`` in a child
process), and each measurement starts from a byte copy of that template, which
is the same as migrating a fresh file but does not cost two seconds a time.
Worker processes get the production settings module (``project.settings``)
through the same environment variables an operator would set.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOSTNAME = "benchhost"


class Workspace:
    """A temporary directory holding the benchmark's databases, data dir and logs."""

    def __init__(self, prefix: str = "earmark-bench-", keep: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir()
        self._templates: dict[str, Path] = {}
        self._count = 0

    def env(self, db: Path, settings_module: str = "project.settings", **extra) -> dict:
        """Environment for a child ``manage.py``: the given settings module on ``db``."""
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE=settings_module,
            DATABASE_URL=f"sqlite:///{db}",
            SECRET_KEY="earmark-benchmark-only",
            EARMARK_DATA_DIR=str(self.data_dir),
            EARMARK_HOSTNAME=HOSTNAME,
            EARMARK_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        )
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def fresh_db(self, settings_module: str = "project.settings") -> Path:
        """A new, migrated SQLite file (a copy of a template migrated once per settings module)."""
        template = self._templates.get(settings_module)
        if template is None:
            template = self.dir / f"template-{len(self._templates)}.sqlite3"
            manage("migrate", "--noinput", env=self.env(template, settings_module))
            with sqlite3.connect(template) as conn:  # fold the WAL into the main file before copying it
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            self._templates[settings_module] = template
        self._count += 1
        db = self.dir / f"db-{self._count}.sqlite3"
        shutil.copyfile(template, db)
        return db

    def drop_db(self, db: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def setup_django(settings_module: str = "project.settings") -> None:
    """Django in the driver process, to set up and enqueue through the real code.

    The database is chosen per measurement with ``use_database``.
    """
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    os.environ.setdefault("SECRET_KEY", "earmark-benchmark-only")
    os.environ.setdefault("DATABASE_URL", "sqlite:////nonexistent/earmark-bench-unused.sqlite3")
    os.environ.setdefault("EARMARK_HOSTNAME", HOSTNAME)
    os.environ.setdefault("EARMARK_LOG_LEVEL", "WARNING")
    import django

    django.setup()


def use_database(db: Path) -> None:
    """Point the driver's Django at ``db`` (closing its connection, which workers must not share)."""
    from django.db import connections

    connections.close_all()
    connections["default"].settings_dict["NAME"] = str(db)


def manage(*args, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``manage.py`` to completion; raise with its output when it fails."""
    proc = subprocess.run([PYTHON, str(ROOT / "manage.py"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(map(str, args))} exited {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Procs:
    """A group of background ``manage.py`` processes, each logging to its own file."""

    def __init__(self, args_list: list[list], env: dict, log_dir: Path, label: str,
                 program: tuple = (str(ROOT / "manage.py"),)):
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for i, args in enumerate(args_list):
            log = log_dir / f"{label}-{i}.log"
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen([PYTHON, *program, *map(str, args)], env=env,
                                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
            self.logs.append(log)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"worker {p.pid} did not exit within {timeout:.0f}s; see {self.logs}") from None
        return codes

    def terminate(self, timeout: float = 30) -> list[int]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU the live processes have used so far (Linux ``/proc``)."""
        total = 0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def tail(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs)

    def check_exits(self, codes: list[int]) -> None:
        if any(codes):
            raise RuntimeError(f"worker exit codes {codes}:\n{self.tail()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def connect(db: Path) -> sqlite3.Connection:
    """A plain autocommit connection for polling (cheap, no Django)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def scalar(conn: sqlite3.Connection, sql: str, params=()) -> object:
    return conn.execute(sql, params).fetchone()[0]


def wait_until(predicate, timeout: float, interval: float = 0.01, message: str = "condition", procs: Procs | None = None):
    """Poll ``predicate()`` until truthy; fail with ``message`` (and worker logs) on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if procs is not None and not procs.alive():
            raise RuntimeError(f"a worker exited while waiting for {message}:\n{procs.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {message}"
                               + (f":\n{procs.tail()}" if procs else ""))
        time.sleep(interval)


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...``; then ``t()`` is the elapsed seconds (live inside the block)."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fmt_rate(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.2f}x"


def print_table(headers: list[str], rows: list[list], title: str | None = None, out=None) -> None:
    """A plain text table: first column left-aligned, the rest right-aligned."""
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    if title:
        print(title, file=out)
    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)
    out.flush()


def machine_note() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}"
