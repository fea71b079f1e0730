"""supervisord's process table, process and group control, and config reload over its XML-RPC interface on the unix socket.

Uses supervisor's own transport (``supervisor.xmlrpc.SupervisorTransport``),
the one supervisorctl uses, with a socket timeout added so that a wedged
supervisord can never hang a web request. Every failure to reach supervisord
becomes ``SupervisorError`` with a sentence for the page: the dashboard
must say "not running", not fail.
"""
from __future__ import annotations

import os
import socket
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

TIMEOUT_S = 10.0
# Stopping a group waits for its workers to finish or release their jobs (stopwaitsecs is 30 s).
CONTROL_TIMEOUT_S = 75.0
ACTIONS = ("start", "stop", "restart")
# The web program serves this very request: it is shown but not controlled from the page.
UNCONTROLLABLE_GROUPS = frozenset({"web"})


class SupervisorError(Exception):
    """supervisord is not running, cannot be reached, or refused the call (the message says which)."""


@dataclass
class Process:
    group: str
    name: str
    state: str
    pid: int
    description: str
    uptime: int
    exitstatus: int
    spawnerr: str

    @property
    def full_name(self) -> str:
        return f"{self.group}:{self.name}"

    @property
    def number(self) -> str:
        """supervisord's process number, read off the name (``tagger_02`` → "2"); "" for a program of one."""
        digits = self.name[len(self.name.rstrip("0123456789")):]
        return str(int(digits)) if digits and self.name != self.group else ""


def socket_path() -> str:
    """The socket supervisord listens on: the setting, else the environment deploy/env.sh exports."""
    configured = getattr(settings, "EARMARK_SUPERVISOR_SOCKET", None) or os.environ.get("EARMARK_SUPERVISOR_SOCKET")
    return str(configured or Path(settings.DATA_DIR) / "run" / "supervisor.sock")


class _TimedConnection(UnixStreamHTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)


class _TimedTransport(SupervisorTransport):
    """``SupervisorTransport`` whose unix-socket connection has a timeout."""

    def __init__(self, path: str, timeout: float):
        super().__init__(None, None, serverurl=f"unix://{path}")

        def get_connection():
            conn = _TimedConnection("localhost", timeout=timeout)
            conn.socketfile = path
            return conn

        self._get_connection = get_connection


def proxy(timeout: float = TIMEOUT_S, path: str | None = None):
    """An XML-RPC proxy on the socket (the host in the URL is ignored by the transport)."""
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=_TimedTransport(path or socket_path(), timeout))


def _call(fn, path: str | None):
    where = path or socket_path()
    try:
        return fn()
    except FileNotFoundError:
        raise SupervisorError(f"supervisord is not running (no socket at {where})") from None
    except ConnectionRefusedError:
        raise SupervisorError(f"supervisord is not running (nothing listens on {where})") from None
    except PermissionError:
        raise SupervisorError(f"no permission to use the supervisord socket {where}") from None
    except (OSError, socket.timeout) as exc:
        raise SupervisorError(f"supervisord did not answer on {where}: {exc}") from None
    except xmlrpc.client.Fault as fault:
        raise SupervisorError(f"supervisord refused: {fault.faultString}") from None
    except xmlrpc.client.ProtocolError as exc:
        raise SupervisorError(f"supervisord answered {exc.errcode} {exc.errmsg}") from None


def process_table(path: str | None = None) -> list[Process]:
    """Every process supervisord manages, in its own order (by group, then name)."""
    infos = _call(lambda: proxy(path=path).supervisor.getAllProcessInfo(), path)
    return [
        Process(group=i["group"], name=i["name"], state=i["statename"], pid=i["pid"],
                description=i["description"], uptime=max(0, i["now"] - i["start"]) if i["start"] else 0,
                exitstatus=i["exitstatus"], spawnerr=i["spawnerr"])
        for i in infos
    ]


def groups(processes: list[Process]) -> list[str]:
    """Program group names, in table order, without duplicates."""
    return list(dict.fromkeys(p.group for p in processes))


def control(action: str, group: str, process: str = "", path: str | None = None) -> None:
    """Start, stop or restart every process of a program group, or one of them by name, waiting until it is done.

    A restart of a process that is not running just starts it (supervisorctl does the same).
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if group in UNCONTROLLABLE_GROUPS:
        raise SupervisorError(f"the {group} program is not controlled from the web page; use supervisorctl")
    rpc = proxy(timeout=CONTROL_TIMEOUT_S, path=path).supervisor
    if process:
        name = f"{group}:{process}"
        stop, start = (lambda: rpc.stopProcess(name, True)), (lambda: rpc.startProcess(name, True))
    else:
        stop, start = (lambda: rpc.stopProcessGroup(group, True)), (lambda: rpc.startProcessGroup(group, True))
    if action in ("stop", "restart"):
        try:
            _call(stop, path)
        except SupervisorError as exc:
            if not (action == "restart" and "NOT_RUNNING" in str(exc)):
                raise
    if action in ("start", "restart"):
        _call(start, path)


def update_group(group: str, path: str | None = None) -> str:
    """What ``supervisorctl update GROUP`` does: re-read the config files, then apply them to this group only.

    A changed group is stopped (its workers finish or release their jobs),
    removed and added back as the files now say; supervisord starts it again
    where the program autostarts. Returns "added", "changed", "removed" or
    "unchanged". Other groups' pending changes are left for ``supervisorctl update``.
    """
    rpc = proxy(timeout=CONTROL_TIMEOUT_S, path=path).supervisor
    [[added, changed, removed]] = _call(rpc.reloadConfig, path)
    if group in removed or group in changed:
        _call(lambda: rpc.stopProcessGroup(group, True), path)
        _call(lambda: rpc.removeProcessGroup(group), path)
    if group in added or group in changed:
        _call(lambda: rpc.addProcessGroup(group), path)
    return "added" if group in added else "changed" if group in changed else "removed" if group in removed else "unchanged"
