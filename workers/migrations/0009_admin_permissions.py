"""The admin's permissions and its two groups.

Like 0004's ``control_supervisor``, these guard things that are not tables
(the dashboard, the queues, the libraries' upkeep), so they are made here
rather than by ``Meta.permissions``, on the ``Meta`` content type:

* ``view_dashboard``: the dashboard, its tables, the plots, the failures page and ``/events/``;
* ``operate_queues``: pause, resume, retry and cancel queues; retry and ignore failures;
* ``control_supervisor`` (0004): start, stop, restart and resize supervisord programs;
* ``manage_libraries``: add, change and delete libraries and ask for their scans.

Groups: ``viewer`` (view_dashboard) and ``operator`` (view_dashboard,
operate_queues, manage_libraries; not control_supervisor). ``workers.live.views``
recreates the permissions on demand after a test flush.
"""
from django.db import migrations

PERMISSIONS = {
    "view_dashboard": "Can view the live dashboard, its plots and event stream",
    "operate_queues": "Can pause, resume, retry and cancel queues and failures",
    "control_supervisor": "Can start, stop and restart supervisord programs",
    "manage_libraries": "Can add, change, delete and scan libraries",
}
GROUPS = {
    "viewer": ["view_dashboard"],
    "operator": ["view_dashboard", "operate_queues", "manage_libraries"],
}
NEW = [c for c in PERMISSIONS if c != "control_supervisor"]  # 0004 owns control_supervisor


def create(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    content_type, _ = ContentType.objects.get_or_create(app_label="workers", model="meta")
    rows = {codename: Permission.objects.get_or_create(content_type=content_type, codename=codename,
                                                       defaults={"name": name})[0]
            for codename, name in PERMISSIONS.items()}
    for group_name, codenames in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=group_name)
        group.permissions.add(*(rows[c] for c in codenames))


def delete(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    Group.objects.filter(name__in=GROUPS).delete()
    Permission.objects.filter(content_type__app_label="workers", codename__in=NEW).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("workers", "0008_features_identity_tokens"),
        ("workers", "0004_supervisor_permission"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create, delete)]
