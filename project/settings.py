"""Django settings for Earmark, read from the environment (django-environ).

Every knob an operator turns is an environment variable; the defaults give the
embedded single-host setup: a SQLite file in WAL mode under ``var/``.
"""
import os
import socket
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
DATA_DIR = Path(env.str("EARMARK_DATA_DIR", default=str(BASE_DIR / "var"))).resolve()

DEBUG = env.bool("DEBUG", default=False)
# Production refuses to start without a real secret; DEBUG and tests may use a throwaway one.
if DEBUG or env.bool("EARMARK_INSECURE_DEV_SECRET", default=False):
    SECRET_KEY = env.str("SECRET_KEY", default="earmark-insecure-development-key-do-not-deploy")
else:
    SECRET_KEY = env.str("SECRET_KEY")
    if not SECRET_KEY.strip():  # "SECRET_KEY=" left empty in an env file is no secret either
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("Set the SECRET_KEY environment variable (it is empty)")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

# Worker host identity: the "<host>" in worker ids. Several hosts share one database.
EARMARK_HOSTNAME = env.str("EARMARK_HOSTNAME", default=socket.gethostname())
EARMARK_MODELS_DIR = Path(env.str("EARMARK_MODELS_DIR", default=str(DATA_DIR / "models"))).resolve()

# Queue and worker timing (seconds). A worker whose heartbeat is older than the
# timeout is presumed dead and its jobs go back to the queue.
EARMARK_HEARTBEAT_INTERVAL = env.float("EARMARK_HEARTBEAT_INTERVAL", default=5.0)
EARMARK_HEARTBEAT_TIMEOUT = env.float("EARMARK_HEARTBEAT_TIMEOUT", default=30.0)
EARMARK_LEASE_SECONDS = env.float("EARMARK_LEASE_SECONDS", default=300.0)
EARMARK_JOB_RETENTION_SECONDS = env.float("EARMARK_JOB_RETENTION_SECONDS", default=7 * 24 * 3600)
# A worker busy on one job for longer than this is presumed hung and killed by its
# heartbeat process (supervisord restarts it; the job is charged an attempt). 0: never.
EARMARK_JOB_TIMEOUT_SECONDS = env.float("EARMARK_JOB_TIMEOUT_SECONDS", default=3600.0)
EARMARK_IDLE_POLL_SECONDS = env.float("EARMARK_IDLE_POLL_SECONDS", default=0.5)
# SIGTERM lets a worker finish its current job for this long, then it releases the
# job and exits; supervisord's stopwaitsecs (30 s) must stay above it.
EARMARK_STOP_GRACE_SECONDS = env.float("EARMARK_STOP_GRACE_SECONDS", default=20.0)

# The live admin (django-eventstream): only staff read the channels; the state
# broker glances at the database every POLL seconds (SQLite: PRAGMA
# data_version) and re-reads it at most once per MIN_INTERVAL.
EVENTSTREAM_CHANNELMANAGER_CLASS = "workers.live.channels.StaffChannelManager"
EARMARK_BROKER_POLL_SECONDS = env.float("EARMARK_BROKER_POLL_SECONDS", default=0.05)
EARMARK_BROKER_MIN_INTERVAL = env.float("EARMARK_BROKER_MIN_INTERVAL", default=0.25)
# PostgreSQL: how long the broker trusts LISTEN/NOTIFY before re-reading anyway (a lost
# notification costs at most this much latency), and where listeners connect:
# "" = the main database, "off" = poll only, or a direct postgres:// URL behind PgBouncer.
EARMARK_BROKER_FALLBACK_SECONDS = env.float("EARMARK_BROKER_FALLBACK_SECONDS", default=2.0)
EARMARK_LISTEN_URL = env.str("EARMARK_LISTEN_URL", default="")

# The hooks' HTTP API (workers.api): a fixed-window rate limit per token and per client IP
# (requests per window; 0 = no limit), counted in this cache alias, and the paths one request may name.
EARMARK_API_RATE_WINDOW_SECONDS = env.int("EARMARK_API_RATE_WINDOW_SECONDS", default=60)
EARMARK_API_RATE_PER_TOKEN = env.int("EARMARK_API_RATE_PER_TOKEN", default=120)
EARMARK_API_RATE_PER_IP = env.int("EARMARK_API_RATE_PER_IP", default=300)
EARMARK_API_RATE_CACHE = env.str("EARMARK_API_RATE_CACHE", default="default")
EARMARK_API_MAX_PATHS = env.int("EARMARK_API_MAX_PATHS", default=1000)

# The library watcher (workers.library.watch): a folder is queued once no event came for SETTLE
# seconds; libraries are re-read every RELOAD seconds (a broken root is tried again then);
# FORCE_POLL polls every library (as on NFS/SMB/FUSE); SCAN_ON_START asks for an incremental
# scan whenever a library starts being watched; a flush naming over MAX_FOLDERS folders asks
# for a library scan instead of one job per folder.
EARMARK_WATCH_SETTLE_SECONDS = env.float("EARMARK_WATCH_SETTLE_SECONDS", default=2.0)
EARMARK_WATCH_RELOAD_SECONDS = env.float("EARMARK_WATCH_RELOAD_SECONDS", default=10.0)
EARMARK_WATCH_FORCE_POLL = env.bool("EARMARK_WATCH_FORCE_POLL", default=False)
EARMARK_WATCH_SCAN_ON_START = env.bool("EARMARK_WATCH_SCAN_ON_START", default=True)
EARMARK_WATCH_MAX_FOLDERS = env.int("EARMARK_WATCH_MAX_FOLDERS", default=1000)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_eventstream",
    "axes",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it answers a locked-out login with 429.
    "axes.middleware.AxesMiddleware",
]

# The login's rate limit (django-axes): after 5 failed logins for one username from one IP, that
# pair is locked out for 15 minutes (HTTP 429); a successful login resets the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = 0.25  # hours: 15 minutes
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],  # the project's overrides of the admin's templates (its favicon)
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'earmark.sqlite3'}"),
}
from workers.jobs.dialect import database_options  # noqa: E402  (one place for SQLite/PostgreSQL differences)

DATABASES["default"] = database_options(DATABASES["default"])

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# The admin's CSS and JS are served by the web process itself (no separate web server needed).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

# Settings that only make sense behind HTTPS switch on together with one variable.
if env.bool("EARMARK_HTTPS", default=False):
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("EARMARK_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("EARMARK_LOG_LEVEL", default="INFO")},
    # One line per API request (token name, client IP, method, path, status) into the web process's
    # log (supervisord's web.log), even when EARMARK_LOG_LEVEL quietens everything else.
    "loggers": {"earmark.api": {"level": env.str("EARMARK_API_LOG_LEVEL", default="INFO")}},
}
