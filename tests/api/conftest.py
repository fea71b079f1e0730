"""The API tests' world: two libraries with a file each, a token for one of them, a clean rate-limit cache."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.cache import caches
from django.test import Client

from workers.api import ratelimit, tokens
from workers.library.libraries import add_library
from workers.models import Library

from tests.audio_factory import make_file

ENQUEUE, TRACKS = "/api/enqueue", "/api/tracks"


@dataclass
class World:
    a: Library  # the token's library
    b: Library  # another one
    a_root: Path
    b_root: Path
    song: Path  # an mp3 inside A
    other: Path  # an mp3 inside B
    key: str  # the token's key, for library A only
    client: Client

    def post(self, body, key: str | None = "", **headers):
        """POST to /api/enqueue with the world's key (``key=None``: none); ``body`` a dict, or raw text."""
        key = self.key if key == "" else key
        if key is not None:
            headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {key}")
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.client.post(ENQUEUE, data=data, content_type="application/json", **headers)

    def get(self, path: str | None, key: str | None = "", **headers):
        key = self.key if key == "" else key
        if key is not None:
            headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {key}")
        return self.client.get(TRACKS, {} if path is None else {"path": path}, **headers)


@pytest.fixture(autouse=True)
def _fresh_rate_limits(monkeypatch):
    """Counters start at zero, and the window cannot roll over in the middle of a test: its clock is pinned."""
    caches["default"].clear()
    monkeypatch.setattr(ratelimit, "clock", lambda: 1_000_000.5)
    yield
    caches["default"].clear()


@pytest.fixture
def world(db, tmp_path) -> World:
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    song = make_file(a_root / "Album", "mp3", seconds=1.0, name="01 song.mp3")
    other = make_file(b_root / "Other", "mp3", seconds=1.0, name="01 other.mp3")
    a, b = add_library("A", str(a_root)), add_library("B", str(b_root))
    made = tokens.create("lidarr", [a])
    return World(a, b, a_root.resolve(), b_root.resolve(), song.resolve(), other.resolve(), made.key,
                 Client(enforce_csrf_checks=True))
