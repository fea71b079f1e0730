"""The API through the real web process: uvicorn serving the ASGI app with the production settings.

The whole middleware stack (CSRF included: a hook sends no CSRF token), the
production ``LOGGING`` (the ``earmark.api`` line lands in the web process's
log, which supervisord writes to ``web.log``), and a key made by the
``api_token`` command in its own process.
"""
from __future__ import annotations

import http.client
import json

import pytest

from bench.live import WebServer
from workers.library.libraries import add_library
from workers.models import Job

from tests.audio_factory import make_file
from tests.conftest import manage

pytestmark = pytest.mark.slow


def _call(server: WebServer, method: str, path: str, body=None, headers=None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data) if data else {}


def test_the_web_process_serves_the_api_and_logs_each_request(worker_env, tmp_path):
    song = make_file(tmp_path / "music" / "Album", "flac", seconds=1.0, name="01.flac").resolve()
    add_library("music", str(tmp_path / "music"))
    key = manage("api_token", "create", "lidarr-hook", "--library", "music", env=worker_env).stdout.strip()
    server = WebServer(worker_env, tmp_path / "web.log").start()
    try:
        status, _, body = _call(server, "POST", "/api/enqueue", {"paths": [str(song.parent)]},
                                {"Authorization": f"Bearer {key}"})
        assert status == 202, body
        assert body["ok"] and body["results"][0]["job_ids"] == [Job.objects.get(queue="scan").id]
        status, headers, _ = _call(server, "POST", "/api/enqueue", {"paths": [str(song)]})
        assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer")
        status, _, body = _call(server, "GET", f"/api/tracks?path={song}", headers={"X-Api-Key": key})
        assert status == 404, body  # queued, not scanned: no scanner runs here
        status, _, _ = _call(server, "POST", "/api/enqueue", {"paths": ["/etc/passwd"]},
                             {"Authorization": f"Bearer {key}"})
        assert status == 403
    finally:
        server.stop()
    log = server.log()
    lines = [line for line in log.splitlines() if " earmark.api[" in line]
    assert len(lines) == 4, log
    assert "POST /api/enqueue 202 token=lidarr-hook ip=127.0.0.1" in lines[0]
    assert "POST /api/enqueue 401 token=- ip=127.0.0.1" in lines[1]
    assert "GET /api/tracks 404 token=lidarr-hook" in lines[2] and "POST /api/enqueue 403 token=lidarr-hook" in lines[3]
    assert key.split("_", 2)[2] not in log and key not in log
