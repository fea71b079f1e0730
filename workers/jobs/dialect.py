"""Everything that differs between SQLite and PostgreSQL, in one place.

The rest of the code asks this module for a settings block, a claim statement
or a wake-up call and never checks which database it runs on (the shape of
Oban's basic/lite engines).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

SQLITE_BUSY_TIMEOUT_S = 30

# WAL lets readers run beside one writer; NORMAL is durable across application
# crashes (only an OS crash can lose the last commits) and much cheaper than FULL.
SQLITE_INIT = (
    "PRAGMA journal_mode=WAL;"
    "PRAGMA synchronous=NORMAL;"
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000};"
    "PRAGMA foreign_keys=ON;"
)


def is_sqlite(db: dict) -> bool:
    return "sqlite" in db["ENGINE"]


def database_options(db: dict) -> dict:
    """Complete a parsed ``DATABASES`` entry with the options Earmark relies on.

    SQLite: ``transaction_mode=IMMEDIATE`` takes the write lock when a
    transaction starts, so concurrent writers wait on the busy timeout instead
    of failing with "database is locked" when a read lock is upgraded.
    PostgreSQL: persistent connections, since workers live for hours (health
    checks replace one that a server restart broke).
    ``?disable_server_side_cursors=true`` in the URL (needed behind PgBouncer
    in transaction mode) arrives as text from django-environ; it becomes a
    real boolean here so that "false" does not read as true.
    """
    db = dict(db)
    options = dict(db.get("OPTIONS", {}))
    if is_sqlite(db):
        options.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("init_command", SQLITE_INIT)
        db.setdefault("TEST", {})
    else:
        db.setdefault("CONN_MAX_AGE", None)
        db.setdefault("CONN_HEALTH_CHECKS", True)
        if isinstance(db.get("DISABLE_SERVER_SIDE_CURSORS"), str):
            db["DISABLE_SERVER_SIDE_CURSORS"] = db["DISABLE_SERVER_SIDE_CURSORS"].lower() in ("1", "true", "yes", "on")
    db["OPTIONS"] = options
    return db


def vendor(connection) -> str:
    return connection.vendor


def claim_lock_clause(connection) -> str:
    """Row locking for the claim's sub-select.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets concurrent claimers pass each
    other's rows. SQLite has one writer at a time, so the statement is already
    exclusive and needs nothing.
    """
    return " FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""


def row_lock_clause(connection) -> str:
    """Lock the rows a read-modify-write reads: ``FOR UPDATE`` on PostgreSQL.

    SQLite needs nothing: the IMMEDIATE transaction already holds the one write lock.
    """
    return " FOR UPDATE" if connection.vendor == "postgresql" else ""


# --- waking other processes: NOTIFY, LISTEN, SQLite's data_version ---------------

# Channels: one per queue (``queue_channel``), which an enqueue or a rescue
# notifies to wake that queue's idle workers, and STATE_CHANNEL, which writes
# of worker rows and operator actions notify for the web process's state broker.
STATE_CHANNEL = "earmark_state"
LISTEN_STEP_S = 0.1  # the longest a listener blocks before looking at ``should_stop`` again
LISTEN_RETRY_S = 5.0  # how long a listener that lost its connection waits before reconnecting
LISTEN_OFF = ("off", "none", "false", "0")

log = logging.getLogger("earmark.dialect")


def queue_channel(queue: str) -> str:
    """The channel whose notification wakes the idle workers of ``queue``."""
    return f"earmark_{queue}"


def notify(connection, *channels: str) -> None:
    """Wake the listeners of ``channels`` (PostgreSQL); SQLite relies on ``data_version`` polling.

    Inside a transaction the notification goes out at commit, so a listener
    that wakes up always sees the rows that caused it.
    """
    if connection.vendor != "postgresql" or not channels:
        return
    with connection.cursor() as cur:
        cur.execute("SELECT " + ", ".join(["pg_notify(%s, '')"] * len(channels)), list(channels))


def data_version(connection) -> int | None:
    """SQLite's per-connection counter that moves when another connection commits."""
    if connection.vendor != "sqlite":
        return None
    with connection.cursor() as cur:
        cur.execute("PRAGMA data_version")
        return cur.fetchone()[0]


def listen_setting() -> str:
    """``EARMARK_LISTEN_URL``: empty (LISTEN on the main database), ``off``, or a direct ``postgres://`` URL.

    Behind PgBouncer in transaction mode LISTEN cannot work (the server
    connection changes after every transaction), so listeners either connect
    to PostgreSQL directly through this URL or are switched off (polling only).
    """
    from django.conf import settings

    value = getattr(settings, "EARMARK_LISTEN_URL", None)
    return (value if value is not None else os.environ.get("EARMARK_LISTEN_URL", "")).strip()


def listen_params(connection) -> dict | None:
    """psycopg connection arguments for a listener, or None where nothing can listen."""
    if connection.vendor != "postgresql":
        return None
    setting = listen_setting()
    if setting.lower() in LISTEN_OFF:
        return None
    if setting:
        import environ

        db = environ.Env.db_url_config(setting)
        params = {"dbname": db["NAME"], "user": db.get("USER"), "password": db.get("PASSWORD"),
                  "host": db.get("HOST"), "port": db.get("PORT") or None}
        params = {k: v for k, v in params.items() if v not in (None, "")}
    else:
        params = connection.get_connection_params()
        for django_only in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(django_only, None)
    params.setdefault("connect_timeout", 5)
    params["application_name"] = "earmark-listener"
    return params


