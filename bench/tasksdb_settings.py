"""Settings for the django-tasks-db anchor in ``bench.queue``: Earmark's settings plus its backend.

The same SQLite file setup as Earmark's workers (WAL, ``synchronous=NORMAL``,
busy timeout), with ``CONN_MAX_AGE=None`` so that ``db_worker`` keeps one
connection for its whole life (the anchor at its best; Django's default closes
it after every task). On Django 5.2, django-tasks-db needs the ``django-tasks``
backport (``pip install "django-tasks-db[compat]"``).
"""
from project.settings import *  # noqa: F401,F403
from project.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "django_tasks", "django_tasks_db"]
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
DATABASES["default"]["CONN_MAX_AGE"] = None
