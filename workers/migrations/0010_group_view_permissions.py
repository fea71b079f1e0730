"""The ``viewer`` and ``operator`` groups may read the admin's lists, not only the dashboard.

0009 gave them ``view_dashboard`` (and the operator ``operate_queues`` and
``manage_libraries``), but the dashboard links to the jobs, its failures to
the tracks, and the plots to the libraries: without Django's own view
permissions those pages were 403 for both groups. Both get, read-only:

* ``view_track`` (the track list and page, its player, the exports),
* ``view_job`` (the job list and page; the operator's retry and cancel there need
  ``operate_queues``, which 0009 gave),
* ``view_library`` (the libraries; the operator already manages them),
* ``view_calibration`` (what the written strengths are calibrated with).

Not ``view_apitoken`` (tokens are secrets) nor ``view_meta`` (internals).
Django creates these permissions after migrating (``post_migrate``), so on a
fresh database they are made here first, as Django would name them.
Reversing takes the grants back from the groups and leaves the permissions.
"""
from django.db import migrations

VIEWS = ["view_track", "view_job", "view_library", "view_calibration"]
GRANTS = {"viewer": VIEWS, "operator": VIEWS}


def _permission(apps, codename: str):
    """Django's own ``view_<model>`` row, made as ``create_permissions`` would if it does not exist yet."""
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    model = codename.removeprefix("view_")
    content_type, _ = ContentType.objects.get_or_create(app_label="workers", model=model)
    verbose = apps.get_model("workers", model)._meta.verbose_name
    return Permission.objects.get_or_create(content_type=content_type, codename=codename,
                                            defaults={"name": f"Can view {verbose}"})[0]


def grant(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for group_name, codenames in GRANTS.items():
        group, _ = Group.objects.get_or_create(name=group_name)
        group.permissions.add(*(_permission(apps, c) for c in codenames))


def revoke(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for group in Group.objects.filter(name__in=GRANTS):
        group.permissions.remove(*Permission.objects.filter(content_type__app_label="workers",
                                                            codename__in=GRANTS[group.name]))


class Migration(migrations.Migration):
    dependencies = [("workers", "0009_admin_permissions")]

    operations = [migrations.RunPython(grant, revoke)]
