"""Taking Earmark's tags out again: every key it wrote, and the standard fields put back as they were.

``untag`` walks libraries or paths inside them and, per file holding any of
Earmark's tags, makes one safe write with no Earmark keys and the ``off``
standard-tags policy (``workers.tagfiles.standard.RESTORE``): the genre and
mood fields return to what they held before Earmark first changed them,
which the ``earmark:standard`` record keeps. Files written by any Earmark
version are found by the namespace itself, not by what this version would
write. The track rows then say the file holds no Earmark tags.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from django.db import transaction

from workers.audio.formats import format_for_path
from workers.library import fileinfo, paths
from workers.models import Library, Track, TrackTag
from workers.tagfiles import namespace, standard
from workers.tagfiles.errors import TagWriteError
from workers.tagfiles.safewrite import safe_write_tags


class UntagError(Exception):
    """A path given to ``untag`` is not inside any library (nothing is touched)."""


@dataclass
class Change:
    """What untagging one file changes (or would change, in a dry run)."""

    path: bytes
    removed_keys: list[str] = field(default_factory=list)
    standard: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # field: (now, after)
    error: str = ""

    def describe(self) -> str:
        parts = [f"remove earmark:{', '.join(self.removed_keys)}"] if self.removed_keys else []
        parts += [f"{name}: {now} -> {after}" for name, (now, after) in self.standard.items()]
        return f"{os.fsdecode(self.path)}: " + ("; ".join(parts) or "nothing") + (
            f" (failed: {self.error})" if self.error else "")


def targets(names: list[str]) -> list[tuple[Library, bytes]]:
    """(library, path) for each argument: a library's name, or a file or folder inside a library's root."""
    libraries = list(Library.objects.all())
    out = []
    for name in names:
        by_name = next((lib for lib in libraries if lib.name == name), None)
        if by_name is not None:
            out.append((by_name, paths.to_bytes(by_name.root)))
            continue
        path = os.path.realpath(os.fsencode(name))
        inside = [lib for lib in libraries if paths.is_within(path, os.path.realpath(paths.to_bytes(lib.root)))]
        if not inside:
            raise UntagError(f"{name}: not a library's name nor a path inside a library's root")
        out.append((inside[0], path))
    return out


def audio_files(path: bytes):
    """The audio files at or under ``path`` (symlinks are not followed: nothing outside the root)."""
    if os.path.isfile(path):
        yield path
        return
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if format_for_path(os.fsdecode(name)) is not None:
                yield os.path.join(folder, name)


def planned_change(path: bytes) -> Change | None:
    """What untagging ``path`` changes; None when the file holds nothing of Earmark's."""
    tags = namespace.open_tags(os.fsdecode(path))
    ours = tags.earmark()
    if not ours:
        return None
    planned = standard.plan(tags, standard.RESTORE)
    change = Change(path, sorted(ours))
    for name, raw in planned.changes.items():
        change.standard[name] = ((tags.standard_raw(name) or {}).get("text") or [], (raw or {}).get("text") or [])
    return change


def untag(names: list[str], dry_run: bool = False) -> list[Change]:
    """Untag every file under ``names``; returns the changes (a failed file carries its error, others go on)."""
    changes = []
    for library, root in targets(names):
        for path in audio_files(root):
            try:
                change = planned_change(path)
                if change is not None and not dry_run:
                    result = safe_write_tags(path, {}, None, None, standard.RESTORE)
                    _forget(library, path, result)
            except (OSError, TagWriteError, namespace.TagFileError) as exc:
                change = Change(path, error=str(getattr(exc, "reason", exc)))
            if change is not None:
                changes.append(change)
    return changes


def _forget(library: Library, path: bytes, result) -> None:
    """The track row holds no Earmark tags now, and its size and mtime are the file's."""
    with transaction.atomic():
        rows = Track.objects.filter(library=library, path=paths.to_text(path))
        TrackTag.objects.filter(track__in=rows).delete()
        rows.update(earmark_tags={}, genre_low_confidence=False, size=result.size, mtime_ns=result.mtime_ns,
                    device=fileinfo.db_int(result.device), inode=fileinfo.db_int(result.inode),
                    state=Track.State.SCANNED, tagged_at=None)
