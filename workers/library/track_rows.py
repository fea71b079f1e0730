"""The scanner's bulk writes of track rows: multi-row INSERT ... RETURNING, generation stamps, missing marks.

A track's ``scan_gen`` only ever goes up: every write of it here is
conditional (``WHERE scan_gen < gen``, or ``GREATEST``), since a write that
lowered it (a rescan's object read before a scan moved on, a late job of
an earlier scan) would make the running scan's finalize mark a present file
missing. Nothing writes a track's row whole from an object read earlier.

A first scan of a large library inserts hundreds of thousands of rows, and
every folder job stamps the tracks it saw; the ORM's per-object cost was
larger than the rows themselves, so these statements are built by hand
(once per connection type) and run in chunks the databases accept.
"""
from __future__ import annotations

import functools

from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from workers.models import Track

TRACK = Track._meta.db_table
_UNSET, _NOW, _PER_ROW = object(), object(), object()  # markers

# Values of these Python types go to the database as they are for these fields (Django's
# conversion would return them unchanged); anything else takes ``get_db_prep_save``.
_PLAIN = {"CharField": str, "TextField": str, "IntegerField": int, "BigIntegerField": int, "FloatField": float,
          "ForeignKey": int}


@functools.lru_cache(maxsize=None)
def _insert_plan(ops_class: type) -> tuple:
    """The parts of ``insert_tracks``'s statement that never change: fields, SQL, converted defaults.

    Cached per connection type (its operations class), so a process that uses
    both databases (the test suite) never reuses one database's quoting for the other.
    """
    fields = [f for f in Track._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    plain = [_PLAIN.get(f.get_internal_type()) for f in fields]
    static = [_NOW if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
              else _PER_ROW if callable(f.default)  # e.g. a fresh dict, or a uuid per row
              else f.get_db_prep_save(f.get_default(), connection) for f in fields]
    return fields, columns, placeholders, plain, static


def prepare_insert(new: list) -> list[tuple[str, list, list]]:
    """The INSERT statements for new tracks, built before the transaction that runs them.

    What ``bulk_create`` does, without most of its per-value cost: every
    concrete field of ``Track`` is written, with the value the scanner set,
    else the field's default (``auto_now`` fields: now), each converted for the
    database as Django converts it. Building them outside the transaction keeps
    the write lock short, which other scanner processes are waiting for.
    """
    if not new or not connection.features.can_return_rows_from_bulk_insert:
        return []
    fields, columns, placeholders, plain, static = _insert_plan(type(connection.ops))
    now = timezone.now()
    defaults = [f.get_db_prep_save(now, connection) if value is _NOW else value for f, value in zip(fields, static)]
    per_statement = max(1, (connection.features.max_query_params or 30_000) // len(fields))
    statements = []
    for start in range(0, len(new), per_statement):
        chunk = new[start : start + per_statement]
        params = []
        for t in chunk:
            row = t.row
            for f, default, kind in zip(fields, defaults, plain):
                value = row.get(f.attname, _UNSET)
                if value is _UNSET:
                    params.append(f.get_db_prep_save(f.get_default(), connection) if default is _PER_ROW else default)
                elif value is None or type(value) is kind:
                    params.append(value)
                else:
                    params.append(f.get_db_prep_save(value, connection))
        statements.append((f"INSERT INTO {TRACK} ({columns}) VALUES {', '.join([placeholders] * len(chunk))} "
                           "RETURNING id, path", params, chunk))
    return statements


def insert_tracks(new: list, prepared: list | None = None) -> None:
    """Insert new tracks and set their ids (``prepared``: what ``prepare_insert`` built for them)."""
    if not new:
        return
    if not connection.features.can_return_rows_from_bulk_insert:  # (SQLite < 3.35) the tag jobs need the ids
        for t in new:
            t.id = Track.objects.create(**t.row).id
        return
    with connection.cursor() as cur:
        for sql, params, chunk in prepare_insert(new) if prepared is None else prepared:
            cur.execute(sql, params)
            ids = {path: track_id for track_id, path in cur.fetchall()}
            for t in chunk:
                t.id = ids[t.row["path"]]


def stamp_seen(track_ids: list[int], gen: int) -> None:
    """Mark the known tracks this scan saw (in chunks: SQLite bounds the number of parameters); never lowers."""
    with connection.cursor() as cur:
        for start in range(0, len(track_ids), 900):
            chunk = track_ids[start : start + 900]
            cur.execute(f"UPDATE {TRACK} SET scan_gen = %s WHERE scan_gen < %s "
                        f"AND id IN ({', '.join(['%s'] * len(chunk))})", [gen, gen, *chunk])


def update_track(track_id: int, fields: dict) -> int:
    """Write only these fields of one track; a ``scan_gen`` among them never lowers the stored one."""
    if "scan_gen" in fields:
        fields = {**fields, "scan_gen": Greatest(F("scan_gen"), Value(fields["scan_gen"]))}
    return Track.objects.filter(id=track_id).update(**fields)


def set_identity(rows: list[tuple[int, int | None, int | None]]) -> None:
    """Write the ``(track id, device, inode)`` of known files whose identity changed (or was never stored)."""
    if rows:
        with connection.cursor() as cur:
            cur.executemany(f"UPDATE {TRACK} SET device = %s, inode = %s WHERE id = %s",
                            [(device, inode, track_id) for track_id, device, inode in rows])


def mark_missing(track_ids: list[int], gen: int, library_id: int | None = None) -> int:
    """Known tracks of a folder that this scan did not see (and nothing stamped since) are missing.

    With ``library_id``, only while the track is still in that library: one
    moved to another library meanwhile (``workers.library.moves``) carries
    that library's generation, which says nothing about this scan.
    """
    missing = 0  # rare (files removed): the ORM is fine here
    rows = Track.objects.filter(scan_gen__lt=gen) if library_id is None else \
        Track.objects.filter(scan_gen__lt=gen, library_id=library_id)
    for start in range(0, len(track_ids), 900):
        missing += rows.filter(id__in=track_ids[start : start + 900]).exclude(
            state=Track.State.MISSING).update(state=Track.State.MISSING, updated_at=timezone.now())
    return missing
