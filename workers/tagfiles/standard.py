"""Genre and mood in the standard fields players read, without destroying what the user wrote.

Navidrome, Jellyfin, Plex, Picard and beets read genre and mood from the
standard fields, which Picard maps per tag family:

==================  ==============================  ==========================================
field               ID3v2.4 (v2.3)                  Vorbis comment / MP4
==================  ==============================  ==========================================
genre               ``TCON``                        ``GENRE`` / ``©gen``
mood                ``TMOO`` (``TXXX:MOOD``)        ``MOOD`` / ``----:com.apple.iTunes:MOOD``
bpm                 ``TBPM``                        ``BPM`` / ``tmpo`` (an integer)
key                 ``TKEY``                        ``KEY`` / ``----:com.apple.iTunes:initialkey``
replaygain_*        ``TXXX:REPLAYGAIN_*``           ``REPLAYGAIN_*`` / ``----:com.apple.iTunes:replaygain_*``
r128_*              (none)                          ``R128_TRACK_GAIN``, ``R128_ALBUM_GAIN`` (Opus only)
==================  ==============================  ==========================================

The fields after genre and mood hold one value each, so ``append`` fills
them only where they are empty; and a gain goes with its peak: where the
user has either of a track's (or album's) pair, Earmark writes neither.

What goes there is the library's *policy*: ``off`` (nothing), ``fill-empty``
(only where the file has no value of its own), ``append`` (after the user's
values, skipping any the user has in another case) or ``replace``.

The earmark namespace's ``standard`` key records, per field, the values
Earmark put there (``ours``) and the field as it was before Earmark first
changed it (``original``: its stored text and ID3 encoding, or null when the
file had none). With it every later write can tell the user's values from
Earmark's, whatever the policy was then, and ``restore`` (the ``off``
policy, which ``untag`` uses) puts the field back exactly as it was, byte for
byte of its text, unless the user edited it since; then the user's values
stay and only Earmark's go.

This module plans the change from a parsed file (``plan``) and applies the
plan to a parsed file (``apply``); the safe writer does both, on its copy,
and checks the result.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from workers.tagfiles.families import FileTags, Raw

CATEGORY_FIELDS = ("genre", "mood")  # lists of the networks' values, capped by the library's limits
FEATURE_FIELDS = ("bpm", "key", "replaygain_track_gain", "replaygain_track_peak", "replaygain_album_gain",
                  "replaygain_album_peak", "r128_track_gain", "r128_album_gain")  # one measured value each
FIELDS = CATEGORY_FIELDS + FEATURE_FIELDS
PAIRS = (("replaygain_track_gain", "replaygain_track_peak"), ("replaygain_album_gain", "replaygain_album_peak"))
POLICIES = ("off", "fill-empty", "append", "replace")
DEFAULT_POLICY = "fill-empty"
DEFAULT_LIMITS = {"genre": 2, "mood": 2}
DEFAULT_SEPARATOR = "/"
RECORD_KEY = "standard"  # earmark:standard, the bookkeeping above


@dataclass(frozen=True)
class Request:
    """What to put in the standard fields: the policy and Earmark's values per field (plain data, picklable)."""

    policy: str = DEFAULT_POLICY
    values: dict[str, list[str]] = field(default_factory=dict)
    separator: str = DEFAULT_SEPARATOR  # joins several values in an ID3v2.3 file

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"standard-tags policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.separator or "\x00" in self.separator:
            raise ValueError("the ID3v2.3 separator must be a non-empty string without NUL")


RESTORE = Request("off")


@dataclass
class Plan:
    """The fields to store (None: remove) where they change, and the new ``standard`` record (None: none)."""

    changes: dict[str, Raw | None]
    record: dict | None

    def record_fields(self) -> dict[str, list[str]]:
        """The earmark namespace key that carries the record, for the write (empty: the key goes)."""
        return {RECORD_KEY: [json.dumps(self.record, sort_keys=True, ensure_ascii=False)]} if self.record else {}


