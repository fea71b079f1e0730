"""Access and secrets: who may look and act, what may be read or written, what never reaches a log.

* The admin and ``/events/`` are for active staff only, checked before any page or stream opens.
* Every admin action, and every other admin endpoint that changes something, is a POST that
  Django's CSRF check guards (``Client(enforce_csrf_checks=True)``): without the token, 403 and
  nothing changes; a GET changes nothing either.
* A library path must be an existing directory (admin form and ``library add``).
* Nothing outside a library root is read or written, symlinks included: real tagger and
  recalibrator processes, with the decoder's test-only abort hook armed on every outside path
  (a read would kill the process) and the outside files' bytes and mtimes compared.
* supervisord's control socket is mode 0700.
* Production settings refuse to start without ``SECRET_KEY`` (or with an empty one);
  ``manage.py check --deploy`` is clean with production settings and ``EARMARK_HTTPS=1``.
* Neither the secret key nor the database password appears in any supervisord, web or worker
  log, nor in command output, even when a worker fails to reach its database.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from django.contrib import admin
from django.db import connection
from django.test import Client, RequestFactory
from django.urls import reverse

from workers.calibration import compute
from workers.jobs import queue
from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Calibration, Job, Library, Meta, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX
from workers.tagfiles.namespace import read_earmark_tags

from tests.audio_factory import make_file
from tests.conftest import ROOT, STANDARD_FORM, drain_scans, manage, wait_for
from tests.supervisor_harness import Supervisor

EVENTS = "/events/?channel=workers&channel=queues&channel=jobs"
PAGES = ["/admin/", "/admin/workers/library/", "/admin/workers/track/", "/admin/workers/job/",
         "/admin/workers/meta/", "/admin/workers/calibration/", "/admin/dashboard/", "/admin/dashboard/plots/",
         EVENTS, "/events/?channel=workers"]
NEVER = "NEVER-READ"


# --- who may look ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["anonymous", "not staff", "inactive staff"])
def test_admin_and_events_are_for_active_staff_only(client, django_user_model, who):
    if who == "not staff":
        client.force_login(django_user_model.objects.create_user("plain", password="pw"))
    elif who == "inactive staff":
        user = django_user_model.objects.create_user("gone", password="pw", is_staff=True)
        client.force_login(user)
        django_user_model.objects.filter(id=user.id).update(is_active=False)
    for url in PAGES:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), (url, response)
        assert not getattr(response, "streaming", False), url
    queue.enqueue("scan", "x")
    for url, data in (("/admin/dashboard/supervisor/", {"action": "stop", "group": "scanner"}),
                      (reverse("admin:workers_calibration_compute"), {}),
                      (reverse("admin:workers_job_changelist"), {"action": "cancel",
                                                                 "_selected_action": [Job.objects.get().id]})):
        response = client.post(url, data)
        assert response.status_code in (302, 403), (url, response.status_code)
    assert Job.objects.get().state == "queued", "nothing was done for them"


# --- what staff may do, and how ---------------------------------------------------------------


def _database_state() -> tuple:
    return (sorted(Job.objects.values_list("id", "state", "attempts")),
            sorted(Track.objects.values_list("id", "state")), Library.objects.count(),
            Calibration.objects.count(), sorted(Meta.objects.values_list("key", flat=True)))


@pytest.mark.django_db
def test_every_admin_action_is_a_csrf_protected_post(admin_user, tmp_path):
    library = add_library("music", str(tmp_path))
    track = Track.objects.create(library=library, path=str(tmp_path / "a.mp3"), folder=str(tmp_path), state="scanned")
    queue.enqueue("tag", "t", track_id=track.id)
    queue.pause("calibrate")
    Calibration.objects.create(version="cal-test", model_version="m", stats={}, track_count=1)
    objects = {Library: library, Track: track, Job: Job.objects.get(), Calibration: Calibration.objects.get(),
               Meta: Meta.objects.first()}
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    checked = []
    for model, model_admin in admin.site._registry.items():
        if model not in objects:
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for action in model_admin.get_actions(request):
            data = {"action": action, "_selected_action": [objects[model].pk]}
            before = _database_state()
            refused = client.post(url, data)
            assert refused.status_code == 403, (model.__name__, action, refused.status_code)
            assert client.get(url, data).status_code in (200, 302)  # a GET only shows (or redirects to) the list
            assert _database_state() == before, f"{model.__name__}.{action} changed something without CSRF"
            page = client.get(url).content.decode()
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
            allowed = client.post(url, {**data, "csrfmiddlewaretoken": token})
            assert allowed.status_code in (200, 302), (model.__name__, action, allowed.status_code)
            checked.append(f"{model.__name__}.{action}")
    assert {"Library.scan", "Library.full_scan", "Track.retag", "Track.recalibrate", "Job.retry", "Job.cancel",
            "Calibration.make_current", "Calibration.export_json"} <= set(checked), checked
    # The other endpoints that act: POST only, with the token.
    for url in ("/admin/dashboard/supervisor/", reverse("admin:workers_calibration_compute")):
        before = _database_state()
        assert client.get(url).status_code == 405, url
        assert client.post(url, {"action": "stop", "group": "scanner"}).status_code == 403, url
        assert _database_state() == before


@pytest.mark.django_db
def test_a_library_path_must_be_an_existing_directory(admin_user, tmp_path, worker_env):
    (tmp_path / "a-file.mp3").write_bytes(b"not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    url = reverse("admin:workers_library_add")
    for bad in (tmp_path / "nowhere", tmp_path / "a-file.mp3", tmp_path / "dangling"):
        page = client.get(url).content.decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        response = client.post(url, {"name": "x", "root": str(bad), "write_mode": "minimal", **STANDARD_FORM,
                                     "csrfmiddlewaretoken": token})
        assert response.status_code == 200 and "is not an existing directory" in response.content.decode(), bad
        out = manage("library", "add", "x", bad, env=worker_env, check=False)
        assert out.returncode != 0 and "is not an existing directory" in out.stderr, (bad, out.stderr)
    assert not Library.objects.exists()
    out = manage("library", "add", "x", tmp_path, env=worker_env)
    assert Library.objects.get().root == str(tmp_path.resolve()) and "added library x" in out.stdout


# --- nothing outside the roots -------------------------------------------------------------------


def _fingerprint(path: Path) -> tuple:
    st = os.stat(path)
    return path.read_bytes(), st.st_mtime_ns, st.st_size


@pytest.mark.slow
def test_nothing_outside_a_library_root_is_read_or_written(worker_env, tmp_path, installed_models_dir):
    root, outside = tmp_path / "music", tmp_path / "private"
    inside = make_file(root, "mp3", seconds=2.5, seed=1, name="inside.mp3")
    later_link = make_file(root, "mp3", seconds=2.5, seed=2, name="b.mp3")
    swapped = make_file(root, "flac", seconds=2.5, seed=3, name=f"swapped-{NEVER}.flac")
    targets = {name: make_file(outside, fmt, seconds=2.5, seed=10 + i, name=f"{NEVER}-{name}.{fmt}")
               for i, (name, fmt) in enumerate([("target", "flac"), ("direct", "ogg"), ("in-dir", "mp3"),
                                                ("b", "mp3")])}
    (root / "a linked folder").symlink_to(outside)  # a directory link out of the root: never followed
    library = add_library("music", str(root))
    scan.request_scan(library)
    assert drain_scans() == []
    assert not Track.objects.filter(path__contains=str(outside)).exists(), "the linked folder was not followed"
    # After the scan, a file is swapped for a link out of the root; and a track row names an outside
    # path outright (as a library whose root was edited would leave behind).
    swapped.unlink()
    swapped.symlink_to(targets["target"])
    direct = Track.objects.create(library=library, path=str(targets["direct"]), folder=str(outside),
                                  state="scanned", size=targets["direct"].stat().st_size)
    queue.enqueue("tag", f"tag:{direct.id}", track_id=direct.id, library_id=library.id)
    before = {p: _fingerprint(p) for p in targets.values()}

    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir), EARMARK_TEST_ABORT_MARKER=NEVER)
    out = manage("run_tagger", "--exit-when-idle", env=env, timeout=180)  # an abort would fail this
    for path in (swapped, targets["direct"]):
        job = Job.objects.get(queue="tag", track__path=str(path))
        assert job.state == "failed" and "outside the library root" in job.last_error and "not read" in job.last_error
    for path in (inside, later_link):
        assert Track.objects.get(path=str(path)).state == "tagged"

    # The recalibrator: a tagged file swapped for a link out of the root is not written.
    data = later_link.read_bytes()
    targets["b"].write_bytes(data)
    before[targets["b"]] = _fingerprint(targets["b"])
    later_link.unlink()
    later_link.symlink_to(targets["b"])
    result = compute.recalibrate(min_count=1)
    assert result.jobs == 2
    out = manage("run_recalibrator", "--exit-when-idle", env=env, timeout=120)
    job = Job.objects.get(queue="calibrate", track__path=str(later_link))
    assert job.state == "failed" and "outside the library root" in job.last_error and "not written" in job.last_error
    assert Job.objects.get(queue="calibrate", track__path=str(inside)).state == "done"
    assert f"calibration={result.calibration.version}" in read_earmark_tags(inside)["version"][0]

    assert {p: _fingerprint(p) for p in targets.values()} == before, "no outside file was changed"
    assert not list(outside.rglob(f"{TEMP_PREFIX}*")) and not list(root.rglob(f"{TEMP_PREFIX}*"))
    assert "Traceback" not in out.stdout + out.stderr


# --- the supervisor socket and secrets in logs -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # report the redirect itself (an HTTPError with its 3xx code)


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(url: str, data: dict | None = None, headers: dict | None = None) -> int:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with _OPENER.open(urllib.request.Request(url, data=body, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return 0  # not listening yet


@pytest.mark.slow
def test_supervisor_socket_is_private_and_no_secret_reaches_any_log(worker_env, tmp_path):
    secret_key = "earmark-secret-" + secrets.token_urlsafe(32)
    db_password = connection.settings_dict.get("PASSWORD") or ""
    port = _free_port()
    env = dict(worker_env, SECRET_KEY=secret_key, EARMARK_DATA_DIR=str(tmp_path / "data"))
    manage("collectstatic", "--noinput", env=env)  # production serves hashed static files, as the quick start does
    root = tmp_path / "music"
    make_file(root, "mp3", seconds=1.0, name="a.mp3")
    library = add_library("music", str(root))
    sup = Supervisor(env, tmp_path / "sup", EARMARK_SCANNERS=2, EARMARK_WEB_AUTOSTART="true",
                     EARMARK_WEB_PORT=port).start()
    try:
        sock = Path(sup.env["EARMARK_SUPERVISOR_SOCKET"])
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o700
        scan.request_scan(library)
        wait_for(lambda: scan.progress(library).get("state") == "done", timeout=60, message="a scan")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/admin/login/") == 200, timeout=30, message="the web process")
        # What a visitor can make the web process do: pages, a refused stream, a failed login, a 404, a bad host.
        assert _get(base + EVENTS) == 302
        assert _get(base + "/admin/login/", {"username": "admin", "password": secret_key}) == 403  # no CSRF token
        assert _get(base + "/no/such/page/") == 404
        assert _get(base + "/admin/", headers={"Host": "evil.example.com"}) == 400  # DisallowedHost is logged
        sup.ctl("stop", "all")
    finally:
        sup.stop()
    outputs = [sup.proc.stdout.read() if sup.proc and sup.proc.stdout else ""]
    for args in (("check", "--deploy"), ("workers", "status", "--json"), ("queue", "status", "--json"),
                 ("library", "show", "music", "--json"), ("library", "list")):
        proc = manage(*args, env=env, check=False)
        outputs += [proc.stdout, proc.stderr]
    # A worker that cannot reach its database says so without the password it was given.
    pg_password = "pg-" + secrets.token_urlsafe(16)
    failing = dict(env, DATABASE_URL=f"postgres://earmark:{pg_password}@127.0.0.1:{_free_port()}/earmark")
    proc = manage("run_scanner", "--exit-when-idle", env=failing, check=False, timeout=60)
    assert proc.returncode != 0
    outputs += [proc.stdout, proc.stderr]

    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "sup" / "log").iterdir() if p.is_file()}
    assert {"supervisord.log", "web.log", "scanner_00.log", "scanner_01.log"} <= set(logs)
    everything = "\n".join([*logs.values(), *outputs])
    assert "stopped" in logs["scanner_00.log"]
    for secret in filter(None, (secret_key, db_password, pg_password)):
        assert secret not in everything, "a secret reached a log or command output"


# --- settings ----------------------------------------------------------------------------------------


def _production_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SECRET_KEY", "DEBUG", "EARMARK_INSECURE_DEV_SECRET", "EARMARK_HTTPS", "DATABASE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="project.settings", EARMARK_DATA_DIR=str(tmp_path),
               DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    env.update(extra)
    return env


def _run(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_production_settings_refuse_to_start_without_a_secret_key(tmp_path):
    for env in (_production_env(tmp_path), _production_env(tmp_path, SECRET_KEY=""),
                _production_env(tmp_path, SECRET_KEY="   ")):
        for args in (["check"], ["run_scanner", "--exit-when-idle"]):
            proc = _run(args, env)
            assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
            assert "Set the SECRET_KEY environment variable" in proc.stderr, proc.stderr
    # Development (DEBUG) may run with a throwaway key; it says so in its name.
    assert _run(["check"], _production_env(tmp_path, DEBUG="1")).returncode == 0


def test_check_deploy_is_clean_with_production_settings_and_https(tmp_path):
    key = secrets.token_urlsafe(60)
    env = _production_env(tmp_path, SECRET_KEY=key, ALLOWED_HOSTS="earmark.example.com", EARMARK_HTTPS="1")
    proc = _run(["check", "--deploy"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues (0 silenced)." in proc.stdout, proc.stdout
    assert "WARNING" not in proc.stdout + proc.stderr and "security.W" not in proc.stdout + proc.stderr
    assert key not in proc.stdout + proc.stderr
    # The HTTPS-only settings are what that one variable switches on: without it, Django warns about them.
    plain = _run(["check", "--deploy"], _production_env(tmp_path, SECRET_KEY=key, ALLOWED_HOSTS="earmark.example.com"))
    assert "security.W004" in plain.stdout + plain.stderr and "security.W008" in plain.stdout + plain.stderr