class Listener:
    """A connection of its own that LISTENs on some channels (PostgreSQL).

    Separate from Django's connection because a LISTEN belongs to a session:
    Django's connection may be closed and reopened at any time, and the
    listener must stay put. It runs nothing but LISTEN, so notifications are
    read straight off its socket. A lost connection is retried after
    ``LISTEN_RETRY_S``; meanwhile ``wait`` reports "unavailable" and the
    caller polls instead. A fresh connection may have missed notifications,
    so its first ``wait`` reports a change.
    """

    def __init__(self, params: dict, channels: tuple[str, ...]):
        self.params, self.channels = params, channels
        self.conn = None
        self.retry_at = 0.0
        self.missed = False

    def _connect(self) -> bool:
        import psycopg
        from psycopg import sql

        if time.monotonic() < self.retry_at:
            return False
        try:
            conn = psycopg.connect(**self.params, autocommit=True)
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            log.warning("cannot LISTEN (%s); polling instead for %.0f s", exc, LISTEN_RETRY_S)
            self.retry_at = time.monotonic() + LISTEN_RETRY_S
            return False
        self.conn, self.missed = conn, True
        return True

    def wait(self, timeout: float) -> bool | None:
        """True once a notification came within ``timeout`` s (all pending ones are consumed), False when none
        came, None when not listening (the caller polls)."""
        import psycopg

        if self.conn is None and not self._connect():
            return None
        if self.missed:
            self.missed = False
            return True
        try:
            if not list(self.conn.notifies(timeout=max(0.0, timeout), stop_after=1)):
                return False
            list(self.conn.notifies(timeout=0))  # a burst wakes once
            return True
        except psycopg.Error as exc:
            log.warning("listener connection lost (%s); reconnecting", exc)
            self.close()
            return None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection must not mask why it broke
                pass


_open_listeners: "weakref.WeakSet[Listener]" = weakref.WeakSet()


def open_listener(connection, channels) -> Listener | None:
    """A listener on ``channels`` for the database of ``connection``; None on SQLite or with LISTEN off."""
    params = listen_params(connection)
    if params is None:
        return None
    listener = Listener(params, tuple(channels))
    _open_listeners.add(listener)
    return listener


def close_listeners() -> None:
    """Close every listener of this process (before a test database is dropped, at exit)."""
    for listener in list(_open_listeners):
        listener.close()


atexit.register(close_listeners)


class ChangeFeed:
    """Tells one thread whether other processes may have changed the database since it last asked.

    SQLite: ``PRAGMA data_version`` moved (a cheap read with no lock).
    PostgreSQL: a notification arrived on one of ``channels`` (LISTEN); where
    no listener is available, always "maybe". ``fallback`` s after the last
    change seen, ``changed()`` says "maybe" anyway, so a write that notifies
    nobody (an admin edit, a lost notification) is late, never lost.
    """

    def __init__(self, connection, channels=(), fallback: float | None = None):
        self.connection = connection
        self.sqlite = connection.vendor == "sqlite"
        self.fallback = fallback
        self.listener = None if self.sqlite else open_listener(connection, channels)
        self.version = data_version(connection) if self.sqlite else None
        self.last_change = time.monotonic()

    def changed(self) -> bool:
        """Non-blocking: may the database hold something new since the last call?"""
        if self.sqlite:
            version = data_version(self.connection)
            moved, self.version = version != self.version, version
            return moved
        got = self.listener.wait(0) if self.listener is not None else None
        now = time.monotonic()
        if got is None or got or (self.fallback is not None and now - self.last_change >= self.fallback):
            self.last_change = now
            return True
        return False

    def wait(self, timeout: float, should_stop=lambda: False, step: float = 0.05) -> None:
        """Block up to ``timeout`` s; return early on a change or once ``should_stop()``."""
        deadline = time.monotonic() + timeout
        while not should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.listener is not None:
                got = self.listener.wait(min(remaining, LISTEN_STEP_S))
                if got:
                    return
                if got is False:
                    continue
            time.sleep(min(step, remaining))  # polling: SQLite, or no listener
            if self.sqlite and self.changed():
                return

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


_feeds = threading.local()


def _feed_for(connection, channels) -> ChangeFeed:
    """This thread's feed for ``channels`` (kept: one listener per worker, not one per wait)."""
    if getattr(_feeds, "pid", None) != os.getpid():
        _feeds.pid, _feeds.by_key = os.getpid(), {}
    key = (connection.alias, tuple(channels))
    feed = _feeds.by_key.get(key)
    if feed is None:
        feed = _feeds.by_key[key] = ChangeFeed(connection, channels)
    return feed


def wait_for_change(connection, timeout: float, should_stop=lambda: False, step: float = 0.05,
                    channels=()) -> None:
    """Sleep up to ``timeout`` seconds, returning early once the database may hold new work.

    The idle wait of workers. SQLite: ``PRAGMA data_version`` every ``step``
    s, so an idle worker starts a new job almost at once. PostgreSQL: a
    LISTEN on ``channels`` (the worker's queue channel) wakes it the moment an
    enqueue commits. Either way the caller claims again after ``timeout``,
    which is the fallback for work no one announces (a retry whose backoff ran
    out) and for a lost notification.
    """
    _feed_for(connection, channels).wait(timeout, should_stop, step)