def read_record(tags: FileTags) -> dict:
    """The file's ``standard`` record; an unreadable one (edited by hand) counts as none."""
    values = tags.earmark().get(RECORD_KEY) or []
    try:
        record = json.loads(values[0]) if values else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def fields_of(tags: FileTags) -> tuple[str, ...]:
    """The standard fields this file's tag family has."""
    return tuple(name for name in FIELDS if tags.supports(name))


def plan(tags: FileTags, request: Request) -> Plan:
    """What ``request`` changes in the file's standard fields, from what the file holds now."""
    record, changes, new_record = read_record(tags), {}, {}
    request = _paired(tags, record, request)
    for name in fields_of(tags):
        entry = record.get(name) if isinstance(record.get(name), dict) else {}
        current = tags.standard_raw(name)
        raw, kept = _field(tags, name, current, entry, request)
        if raw != current:
            changes[name] = raw
        if kept:
            new_record[name] = kept
    return Plan(changes, new_record or None)


def apply(tags: FileTags, planned: Plan) -> None:
    for name, raw in planned.changes.items():
        tags.set_standard_raw(name, raw)


def user_values(tags: FileTags, name: str, record: dict | None = None) -> list[str]:
    """The user's own values in a field (Earmark's left out), as a player would list them."""
    entry = (read_record(tags) if record is None else record).get(name) or {}
    return _user(tags, tags.standard_raw(name), entry, _separator(entry))


def _paired(tags: FileTags, record: dict, request: Request) -> Request:
    """The request without the gains whose pair the user filled in part (a gain without its peak, or
    the other way round, is still the user's ReplayGain, and half of ours beside it would mix two)."""
    if request.policy not in ("fill-empty", "append"):
        return request
    values = dict(request.values)
    for pair in PAIRS:
        if any(user_values(tags, name, record) for name in pair if tags.supports(name)):
            for name in pair:
                values.pop(name, None)
    return Request(request.policy, values, request.separator)


def _field(tags: FileTags, name: str, current: Raw | None, entry: dict, request: Request):
    """(the field to store, its record entry or None) for one field."""
    separator = entry.get("separator") or request.separator
    user = _user(tags, current, entry, separator)
    policy = "fill-empty" if name in FEATURE_FIELDS and request.policy == "append" else request.policy
    ours = _ours(user, request.values.get(name) or [], policy)
    if not ours:  # Earmark adds nothing: the field is the user's, as it was when we can tell
        if not entry:
            return current, None
        if _values(tags, entry.get("original"), separator) == user:
            return entry.get("original"), None
        return (_stored(tags, user, current, separator) if user else None), None
    values = ours if request.policy == "replace" else user + ours
    original = entry["original"] if entry and "original" in entry else current
    kept = {"ours": ours, "original": original, **({"separator": separator} if tags.joins_values() else {})}
    return _stored(tags, values, current, separator), kept


def _user(tags: FileTags, current: Raw | None, entry: dict, separator: str) -> list[str]:
    """The user's values: the field without Earmark's, and any Earmark replaced, originals first."""
    ours = set(entry.get("ours") or [])
    now = [v for v in _values(tags, current, separator) if v not in ours]
    before = _values(tags, entry.get("original"), separator) if entry else []
    return before + [v for v in now if v not in before]


def _ours(user: list[str], values: list[str], policy: str) -> list[str]:
    """Earmark's values that go into the field under ``policy``."""
    if policy == "off" or (policy == "fill-empty" and user):
        return []
    if policy == "append":
        taken = {v.casefold() for v in user}
        return [v for v in values if v.casefold() not in taken]
    return list(values)


def _values(tags: FileTags, raw: Raw | None, separator: str) -> list[str]:
    """A stored field's values: split on the separator where the file joins them."""
    if not raw:
        return []
    texts = [t for t in raw.get("text") or [] if t]
    if tags.joins_values():
        return [part.strip() for t in texts for part in t.split(separator) if part.strip()]
    return texts


def _stored(tags: FileTags, values: list[str], current: Raw | None, separator: str) -> Raw:
    """The field to store for ``values``, in the current field's encoding."""
    text = [separator.join(values)] if tags.joins_values() and len(values) > 1 else list(values)
    return {"text": text, "encoding": (current or {}).get("encoding")}


def _separator(entry: dict) -> str:
    return entry.get("separator") or DEFAULT_SEPARATOR
