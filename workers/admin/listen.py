"""Playing a track in the browser: its file, served to staff only, with HTTP range requests.

An ``<audio>`` element asks for byte ranges (to start playing before the
whole file is there, and to seek), so the view answers ``Range: bytes=a-b``
with ``206 Partial Content``; a range is served at most ``CHUNK`` bytes at a
time and the browser asks for the next. The file must still lie inside its
library's root, as everywhere else: a symlink swapped in since the scan that
leads outside is refused, never followed.
"""
from __future__ import annotations

import os
import re

from django.http import FileResponse, Http404, HttpResponse

from workers.library import paths, scan
from workers.models import Track

CHUNK = 4 << 20
MIME = {"mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg", "opus": "audio/ogg", "m4a": "audio/mp4",
        "alac": "audio/mp4", "wav": "audio/wav", "aiff": "audio/aiff"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def audio_response(request, track: Track):
    """The track's file, whole (200) or the range asked for (206); 404 for a file gone or outside its library."""
    path = paths.to_bytes(track.path)
    real = os.path.realpath(path)
    if not paths.is_within(real, scan.resolved_root(track.library)) or not os.path.isfile(real):
        raise Http404("the file is gone or no longer inside its library")
    size = os.path.getsize(real)
    content_type = MIME.get(track.format, "application/octet-stream")
    wanted = _range(request.headers.get("Range", ""), size)
    if wanted is None:
        response = FileResponse(open(real, "rb"), content_type=content_type)
    elif wanted == "unsatisfiable":
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    else:
        start, end = wanted
        with open(real, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        response = HttpResponse(body, status=206, content_type=content_type)
        response["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{size}"
    response["Accept-Ranges"] = "bytes"
    response["Cache-Control"] = "private, no-store"
    return response


def _range(header: str, size: int):
    """``(start, end)`` inclusive and at most ``CHUNK`` long; None for no (or a multi-part) range."""
    match = _RANGE.match(header.strip())
    if not match or size == 0:
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        if not last:
            return None
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, min(end, start + CHUNK - 1)
