"""Settings for the test suite: the real settings, with a throwaway data directory.

The test database is a real SQLite file in WAL mode (not ``:memory:``), so
that worker processes started by the tests share it.
"""
import os
import tempfile

os.environ.setdefault("SECRET_KEY", "earmark-test-suite-only")
os.environ.setdefault("EARMARK_DATA_DIR", tempfile.mkdtemp(prefix="earmark-test-"))
os.environ.setdefault("EARMARK_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("EARMARK_HEARTBEAT_TIMEOUT", "6")
os.environ.setdefault("EARMARK_HOSTNAME", "testhost")

from project.settings import *  # noqa: E402,F401,F403
from project.settings import DATA_DIR, DATABASES  # noqa: E402

if "sqlite" in DATABASES["default"]["ENGINE"]:
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Tests render admin pages without running collectstatic first.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
