"""How many processes a worker program runs: chosen in the admin, applied to the running supervisord.

supervisord reads ``numprocs`` when it loads its config and cannot change it
through XML-RPC. So a new count is written where ``deploy/supervisord.conf``
reads it: its ``[include]`` reads ``$EARMARK_SUPERVISOR_CONF_DIR/*.conf``
(default ``<data dir>/supervisor``) after the main file, and a section there
that holds only ``numprocs`` overrides the main file's value for that program
(sections of one name merge; the option read last wins). This module owns one
generated file there, ``numprocs.conf``::

    [program:tagger]
    numprocs=3

Then it does what ``supervisorctl update tagger`` does: re-read the config,
stop the group (its workers finish or release their jobs), remove it, add it
back with the new count, and start it again if it was running. If supervisord
refuses, the file is put back as it was, so the file never names a count the
running supervisord has not taken. The environment (``EARMARK_TAGGERS``...)
still gives the count until the admin chooses one; then the file wins, also
after a restart of supervisord.
"""
from __future__ import annotations

import configparser
import io
import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from workers.live import supervisor_client

#: The programs whose size may be changed from the admin (the web program is one process).
SCALABLE_GROUPS = ("scanner", "tagger", "recalibrator")
MIN_PROCESSES = 1
MAX_PROCESSES = 16
FILE_NAME = "numprocs.conf"
HEADER = ("; Written by Earmark's admin (workers/live/numprocs.py): the number of processes per program\n"
          "; chosen on the dashboard. deploy/supervisord.conf includes it after its own sections.\n")
# Processes in these states count as running: a resized group that was running runs again.
RUNNING_STATES = frozenset({"RUNNING", "STARTING", "BACKOFF"})


@dataclass
class Resized:
    group: str
    before: int
    after: int
    restarted: bool


def conf_dir() -> Path:
    """The directory the config includes: the setting, else the environment deploy/env.sh exports."""
    configured = (getattr(settings, "EARMARK_SUPERVISOR_CONF_DIR", None)
                  or os.environ.get("EARMARK_SUPERVISOR_CONF_DIR"))
    return Path(configured or Path(settings.DATA_DIR) / "supervisor")


def conf_path() -> Path:
    return conf_dir() / FILE_NAME


def chosen() -> dict[str, int]:
    """The counts chosen in the admin so far, per program ({} before any)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(conf_path().read_text())
    except (FileNotFoundError, configparser.Error):
        return {}
    out = {}
    for section in parser.sections():
        group = section.removeprefix("program:")
        value = parser.get(section, "numprocs", fallback="")
        if group in SCALABLE_GROUPS and value.isdigit():
            out[group] = int(value)
    return out


def check_count(group: str, count) -> int:
    """The count as an int within bounds; ``ValueError`` with a sentence for the page otherwise."""
    if group not in SCALABLE_GROUPS:
        raise ValueError(f"the number of {group} processes cannot be changed here "
                         f"(only {', '.join(SCALABLE_GROUPS)})")
    try:
        n = int(str(count).strip())
    except ValueError:
        raise ValueError(f"the number of processes must be a whole number, not {count!r}") from None
    if not MIN_PROCESSES <= n <= MAX_PROCESSES:
        raise ValueError(f"the number of processes must be between {MIN_PROCESSES} and {MAX_PROCESSES}")
    return n


def _render(counts: dict[str, int]) -> str:
    parser = configparser.ConfigParser(interpolation=None)
    for group in sorted(counts):
        parser[f"program:{group}"] = {"numprocs": str(counts[group])}
    out = io.StringIO()
    parser.write(out)
    return HEADER + out.getvalue()


def _write(text: str | None) -> None:
    """Replace the file atomically (``None`` removes it)."""
    path = conf_path()
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resize(group: str, count, path: str | None = None) -> Resized:
    """Run ``count`` processes of ``group``: write the count, apply it to supervisord, restart the group if it ran.

    Raises ``ValueError`` for a count out of bounds, ``SupervisorError`` when
    supervisord cannot be reached or refuses (then nothing has changed).
    """
    n = check_count(group, count)
    members = [p for p in supervisor_client.process_table(path) if p.group == group]
    if not members:
        raise supervisor_client.SupervisorError(f"supervisord runs no {group} program")
    was_running = any(p.state in RUNNING_STATES for p in members)
    try:
        previous = conf_path().read_text()
    except FileNotFoundError:
        previous = None
    _write(_render({**chosen(), group: n}))
    try:
        supervisor_client.update_group(group, path)
    except supervisor_client.SupervisorError:
        _write(previous)
        try:  # the group may be gone already: bring it back as it was
            supervisor_client.update_group(group, path)
        except supervisor_client.SupervisorError:
            pass
        raise
    after = [p for p in supervisor_client.process_table(path) if p.group == group]
    if was_running and not any(p.state in RUNNING_STATES for p in after):
        supervisor_client.control("start", group, path=path)
    return Resized(group, len(members), len(after), was_running)
