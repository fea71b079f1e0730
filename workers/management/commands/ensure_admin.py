"""``manage.py ensure_admin``: create the admin user once and print its password.

The password is kept in a 0600 file so that the quick start can print it again
on every run; delete the file (or use ``changepassword``) to rotate it.
"""
import os
import secrets
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create a superuser if missing (random password kept in --password-file) and print the password."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password-file", required=True)

    def handle(self, *args, username, password_file, **options):
        path = Path(password_file)
        password = path.read_text().strip() if path.exists() else secrets.token_urlsafe(12)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            User.objects.create_superuser(username=username, email="", password=password)
        elif not user.check_password(password):
            user.set_password(password)
            user.is_staff = user.is_superuser = True
            user.save()
        self.stdout.write(password)
