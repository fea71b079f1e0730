"""supervisord's processes beside the workers' own rows: which process is healthy, and which is stale.

supervisord knows which processes it runs (state, pid, uptime); a worker's row
(``workers.jobs.registry``, ``worker:<host>:<queue>:<n>`` where ``n`` is
supervisord's process number) says what the process itself last reported.
A process is **stale** when the two disagree for longer than a start-up
takes: running without a row, a row whose pid is not supervisord's (a dead
predecessor's, or another process using the same number), a heartbeat that is
late, or a row left behind by a process supervisord no longer runs. Rows of
this host's workers that no supervisord process accounts for (a worker
started by hand) are listed after the processes.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from workers.live.supervisor_client import Process
from workers.live.snapshots import late_after

#: The queue each supervisord program works on (its workers' rows carry it).
PROGRAM_QUEUES = {"scanner": "scan", "tagger": "tag", "recalibrator": "calibrate"}
RUNNING = frozenset({"RUNNING"})
PASSING = frozenset({"STARTING", "STOPPING", "BACKOFF"})  # states a row may lag behind


@dataclass
class Row:
    process: Process | None
    worker_id: str
    worker: str  # what the worker's row says, or what is wrong with it
    stale: bool

    @property
    def uptime(self) -> str:
        return duration(self.process.uptime) if self.process and self.process.state in RUNNING else ""


def duration(seconds: int) -> str:
    """An uptime to read at a glance: 45 s, 12 min, 3 h 5 min, 2 d 4 h."""
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours < 1:
        return f"{minutes} min"
    if days < 1:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def worker_key(host: str, process: Process) -> str:
    queue = PROGRAM_QUEUES.get(process.group)
    return f"worker:{host}:{queue}:{process.number}" if queue and process.number else ""


def judge(process: Process, row: dict | None, grace: float) -> tuple[str, bool]:
    """(what to show, stale) for one supervisord process and its worker row (or None)."""
    running = process.state in RUNNING
    if row is None:
        if running and process.uptime > grace:
            return f"no worker row after {duration(process.uptime)} running", True
        return ("no worker row yet" if running else ""), False
    pid, age = row.get("pid"), row.get("heartbeat_age", 0)
    if not running:
        if process.state in PASSING:
            return f"{row.get('state', '')} (pid {pid})", False
        return f"row left behind by pid {pid} (heartbeat {round(age)} s ago)", True
    if pid != process.pid:
        return f"row is pid {pid}'s, supervisord runs pid {process.pid}", process.uptime > grace
    if age > late_after():
        return f"{row.get('state', '')}, heartbeat {round(age)} s ago (late)", True
    return row.get("state", "") or "ok", False


def rows(processes: list[Process], workers: list[dict], host: str | None = None) -> list[Row]:
    """One row per supervisord process, then this host's worker rows that no process accounts for."""
    host = host or settings.EARMARK_HOSTNAME
    by_key = {w["id"]: w for w in workers}
    # A process is given a heartbeat timeout to write its first row (a tagger loads its models first).
    grace = max(float(settings.EARMARK_HEARTBEAT_TIMEOUT), late_after())
    out, claimed = [], set()
    for process in processes:
        key = worker_key(host, process)
        claimed.add(key)
        text, stale = judge(process, by_key.get(key), grace) if key else ("", False)
        out.append(Row(process, key, text, stale))
    queues = set(PROGRAM_QUEUES.values())
    for key, w in sorted(by_key.items()):
        if key in claimed or w.get("host") != host or w.get("queue") not in queues:
            continue
        late = w.get("heartbeat_age", 0) > late_after()
        out.append(Row(None, key, f"not run by this supervisord (pid {w.get('pid')}, {w.get('state', '')}"
                                  + (", heartbeat late)" if late else ")"), late))
    return out
