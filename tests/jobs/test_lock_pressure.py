"""Lock pressure: 16 worker processes on one SQLite file, and no "database is locked" escapes.

The CI version of ``python -m bench.lock_pressure`` (5 minutes by default):
the same 16 real processes (5 scanners, 5 taggers without networks, 4
recalibrators, a driver that keeps work coming, a dashboard reader) for
45 seconds instead of 5 minutes, on a database of its own. The benchmark
counts "database is locked" in every worker's log, in every job's and
track's error and in the driver's and reader's own statements; it must
find none, every process must still be alive at the end and exit 0 on
SIGTERM, and every kind of work must have been done. The worst and the
99th-percentile claim latency are printed (``pytest -s`` or ``-rP``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SECONDS = 45


def test_sixteen_processes_on_one_sqlite_file_never_see_database_is_locked(tmp_path):
    summary_file = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    proc = subprocess.run([sys.executable, "-m", "bench.lock_pressure", "--seconds", str(SECONDS),
                           "--json", str(summary_file)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SECONDS + 150)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["processes"] == 16
    assert summary["locked"] == 0, proc.stdout
    assert summary["alive"] == 16 and set(summary["exit_codes"]) == {0}, proc.stdout
    assert summary["tracebacks"] == 0 and summary["other_errors"] == [], proc.stdout
    # Mixed work really happened, in every role.
    roles = summary["roles"]
    assert roles["scanner"]["done"] >= 5 and roles["tagger"]["done"] >= 200 and roles["recalibrator"]["done"] >= 100
    assert summary["driver_ops"].get("rescan", 0) >= 10 and summary["driver_ops"].get("calibration", 0) >= 1
    assert summary["reader_reads"] >= 100 and summary["calibrations"] >= 1
    # Far inside SQLite's 30 s busy timeout (a claim that ran into it would have failed).
    assert summary["worst_claim_ms"] < 10_000, proc.stdout
    assert "worst claim latency" in proc.stdout and "p99 claim latency" in proc.stdout
