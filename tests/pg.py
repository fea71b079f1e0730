"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` and ``pg_ctl`` in a temporary folder.

Nothing here needs pytest, so ``bench.queue_postgres`` starts the same server.
The server listens on 127.0.0.1 at a free port and on a unix socket in its own
folder, trusts local connections (no password: nothing else can reach a
loopback port of a test machine's throwaway cluster in a way that matters), and
is removed with its folder on ``stop()``.

PostgreSQL refuses to run as root, and tests here may run as root: the data
folder is then handed to an unprivileged account (``postgres`` when it
exists, else ``nobody``) and the server binaries run under it.

Where no binaries exist the tests skip with ``MISSING_MESSAGE``;
``EARMARK_REQUIRE_POSTGRES=1`` (CI sets it) turns that skip into a failure,
and ``EARMARK_TEST_POSTGRES_URL`` points the tests at a server of your own
instead of starting one.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "earmark"
REQUIRE_ENV = "EARMARK_REQUIRE_POSTGRES"
URL_ENV = "EARMARK_TEST_POSTGRES_URL"
BINDIR_ENV = "EARMARK_POSTGRES_BINDIR"
MISSING_MESSAGE = (
    "PostgreSQL tests skipped: no initdb/pg_ctl/postgres in EARMARK_POSTGRES_BINDIR, on PATH or in "
    "/usr/lib/postgresql/*/bin (apt-get install postgresql, or set "
    "EARMARK_TEST_POSTGRES_URL=postgres://user:pass@host:port/db); "
    "set EARMARK_REQUIRE_POSTGRES=1 to make this a failure"
)
# For tests only: a throwaway cluster need not survive a power cut, and fsync
# dominates the time of the many small commits tests make.
FAST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``EARMARK_POSTGRES_BINDIR`` when set (and then only
    it), else PATH, then Debian's versioned folders, newest first."""
    if os.environ.get(BINDIR_ENV):
        folder = Path(os.environ[BINDIR_ENV])
        return folder if all((folder / p).exists() for p in ("initdb", "pg_ctl", "postgres")) else None
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(p) for p in versioned]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists() and (folder / "postgres").exists():
            return folder
    return None


def required() -> bool:
    """True where a missing PostgreSQL must fail the run instead of skipping (CI)."""
    return os.environ.get(REQUIRE_ENV, "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root, who may not run it."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and found neither a 'postgres' nor a 'nobody' account to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; ``url(db)`` names a database on it.

    ``settings`` are extra ``postgres -c`` options; ``FAST_SETTINGS`` suit
    tests, the defaults (durable commits) suit benchmarks.
    """

    def __init__(self, bindir: Path | None = None, settings: dict | None = None, max_connections: int = 300):
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError(MISSING_MESSAGE)
        self.settings = {"max_connections": str(max_connections), **(settings or {})}
        self.account = _server_account()
        self.dir: Path | None = None
        self.port: int | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self, timeout: float = 60) -> "PostgresServer":
        self.dir = Path(tempfile.mkdtemp(prefix="earmark-pg-"))
        if self.account is not None:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        self._run("initdb", "-D", self.data, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
        for attempt in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            try:
                self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", str(int(timeout)),
                          "-o", self._server_options(), "start")
                return self
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log()}") from None
        return self

    def stop(self) -> None:
        """Stop the server at once (nothing in it is worth a checkpoint) and remove its folder."""
        if self.dir is None:
            return
        try:
            if (Path(self.data) / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------

    @property
    def data(self) -> str:
        return str(self.dir / "data")

    @property
    def log_path(self) -> str:
        return str(self.dir / "server.log")

    def url(self, dbname: str = "postgres") -> str:
        """A ``DATABASE_URL`` for ``dbname`` over TCP (no password: the cluster trusts local connections)."""
        return f"postgres://{USER}@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={dbname}"

    def log(self) -> str:
        path = Path(self.log_path) if self.dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    # -- databases -------------------------------------------------------------------

    def create_database(self, name: str, template: str = "template1") -> str:
        """A new empty database (or a copy of ``template``); returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                           sql.Identifier(template)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- internals ---------------------------------------------------------------------

    def _server_options(self) -> str:
        options = [f"-p {self.port}", f"-k {self.dir}", "-c listen_addresses=127.0.0.1"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        return " ".join(options)

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A server binary, as the server's account when we are root (``initdb`` refuses root)."""
        as_account = {}
        if self.account is not None:
            as_account = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        proc = subprocess.run([str(self.bindir / program), *args], cwd=self.dir, env=env, capture_output=True,
                              text=True, timeout=120, **as_account)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

