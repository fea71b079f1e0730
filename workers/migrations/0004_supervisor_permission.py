"""The "control supervisor" permission: staff who hold it may start, stop and restart programs.

A data migration rather than ``Meta.permissions`` on a model: the permission
guards supervisord, not a table. It hangs on the ``Meta`` content type (the
IPC rows, the closest thing to "the running system"). ``workers.live.views``
recreates it on demand after a test flush.
"""
from django.db import migrations

CODENAME = "control_supervisor"
NAME = "Can start, stop and restart supervisord programs"


def create_permission(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    content_type, _ = ContentType.objects.get_or_create(app_label="workers", model="meta")
    Permission.objects.get_or_create(content_type=content_type, codename=CODENAME, defaults={"name": NAME})


def delete_permission(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    Permission.objects.filter(content_type__app_label="workers", codename=CODENAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("workers", "0003_track_earmark_tags"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_permission, delete_permission)]
