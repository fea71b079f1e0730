"""API keys: made once, stored as a digest, found by prefix, checked in constant time, revoked and kept.

A key reads ``em_<prefix>_<secret>``: ``prefix`` (8 hex digits, stored in the
clear and unique) finds the row, and the SHA-256 of the whole key is compared
with the stored digest through ``hmac.compare_digest``. The secret is 32 random
bytes (``secrets.token_urlsafe``), so a plain fast hash is enough: there is
nothing to guess that a slow password hash would protect. The key itself is
returned once, by ``create``, and never stored nor logged. ``Scope`` says
whether a path lies in one of a token's libraries.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from workers.library import paths, scan
from workers.models import ApiToken, Library

KEY_PREFIX = "em"
LAST_USED_RESOLUTION_SECONDS = 10  # last_used_at is refreshed at most this often per token (one write, not one per request)


@dataclass
class Created:
    token: ApiToken
    key: str  # shown once to the person who made it; only its digest is stored


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(prefix, key)``; the prefix is unique among the stored tokens."""
    while True:
        prefix = secrets.token_hex(4)
        if not ApiToken.objects.filter(prefix=prefix).exists():
            return prefix, f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"


def validate_name(name: str, exclude_id: int | None = None) -> str:
    """A token's name: what the log and the admin call it; no two live (unrevoked) tokens share one."""
    name = (name or "").strip()
    if not name:
        raise ValidationError("a token needs a name (it appears in the API log)")
    if any(ch.isspace() and ch != " " for ch in name) or not name.isprintable():
        raise ValidationError("a token's name is one line of printable text")
    clash = ApiToken.objects.filter(name=name, revoked_at__isnull=True).exclude(id=exclude_id)
    if clash.exists():
        raise ValidationError(f"a live token named {name!r} exists already (revoke it first)")
    return name


def issue(token: ApiToken) -> str:
    """Give an unsaved token its prefix and digest; returns the key (the admin's add view uses this)."""
    token.prefix, key = new_key()
    token.digest = digest(key)
    return key


@transaction.atomic
def create(name: str, libraries: Iterable[Library], created_by=None) -> Created:
    token = ApiToken(name=validate_name(name), created_by=created_by)
    key = issue(token)
    token.save()
    token.libraries.set(list(libraries))
    return Created(token, key)


def revoke(tokens) -> int:
    """Revoke the given tokens (a queryset) that are still live; returns how many were."""
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


def find(name_or_prefix: str):
    """The tokens a person means by a name or a prefix (``revoke NAME``)."""
    return ApiToken.objects.filter(Q(name=name_or_prefix) | Q(prefix=name_or_prefix))


def lookup(key: str) -> ApiToken | None:
    """The token whose digest this key matches, revoked or not (the caller refuses a revoked one, by name)."""
    parts = (key or "").split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    token = ApiToken.objects.filter(prefix=parts[1]).first()
    expected = token.digest if token is not None else digest("not-a-key")  # the same work either way
    if not hmac.compare_digest(expected, digest(key)) or token is None:
        return None
    return token


def touch(token: ApiToken) -> None:
    """Record that the token was used now (shown in the admin), at most every few seconds."""
    now = timezone.now()
    stale = now - timedelta(seconds=LAST_USED_RESOLUTION_SECONDS)
    ApiToken.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale), id=token.id).update(
        last_used_at=now)


class Scope:
    """Which library a path belongs to, and whether it is one of the token's.

    The same attribution as ``workers.library.enqueue``: the entry's folder is
    resolved and its own name is not (a symlink inside a library belongs to that
    library, and enqueue then refuses it if it leads out); a symlink from outside
    every library belongs where it leads; the deepest root wins when libraries
    nest. A path outside every library is outside the token's too.
    """

    def __init__(self, token: ApiToken):
        self.allowed = set(token.libraries.values_list("id", flat=True))
        self.roots = sorted(((lib, scan.resolved_root(lib)) for lib in Library.objects.all()),
                            key=lambda pair: len(pair[1]), reverse=True)

    def owner(self, path: str) -> Library | None:
        raw = os.fsencode(path)
        head, tail = os.path.split(raw.rstrip(b"/") or b"/")
        if tail in (b"", b".", b".."):
            location = os.path.realpath(raw)
        else:
            location = os.path.join(os.path.realpath(head), tail)
        return self._library_of(location) or self._library_of(os.path.realpath(raw))

    def allows(self, path: str) -> bool:
        lib = self.owner(path)
        return lib is not None and lib.id in self.allowed

    def _library_of(self, resolved: bytes) -> Library | None:
        for lib, root in self.roots:
            if paths.is_within(resolved, root):
                return lib
        return None
