"""What the real-browser tests share: Debian's Chromium under Playwright, users it can log in as, the server's static files.

Importing this module skips the importing test module when Playwright's
Python package or ``/usr/bin/chromium`` is missing (``deploy/bootstrap.sh
--test`` installs both; no browser is ever downloaded).
"""
from __future__ import annotations

import os

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from tests.conftest import manage

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PASSWORD = "s3cret-pass"

playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (deploy/bootstrap.sh --test installs Debian's chromium)",
                allow_module_level=True)


def server_password(raw: str = PASSWORD) -> str:
    """``raw`` hashed for the server's settings: the test settings' fast MD5 hasher is unknown there."""
    return PBKDF2PasswordHasher().encode(raw, "browsertestsalt", iterations=1000)


def make_user(user_model, username: str, **flags):
    """A user the browser can log in as with ``PASSWORD`` (``is_staff=True, is_superuser=True`` and so on)."""
    return user_model.objects.create(username=username, password=server_password(), **flags)


def collect_static(env: dict) -> None:
    """The admin's and the dashboard's CSS and JS, for WhiteNoise in the server (the manifest its URLs need)."""
    manage("collectstatic", "--noinput", "-v", 0, env=env)


def login(page, base: str, username: str, next_url: str = "/admin/") -> None:
    """Log in through the admin's login form, as a person does, and land on ``next_url``."""
    page.goto(f"{base}/admin/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}{next_url}")


def wait_live(page) -> None:
    """Until the dashboard's event stream is open (its status line says "live")."""
    page.wait_for_function("document.getElementById('earmark-connection').textContent === 'live'")
