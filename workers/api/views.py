"""``POST /api/enqueue`` and ``GET /api/tracks``: the hooks' HTTP endpoints, token-authenticated only.

Every request goes through ``api_view``, in this order: the client IP's rate
limit (429), the method (405), the key (``Authorization: Bearer <key>`` or
``X-Api-Key: <key>``; 401 without one, with a wrong one or a revoked one), the
token's rate limit (429), then the endpoint. Sessions are never consulted (a
logged-in admin without a key gets 401), so the views are CSRF-exempt: a
cross-site page cannot attach a key. Each request is logged to ``earmark.api``
with the token's name, the client IP, the method, the path (never the query
string, never a header) and the status.

Scope: a request naming any path outside the token's libraries (attributed to
a library as ``workers.library.enqueue`` does, see ``tokens.Scope``; outside
every library is outside the token's too) is refused as a whole with 403 and
queues nothing, so a misconfigured hook fails loudly instead of half-working.
Everything else about a path (missing, not audio, a symlink leading out) is
that path's own error in the 202 answer, from ``workers.library.enqueue``,
which checks the library roots again.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from workers.api import ratelimit, tokens
from workers.library import enqueue, paths
from workers.models import ApiToken, Job, Track

logger = logging.getLogger("earmark.api")
REALM = 'Bearer realm="earmark"'


@dataclass
class Call:
    """What the log line says about one request."""

    ip: str
    token: ApiToken | None = None
    detail: str = ""


class Refused(Exception):
    def __init__(self, status: int, error: str, headers: dict | None = None, **extra):
        super().__init__(error)
        self.status, self.error, self.headers, self.extra = status, error, headers or {}, extra

    def response(self) -> JsonResponse:
        response = JsonResponse({"error": self.error, **self.extra}, status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def api_view(*methods: str):
    """An API endpoint ``handler(request, token, call) -> JsonResponse``: limited, authenticated, logged."""
    def wrap(handler):
        @csrf_exempt
        @functools.wraps(handler)
        def view(request):
            call, status, started = Call(ip=request.META.get("REMOTE_ADDR", "") or "-"), 500, time.monotonic()
            try:
                try:
                    response = _serve(request, handler, methods, call)
                except Refused as refusal:
                    response = refusal.response()
                response["Cache-Control"] = "no-store"
                status = response.status_code
                return response
            finally:
                _log(request, call, status, time.monotonic() - started)
        return view
    return wrap


def _serve(request, handler, methods, call: Call):
    refusal = ratelimit.per_ip(call.ip)
    if refusal:
        raise Refused(429, "too many requests from this address", {"Retry-After": str(refusal.retry_after)})
    if request.method not in methods:
        raise Refused(405, f"{request.method} is not allowed here", {"Allow": ", ".join(methods)})
    key = _key(request)
    if not key:
        raise Refused(401, "an API key is required (Authorization: Bearer <key>, or X-Api-Key)",
                      {"WWW-Authenticate": REALM})
    token = tokens.lookup(key)
    if token is None or token.revoked_at is not None:
        call.token = token  # a revoked token's name still goes to the log; an unknown key has none
        error = "this API key was revoked" if token is not None else "this API key is not valid"
        raise Refused(401, error, {"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
    call.token = token
    refusal = ratelimit.per_token(token.id)
    if refusal:
        raise Refused(429, "too many requests with this API key", {"Retry-After": str(refusal.retry_after)})
    tokens.touch(token)
    return handler(request, token, call)


def _key(request) -> str:
    """The key from ``Authorization: Bearer …`` (first) or ``X-Api-Key``; "" when neither carries one."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-Api-Key", "").strip()


def _log(request, call: Call, status: int, seconds: float) -> None:
    name = call.token.name if call.token is not None else "-"
    level = logging.WARNING if status >= 500 else logging.INFO
    logger.log(level, "%s %s %s token=%s ip=%s %.0fms%s", request.method, request.path, status, name, call.ip,
               seconds * 1000, f" {call.detail}" if call.detail else "")


# --- the endpoints ------------------------------------------------------------------------------------


