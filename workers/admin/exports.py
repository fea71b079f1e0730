"""``/admin/exports/…``: the navidrome.toml snippet and the playlists as downloads (``manage.py export`` in the admin).

Both are GETs that change nothing. They are for staff who may view tracks
(``workers.view_track``): ``admin_view`` sends everyone else to the login page,
and staff without the permission get 403.

* ``navidrome/``: the snippet, as the attachment ``navidrome-earmark.toml``.
* ``playlists/?format=nsp|m3u&library=NAME&dir=/abs/path``: a zip of the
  playlists. ``dir`` (m3u only) is where the playlists will be unpacked, since
  their paths are relative to it; it defaults to the library's root (the root
  the libraries share, without ``library``).
"""
from __future__ import annotations

import os

from django.core.exceptions import PermissionDenied
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404

from workers.models import Library
from workers.tagging import navidrome, playlists

PERMISSION = "workers.view_track"
SNIPPET_NAME = "navidrome-earmark.toml"


def _check(request) -> None:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied("exports need permission to view tracks")


def _attachment(data, content_type: str, filename: str) -> HttpResponse:
    response = HttpResponse(data, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def navidrome_download(request):
    _check(request)
    return _attachment(navidrome.snippet(), "text/plain; charset=utf-8", SNIPPET_NAME)


def playlists_download(request):
    _check(request)
    fmt = request.GET.get("format", "nsp")
    if fmt not in playlists.FORMATS:
        return HttpResponseBadRequest(f"format must be one of {', '.join(playlists.FORMATS)}")
    library = None
    if request.GET.get("library"):
        library = get_object_or_404(Library, name=request.GET["library"])
    base_dir = request.GET.get("dir") or playlists.default_base(library)
    if fmt == "m3u" and not os.path.isabs(base_dir):
        return HttpResponseBadRequest("dir must be an absolute path: where the playlists will be unpacked")
    made = playlists.build(fmt, library=library, base_dir=base_dir)
    stem = playlists.safe_stem(f"earmark-playlists-{fmt}", library.name) if library else f"earmark-playlists-{fmt}"
    return _attachment(playlists.zip_bytes(made), "application/zip", f"{stem}.zip")
