"""supervisord's process table and group control over its XML-RPC interface on the unix socket.

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


def control(action: str, group: str, path: str | None = None) -> None:
    """Start, stop or restart every process of a program group, waiting until it is done."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if group in UNCONTROLLABLE_GROUPS:
        raise SupervisorError(f"the {group} program is not controlled from the web page; use supervisorctl")
    rpc = proxy(timeout=CONTROL_TIMEOUT_S, path=path).supervisor
    if action in ("stop", "restart"):
        _call(lambda: rpc.stopProcessGroup(group, True), path)
    if action in ("start", "restart"):
        _call(lambda: rpc.startProcessGroup(group, True), path)
