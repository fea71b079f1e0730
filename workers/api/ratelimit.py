"""A fixed-window request limit in Django's cache, one counter per token and one per client IP.

Each window (``EARMARK_API_RATE_WINDOW_SECONDS``, 60 s) allows
``EARMARK_API_RATE_PER_TOKEN`` requests per token and ``EARMARK_API_RATE_PER_IP``
per client address (0: no limit); the counter is one atomic ``incr`` of a key
named after the window, so it needs no clean-up. With the default local-memory
cache the counts are per web process (the quick start runs one); a shared cache
(``CACHES``) makes them per site.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import caches

clock = time.time  # tests pin it, so that a window cannot roll over in the middle of one


@dataclass(frozen=True)
class Refusal:
    kind: str  # "token" or "ip"
    retry_after: int  # whole seconds until the window ends


def window_seconds() -> int:
    return max(1, int(getattr(settings, "EARMARK_API_RATE_WINDOW_SECONDS", 60)))


def hit(kind: str, ident: str, limit: int) -> Refusal | None:
    """Count one request of ``ident``; a ``Refusal`` once it is over ``limit`` in this window."""
    if limit <= 0:
        return None
    cache = caches[getattr(settings, "EARMARK_API_RATE_CACHE", "default")]
    size, now = window_seconds(), clock()
    window = int(now // size)
    key = f"earmark:api:rate:{kind}:{ident}:{window}"
    cache.add(key, 0, timeout=size * 2)
    try:
        count = cache.incr(key)
    except ValueError:  # evicted between add and incr
        cache.set(key, 1, timeout=size * 2)
        count = 1
    if count <= limit:
        return None
    return Refusal(kind, max(1, math.ceil((window + 1) * size - now)))


def per_ip(ip: str) -> Refusal | None:
    return hit("ip", ip, int(getattr(settings, "EARMARK_API_RATE_PER_IP", 300)))


def per_token(token_id: int) -> Refusal | None:
    return hit("token", str(token_id), int(getattr(settings, "EARMARK_API_RATE_PER_TOKEN", 120)))