@api_view("POST")
def enqueue_view(request, token: ApiToken, call: Call):
    """``{"paths": [...]}`` → 202 ``{"ok", "results": [{"path", "ok", "error", "job_ids", "track_ids"}]}``."""
    wanted = _paths_from(request)
    scope = tokens.Scope(token)
    outside = [p for p in wanted if not scope.allows(p)]
    if outside:
        call.detail = f"paths={len(wanted)} outside={len(outside)}"
        raise Refused(403, "these paths are outside this token's libraries; nothing was queued", forbidden=outside)
    outcomes = enqueue.enqueue_paths(wanted, libraries=list(token.libraries.all()), reason=f"api:{token.name}")
    results = [{"path": o.path, "ok": o.ok, "error": o.error, "job_ids": list(o.job_ids),
                "track_ids": list(o.track_ids)} for o in outcomes]
    good = sum(1 for r in results if r["ok"])
    call.detail = f"paths={len(wanted)} ok={good}"
    return JsonResponse({"ok": good == len(results), "results": results}, status=202)


def _paths_from(request) -> list[str]:
    """The body's ``paths``: a non-empty list of absolute paths, at most ``EARMARK_API_MAX_PATHS``; else 400."""
    try:
        body = json.loads(request.body or b"null")
    except RequestDataTooBig:
        raise Refused(413, "the request body is too large; send fewer paths per request") from None
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, 'the body must be JSON: {"paths": ["/music/Album", ...]}') from None
    wanted = body.get("paths") if isinstance(body, dict) else None
    if not isinstance(wanted, list) or not wanted:
        raise Refused(400, 'the body must be a JSON object with a non-empty list "paths"')
    limit = int(getattr(settings, "EARMARK_API_MAX_PATHS", 1000))
    if len(wanted) > limit:
        raise Refused(400, f"at most {limit} paths per request (this one has {len(wanted)})")
    for i, item in enumerate(wanted):
        problem = _bad_path(item)
        if problem:
            raise Refused(400, f"paths[{i}] {problem}")
    return wanted


def _bad_path(item) -> str:
    if not isinstance(item, str) or not item:
        return "must be a non-empty string"
    if "\x00" in item:
        return "contains a NUL character"
    if not item.startswith("/"):
        return "must be an absolute path (the web process has no useful working directory)"
    return ""


@api_view("GET")
def tracks_view(request, token: ApiToken, call: Call):
    """``?path=…`` → the track's state, error, Earmark's tags, tempo, key, loudness and standard tags."""
    path = request.GET.get("path", "")
    problem = _bad_path(path)
    if problem:
        raise Refused(400, f"the query parameter path {problem}")
    if not tokens.Scope(token).allows(path):
        raise Refused(403, "this path is outside this token's libraries")
    raw = os.fsencode(path)
    candidates = {path, paths.to_text(os.path.normpath(raw)), paths.to_text(os.path.realpath(raw))}
    track = (Track.objects.filter(path__in=candidates, library__in=token.libraries.all())
             .select_related("library").order_by("id").first())
    if track is None:
        raise Refused(404, "no track is known at this path (not scanned yet, or not audio)")
    call.detail = f"track={track.id}"
    return JsonResponse(describe(track))


TRACK_FIELDS = ["id", "path", "state", "error", "earmark_tags", "genre_low_confidence", "bpm", "bpm_confidence",
                "musical_key", "key_confidence", "loudness_lufs", "track_gain_db", "track_peak", "album_gain_db",
                "album_peak", "artist", "album", "title", "tags", "format", "duration", "model_version",
                "calibration_version"]


def describe(track: Track) -> dict:
    """A track as the API answers it; ``tags`` are the file's own (standard) tags as last scanned."""
    out = {name: getattr(track, name) for name in TRACK_FIELDS}
    out["library"] = track.library.name
    for name in ("scanned_at", "tagged_at"):
        value = getattr(track, name)
        out[name] = value.isoformat() if value else None
    out["jobs"] = [{"id": j.id, "queue": j.queue, "state": j.state}
                   for j in Job.objects.filter(track=track, state__in=Job.ACTIVE_STATES).order_by("id")]
    return out
