"""The benchmarks run end to end at tiny sizes and print every row (no timing is asserted).

Each benchmark is a child process of its own, as a person runs it; it makes
its own databases in a temporary directory and never touches the test
database. The scan benchmark's small demo library is cached under
``var/bench-cache/`` like the real one.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_bench(*args: str, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def rows(out: str, label: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(label)]


def has_rate(line: str) -> bool:
    return re.search(r"\d[\d,]*\s*$", line) is not None


def test_queue_benchmark_prints_every_row():
    out = run_bench("bench.queue", "--jobs", "300", "--repeats", "1")
    assert "Draining 300 no-op jobs" in out
    earmark = rows(out, "earmark run_noop_worker")
    assert len(earmark) == 3 and all(has_rate(r) for r in earmark), out
    assert [r.split()[2] for r in earmark] == ["1", "2", "4"], out
    bare = rows(out, "bare sqlite3 claim+complete")
    assert len(bare) == 3 and all(has_rate(r) for r in bare), out  # batch 1, 10 and the workers' 100
    tasksdb = rows(out, "django-tasks-db db_worker")
    if importlib.util.find_spec("django_tasks_db") is not None:
        assert len(tasksdb) == 3 and all(has_rate(r) for r in tasksdb), out
        assert rows(out, "earmark 4 proc vs django-tasks-db best"), out
    else:
        assert len(tasksdb) == 1 and "skipped" in tasksdb[0], out
    for ratio in ("earmark 4 proc vs target 10,000 jobs/s", "earmark 4 proc vs bare sqlite3 batch 1",
                  "earmark 4 proc vs bare sqlite3 batch 10"):
        assert re.search(re.escape(ratio) + r"\s+\d+\.\d\dx", out), (ratio, out)


def test_scan_benchmark_prints_every_row():
    out = run_bench("bench.scan", "--files", "60", "--repeats", "1")
    assert re.search(r"Scanning 60 files", out), out
    for label, count in (("earmark first scan", 3), ("earmark unchanged rescan", 3), ("bare mutagen.File loop", 3),
                         ("bare os.scandir+stat loop", 1)):
        found = rows(out, label)
        assert len(found) == count and all(has_rate(r) for r in found), (label, out)
    for k in (1, 2, 4):
        assert re.search(rf"first scan {k} proc vs mutagen {k} proc\s+\d+\.\d\dx", out), out
    assert rows(out, "rescan best"), out


def test_tagger_benchmark_prints_every_row(installed_models_dir, monkeypatch):
    monkeypatch.setenv("EARMARK_MODELS_DIR", str(installed_models_dir))
    out = run_bench("bench.tagger", "--tracks", "2", "--pipeline-tracks", "7", "--min-seconds", "3",
                    "--max-seconds", "4", "--repeats", "1", "--processes", "1,2", "--batch", "3",
                    "--decode-workers", "1", "--corpus-tracks", "0", timeout=600)
    for label in ("1 tagger process(es)", "2 tagger process(es)", "decode-only loop (1 process)",
                  "1 tagger, 3/batch, 1 decode proc", "1 decode procs, decode+patches only"):
        [line] = rows(out, label)
        assert re.search(r"\s\d+\.\d\d\s+\d+\.\d\b", line), (label, out)
    assert "pipeline (stand-in networks; 7 tracks per run)" in out, out
    assert re.search(r"2 processes: [\d.]+x realtime = \d+\.\d\d x the 50x target", out), out
    assert re.search(r"tagger / decode-only ceiling of its decode processes: \d+\.\d\dx", out), out
    for mode in ("full", "fast"):  # full vs fast analysis side by side (bench.fastpath)
        assert len([r for r in rows(out, f"demo: {mode}") if re.search(r"\s\d+%\s+\d+\s+0$", r)]) == 2, out
    assert re.search(r"tags, fast vs full: \d+\.\d% the same of \d+ \(target 98%\); tracks that lost their genre: \d+",
                     out), out
    assert "not installable" in out or "installed" in out, out
