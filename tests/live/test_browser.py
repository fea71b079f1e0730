"""The dashboard in real headless Chromium: log in, queue a scan from the admin, watch it run live.

Everything is real: uvicorn serving the ASGI app (its broker inside), two
``run_scanner`` processes, Debian's ``/usr/bin/chromium`` driven by
Playwright's Python package (no browser is downloaded; ``deploy/bootstrap.sh
--test`` installs the Debian package). One test-only change: each scanner
waits 40 ms before reading a file, as a slow network share would make it.
Unslowed, the 120-file library is scanned in a fraction of a second, faster
than a person (or this test) could see any progress; the pause changes no
logic and is applied only in these processes.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from bench.live import WebServer
from workers.library.libraries import add_library
from workers.models import Track

from tests.conftest import ROOT, manage
from tests.live.browser import CHROMIUM, FLAGS, collect_static, login, make_user, playwright, wait_live

pytestmark = pytest.mark.slow

SLOW_READ_SECONDS = 0.04
COPIES = 5

SLOW_SCANNER = """
import os, sys, time
import django
django.setup()
from workers.library import fileinfo
_read = fileinfo.read
def slow_read(path):
    time.sleep(float(os.environ["SLOW_READ_SECONDS"]))
    return _read(path)
fileinfo.read = slow_read
from django.core.management import call_command
call_command("run_scanner")
"""

def demo_library(path: Path, env: dict) -> Path:
    """24 synthesized tracks, the tree copied ``COPIES`` times: 120 files in many folders, made quickly."""
    manage("make_demo_library", path / "Set 0", "--tracks", 24, "--min-seconds", 1, "--max-seconds", 2,
           "--jobs", 2, env=env, timeout=300)
    for i in range(1, COPIES):
        shutil.copytree(path / "Set 0", path / f"Set {i}")
    return path


def slow_scanner(env: dict, number: int, log: Path):
    import subprocess

    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", SLOW_SCANNER], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, "SLOW_READ_SECONDS": str(SLOW_READ_SECONDS),
                                     "EARMARK_WORKER_NUMBER": str(number)})


def scan_row_state(page, library_id: int) -> dict:
    return page.evaluate("""id => {
        const row = document.querySelector(`#earmark-scans tr[data-key="scan:${id}"]`);
        const workers = Array.from(document.querySelectorAll('#earmark-workers td[data-field="state"]'));
        return {
            folders: row ? row.querySelector('[data-field="folders"]').textContent : null,
            eta: row ? row.querySelector('[data-field="eta"]').textContent : null,
            state: row ? row.dataset.state : null,
            busy: workers.filter(td => td.textContent === "busy").length,
            marker: window.__earmarkNoReload === true,
        };
    }""", library_id)


def test_dashboard_shows_a_scan_from_the_admin_live(worker_env, tmp_path, django_user_model, artifacts_dir):
    library = add_library("demo", str(demo_library(tmp_path / "music", worker_env)))
    make_user(django_user_model, "alice", is_staff=True, is_superuser=True)
    collect_static(worker_env)
    server = WebServer(worker_env, tmp_path / "web.log").start()
    scanners = [slow_scanner(worker_env, n, tmp_path / f"scanner{n}.log") for n in range(2)]
    seen: list[dict] = []
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1400, "height": 1000})
            try:
                seen = drive(browser, server.url, library.id, artifacts_dir)
            finally:
                browser.close()
    finally:
        for p in scanners:
            p.terminate()
        for p in scanners:
            p.wait(30)
        server.stop()
    # Progress moved in steps on the same page: several distinct partial states before "done".
    partial = {s["folders"] for s in seen if s["state"] == "running" and s["folders"]}
    assert len(partial) >= 3, seen
    # The scan's time left and rate appeared and changed while it ran (workers/live/eta.py), and went with it.
    etas = [s["eta"] for s in seen if s["state"] == "running" and s["eta"]]
    assert any("min (" in e and "folders/min)" in e for e in etas) and len(set(etas)) >= 2, seen
    assert seen[-1]["eta"] == "", seen[-1]
    assert Track.objects.filter(library=library, state="scanned").count() == 24 * COPIES


def drive(browser, base: str, library_id: int, artifacts_dir: Path) -> list[dict]:
    """The person's part; returns what the dashboard showed while the scan ran."""
    dashboard = browser.new_page()
    errors: list[str] = []
    dashboard.on("pageerror", lambda exc: errors.append(str(exc)))
    login(dashboard, base, "alice", "/admin/dashboard/")
    wait_live(dashboard)
    dashboard.wait_for_function(
        "document.querySelectorAll('#earmark-workers td[data-field=\"state\"]').length === 2", timeout=30_000)
    dashboard.evaluate("window.__earmarkNoReload = true")

    admin = browser.new_page()  # a second tab: the dashboard itself is never reloaded
    admin.goto(f"{base}/admin/workers/library/")
    admin.check(f'input[name="_selected_action"][value="{library_id}"]')
    admin.select_option('select[name="action"]', "scan")
    admin.click('button[name="index"]')
    admin.wait_for_selector(".messagelist .success")
    # Back to the dashboard tab, as a person would: a background tab paints no frames, so a screenshot
    # of it waits seconds for one, and the samples below would miss the scan's steps.
    dashboard.bring_to_front()

    seen, deadline, shot = [], time.monotonic() + 60, False
    while time.monotonic() < deadline:
        state = scan_row_state(dashboard, library_id)
        seen.append(state)
        assert state["marker"], "the dashboard page was reloaded"
        if state["busy"] and state["state"] == "running" and not shot:
            dashboard.screenshot(path=str(artifacts_dir / "dashboard-scan-running.png"), full_page=True)
            shot = True
        if state["state"] == "done":
            break
        time.sleep(0.1)
    assert not errors, f"the dashboard's script failed: {errors}"
    assert any(s["busy"] for s in seen), "no worker was ever shown busy"
    assert seen[-1]["state"] == "done", seen[-5:]
    dashboard.screenshot(path=str(artifacts_dir / "dashboard-scan-done.png"), full_page=True)
    return seen
