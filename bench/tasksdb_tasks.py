"""The no-op task that ``bench.queue`` runs through django-tasks-db's ``db_worker``."""
try:
    from django.tasks import task  # Django 6+
except ImportError:
    from django_tasks import task  # the backport on Django 5.2


@task()
def noop() -> None:
    return None
