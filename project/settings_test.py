"""Settings for the test suite: the real settings, with a throwaway data directory.

The test database is a real SQLite file in WAL mode (not ``:memory:``), so
that worker processes started by the tests share it.

``EARMARK_TEST_DB=postgres`` runs the tests on PostgreSQL instead: on the
server named by ``EARMARK_TEST_POSTGRES_URL`` (the main test run starts a
throwaway one and passes it down, see ``tests/jobs/test_postgres.py``), or, when
that is unset, on a throwaway server started here and stopped at exit
(``tests/pg.py``). The test database gets the process id in its name, so
that runs sharing one server never drop each other's database.
"""
import atexit
import os
import tempfile

os.environ.setdefault("SECRET_KEY", "earmark-test-suite-only")
os.environ.setdefault("EARMARK_DATA_DIR", tempfile.mkdtemp(prefix="earmark-test-"))
os.environ.setdefault("EARMARK_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("EARMARK_HEARTBEAT_TIMEOUT", "6")
os.environ.setdefault("EARMARK_HOSTNAME", "testhost")


def _postgres_url() -> str:
    """The server for a PostgreSQL run: the one given, else a throwaway one for this process."""
    if os.environ.get("EARMARK_TEST_POSTGRES_URL"):
        return os.environ["EARMARK_TEST_POSTGRES_URL"]
    from tests.pg import FAST_SETTINGS, PostgresServer

    server = PostgresServer(settings=FAST_SETTINGS).start()
    atexit.register(server.stop)
    return server.url("earmark")


if os.environ.get("EARMARK_TEST_DB", "sqlite") == "postgres":
    os.environ["DATABASE_URL"] = _postgres_url()

from project.settings import *  # noqa: E402,F401,F403
from project.settings import DATA_DIR, DATABASES  # noqa: E402

if "sqlite" in DATABASES["default"]["ENGINE"]:
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_earmark_{os.getpid()}"}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Tests render admin pages without running collectstatic first.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# The login's rate limit is off here: tests log in (``client.login``) far more than 5 times, and
# axes' backend needs a request that ``Client.login`` does not pass. tests/live/test_permissions.py
# switches it on to show the lockout.
AXES_ENABLED = False
