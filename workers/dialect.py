"""Everything that differs between SQLite and PostgreSQL, in one place.

The rest of the code asks this module for a settings block, a claim statement
or a wake-up call and never checks which database it runs on (the shape of
Oban's basic/lite engines).
"""
from __future__ import annotations

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
    PostgreSQL: persistent connections, since workers live for hours.
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


def notify(connection, channel: str) -> None:
    """Wake listeners of ``channel`` (PostgreSQL); SQLite relies on polling."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, '')", [channel])


def data_version(connection) -> int | None:
    """SQLite's per-connection counter that moves when another connection commits."""
    if connection.vendor != "sqlite":
        return None
    with connection.cursor() as cur:
        cur.execute("PRAGMA data_version")
        return cur.fetchone()[0]


def wait_for_change(connection, timeout: float, should_stop=lambda: False, step: float = 0.05) -> None:
    """Sleep up to ``timeout`` seconds, returning early once the database may hold new work.

    SQLite: ``PRAGMA data_version`` is a cheap read with no lock, so an idle
    worker can look every 50 ms and start a new job almost at once.
    PostgreSQL: plain sleep for now; LISTEN/NOTIFY takes its place later.
    """
    import time

    deadline = time.monotonic() + timeout
    start = data_version(connection)
    while time.monotonic() < deadline and not should_stop():
        time.sleep(min(step, max(0.0, deadline - time.monotonic())))
        if start is not None and data_version(connection) != start:
            return
