"""Adding and describing libraries (shared by the ``library`` command and the admin)."""
from __future__ import annotations

import os

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Q

from workers.models import Job, Library, Meta, Track
from workers.tagfiles import standard


def validate_root(path: str) -> str:
    """An absolute, existing directory; returned resolved so that symlinked roots are checked once."""
    if not path:
        raise ValidationError("a library path is required")
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(real):
        raise ValidationError(f"{path} is not an existing directory")
    return real


def validate_standard_limits(value) -> dict[str, int]:
    """``{"genre": 2, "mood": 1}``: a standard field (genre, mood) → how many values go in (0 leaves it out).

    Checked where a person sets them (``library set``, the admin's form), so
    junk is refused there and never reaches a tag job.
    """
    fields = ", ".join(standard.CATEGORY_FIELDS)
    if not isinstance(value, dict):
        raise ValidationError(f'standard limits are an object like {{"genre": 2, "mood": 2}}, not {value!r}')
    for name, n in value.items():
        if name not in standard.CATEGORY_FIELDS:
            raise ValidationError(f"{name!r} has no standard field; the standard fields are {fields}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValidationError(f"the limit for {name} must be a whole number of values, 0 or more (not {n!r})")
    return dict(value)


def add_library(name: str, path: str, write_mode: str = Library.WriteMode.MINIMAL,
                standard_tags: str = Library.StandardTags.FILL_EMPTY,
                key_notation: str = Library.KeyNotation.STANDARD) -> Library:
    root = validate_root(path)
    if Library.objects.filter(name=name).exists():
        raise ValidationError(f"a library named {name!r} already exists")
    _check_choices(write_mode, standard_tags)
    _check_key_notation(key_notation)
    return Library.objects.create(name=name, root=root, write_mode=write_mode, standard_tags=standard_tags,
                                  key_notation=key_notation)


def update_library(library: Library, write_mode: str | None = None, standard_tags: str | None = None,
                   limits: dict | None = None, id3v23_separator: str | None = None,
                   analysis: str | None = None, key_notation: str | None = None) -> dict:
    """Change a library's tag settings; returns what changed. Files change at their next tagging."""
    _check_choices(write_mode or library.write_mode, standard_tags or library.standard_tags)
    changed = {}
    if write_mode:
        changed["write_mode"] = write_mode
    if standard_tags:
        changed["standard_tags"] = standard_tags
    if limits:
        current = library.standard_limits if isinstance(library.standard_limits, dict) else {}
        current = {k: v for k, v in current.items() if k in standard.CATEGORY_FIELDS}  # keys saved before they were checked
        changed["standard_limits"] = validate_standard_limits({**current, **limits})
    if id3v23_separator is not None:
        if not id3v23_separator or "\x00" in id3v23_separator:
            raise ValidationError("the ID3v2.3 separator must be a non-empty string without NUL")
        changed["id3v23_separator"] = id3v23_separator
    if analysis:
        if analysis not in Library.Analysis.values:
            raise ValidationError(f"analysis must be one of {', '.join(Library.Analysis.values)}")
        changed["analysis"] = analysis  # fast: stop scoring a file once its tags are settled; full: every patch
    if key_notation:
        _check_key_notation(key_notation)
        changed["key_notation"] = key_notation  # the standard key field: Am, 8A (Camelot) or 1m (Open Key)
    for key, value in changed.items():
        setattr(library, key, value)
    if changed:
        library.save(update_fields=list(changed))
    return changed


def _check_choices(write_mode: str, standard_tags: str) -> None:
    if write_mode not in Library.WriteMode.values:
        raise ValidationError(f"write mode must be one of {', '.join(Library.WriteMode.values)}")
    if standard_tags not in Library.StandardTags.values:
        raise ValidationError(f"standard tags must be one of {', '.join(Library.StandardTags.values)}")


def _check_key_notation(key_notation: str) -> None:
    if key_notation not in Library.KeyNotation.values:
        raise ValidationError(f"key notation must be one of {', '.join(Library.KeyNotation.values)}")


def remove_library(library: Library) -> dict:
    """Forget a library: cancel its queued jobs, delete its tracks (scores and tag rows with them) and scan rows.

    Its files are not touched (``untag`` removes Earmark's tags first, where
    wanted). A job running for it finishes on a track that no longer exists
    and records nothing; jobs that finished stay in the history, without a
    library, until pruned.
    """
    from workers.jobs import queue

    with transaction.atomic():
        queued = list(Job.objects.filter(library=library, state=Job.State.QUEUED).values_list("id", flat=True))
        cancelled = queue.cancel(queued) if queued else 0
        tracks, _ = Track.objects.filter(library=library).delete()
        Meta.objects.filter(Q(key=f"scan:{library.id}") | Q(key__startswith=f"scanned:{library.id}:")).delete()
        library.delete()
    return {"cancelled": cancelled, "rows_deleted": tracks}


def summary(library: Library, failed_limit: int = 100) -> dict:
    """What ``library show --json`` prints: counts by state and the failed files with reasons."""
    by_state = {s: 0 for s in Track.State.values}
    for row in Track.objects.filter(library=library).values("state").annotate(n=Count("id")):
        by_state[row["state"]] = row["n"]
    failed = [
        {"path": p, "error": e}
        for p, e in Track.objects.filter(library=library, state=Track.State.FAILED)
        .order_by("path").values_list("path", "error")[:failed_limit]
    ]
    return {
        "name": library.name,
        "root": library.root,
        "enabled": library.enabled,
        "write_mode": library.write_mode,
        "tracks": sum(by_state.values()),
        "by_state": by_state,
        "failed": failed,
        "last_scan_at": library.last_scan_at.isoformat() if library.last_scan_at else None,
        "last_scan_error": library.last_scan_error,
    }
