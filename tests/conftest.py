"""Shared fixtures: real worker processes against the test's real database.

The database is a SQLite file, or PostgreSQL in the PostgreSQL pass
(``EARMARK_TEST_DB=postgres``): the main run runs the modules in
``POSTGRES_MODULES`` a second time, in a child ``pytest`` on a throwaway
PostgreSQL server (``tests/jobs/test_postgres.py``), since Django's database
is fixed once the settings are loaded. Tests marked ``postgres`` run only
in that pass.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

pytest_plugins = [p for p in ("tests.conftest_models",) if (ROOT / "tests" / "conftest_models.py").exists()]

# The modules that run on both databases: the queue, the worker runtime, the scanner, the
# broker, and the PostgreSQL-only tests.
POSTGRES_MODULES = ("jobs/test_queue", "jobs/test_queue_properties", "jobs/test_leases", "jobs/test_worker_processes",
                    "library/test_scanner", "library/test_scan_races", "library/test_moves", "live/test_broker",
                    "jobs/test_postgres")


def on_postgres() -> bool:
    """True in the PostgreSQL pass (the settings chose the database before any conftest ran)."""
    return "postgresql" in settings.DATABASES["default"]["ENGINE"]


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: runs only on PostgreSQL (in the PostgreSQL pass)")
    config.addinivalue_line("markers", "postgres_driver: starts the PostgreSQL pass; never runs inside it")


def pytest_collection_modifyitems(config, items):
    """Deselect what does not belong to this pass: PostgreSQL-only tests on SQLite, the driver on PostgreSQL."""
    unwanted = "postgres_driver" if on_postgres() else "postgres"
    keep = [item for item in items if item.get_closest_marker(unwanted) is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session's PostgreSQL pass (or the one in EARMARK_TEST_POSTGRES_URL).

    No binaries: skipped with a clear message, or a failure under EARMARK_REQUIRE_POSTGRES=1 (CI).
    """
    from tests import pg

    if os.environ.get(pg.URL_ENV):
        yield os.environ[pg.URL_ENV]
        return
    if pg.find_bindir() is None:
        if pg.required():
            pytest.fail(pg.MISSING_MESSAGE.replace("tests skipped", "tests required (EARMARK_REQUIRE_POSTGRES=1)"))
        pytest.skip(pg.MISSING_MESSAGE)
    with pg.PostgresServer(settings=pg.FAST_SETTINGS) as server:
        yield server.url("earmark")


@pytest.fixture(autouse=True)
def _close_listeners_after_each_test():
    """No LISTEN connection of this process outlives its test (PostgreSQL drops a test database only when unused)."""
    yield
    from workers.jobs import dialect

    dialect.close_listeners()


def database_url() -> str:
    """The URL of the database the test is using, for child processes."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{quote(s['USER'], safe='')}:{quote(s['PASSWORD'], safe='')}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


@pytest.fixture
def worker_env(transactional_db):
    """Environment for child processes: the production settings module on the test database."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        DATABASE_URL=database_url(),
        SECRET_KEY="earmark-test-suite-only",
        EARMARK_DATA_DIR=str(settings.DATA_DIR),
        EARMARK_MODELS_DIR=str(settings.EARMARK_MODELS_DIR),
        EARMARK_HOSTNAME=settings.EARMARK_HOSTNAME,
        EARMARK_HEARTBEAT_INTERVAL=str(settings.EARMARK_HEARTBEAT_INTERVAL),
        EARMARK_HEARTBEAT_TIMEOUT=str(settings.EARMARK_HEARTBEAT_TIMEOUT),
        EARMARK_IDLE_POLL_SECONDS="0.2",
        PYTHONUNBUFFERED="1",
    )
    return env


def manage(*args, env: dict, check=True, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``manage.py`` in a child process and wait for it."""
    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn(*args, env: dict, **kwargs) -> subprocess.Popen:
    """Start ``manage.py`` in the background (a real worker process)."""
    return subprocess.Popen([sys.executable, str(ROOT / "manage.py"), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(predicate, timeout=30.0, interval=0.1, message="condition"):
    """Poll until ``predicate()`` is truthy; fail the test with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def drain_scans(limit: int | None = None) -> list:
    """Run queued scan jobs in-process, as a scanner worker would; returns the failed jobs.

    ``limit`` stops after that many jobs (to interrupt a scan midway).
    """
    from workers.jobs import queue
    from workers.library import scan_worker
    from workers.models import Job
    from workers.jobs.runtime import PermanentError

    worker, done = "worker:testhost:scan:inline", 0
    while limit is None or done < limit:
        jobs = queue.claim("scan", worker, "boot", 1)
        if not jobs:
            break
        job = jobs[0]
        try:
            result = scan_worker.process_job(job.payload, job.library_id)
        except PermanentError as exc:
            queue.fail(job, worker, str(exc), retry=False)
        else:
            queue.complete([job.id], worker, {job.id: result})
        done += 1
    return list(Job.objects.filter(queue="scan", state="failed"))


#: The library form's standard-field settings at their defaults, as the admin's form posts them.
STANDARD_FORM = {"standard_tags": "fill-empty", "standard_limits": '{"genre": 2, "mood": 2}', "id3v23_separator": "/",
                 "analysis": "fast", "key_notation": "standard", "watch": "auto", "poll_seconds": "300"}


def category_tags(fields: dict) -> dict:
    """Only the category lists of Earmark's keys in a file (what ``Track.earmark_tags`` holds, empty ones left out)."""
    from workers.tagging.categories import CATEGORIES

    return {k: v for k, v in fields.items() if k in CATEGORIES and v}
