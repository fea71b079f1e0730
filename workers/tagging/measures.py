"""Tempo, key and loudness on the track: its columns, the tags they become, and the album's gain (no torch).

The tagger measures them in the same decode as the networks' signal
(``pipeline._patch_chunks``, ``workers.features``) and hands the JSON here.
``attach`` puts it on the track row in memory before the tags are planned, so
every write path (the tagger's and the recalibrator's, which reads the row)
writes the same values; ``record`` stores it, and ``share_album`` gives an
album its ReplayGain album gain once all its tracks are measured.

An album is the tracks of one folder with one non-empty album tag (rsgain's
"easy mode" takes a folder for an album; a folder of singles without album
tags gets no album gain rather than a wrong one). When its last track is
measured, or one is measured again with another result, every track whose
album values change gets a rewrite job in the recalibrator's queue, which
writes from stored scores and these columns without running the networks.
"""
from __future__ import annotations

from django.db import transaction

from workers.features import FEATURES_VERSION, Features, album
from workers.jobs import queue
from workers.jobs.queue import NewJob
from workers.models import Library, Track

COLUMNS = ("features", "features_version", "bpm", "bpm_confidence", "musical_key", "key_confidence",
           "loudness_lufs", "track_gain_db", "track_peak")
ALBUM_COLUMNS = ("album_gain_db", "album_peak")
R128_OFFSET_DB = 5.0  # R128 gains refer to -23 LUFS, ReplayGain 2.0 to -18 (RFC 7845, 5.2.1)


def columns(features: dict) -> dict:
    """The track columns for one measurement (``Features.to_json()``, or its "not measurable" form)."""
    get = features.get
    return dict(features=features, features_version=get("version") or "", bpm=get("bpm"),
                bpm_confidence=get("bpm_confidence"), musical_key=get("key") or "",
                key_confidence=get("key_confidence"), loudness_lufs=get("loudness_lufs"),
                track_gain_db=get("track_gain_db"),
                track_peak=get("true_peak") if get("track_gain_db") is not None else None)


def attach(track: Track, features: dict) -> None:
    """Put a fresh measurement on the track in memory, with the album's gain if the album is now whole."""
    for name, value in columns(features).items():
        setattr(track, name, value)
    gain, peak = album_gain(track)
    track.album_gain_db, track.album_peak = gain, peak


def record(track: Track) -> None:
    """Store the track's measurement (``attach``'s columns), in the caller's transaction."""
    Track.objects.filter(id=track.id).update(**{name: getattr(track, name) for name in COLUMNS + ALBUM_COLUMNS})


def album_tracks(track: Track):
    """The other tracks of the track's album (same library, folder and album tag), None when it has no album."""
    if not (track.album or "").strip():
        return None
    return (Track.objects.filter(library_id=track.library_id, folder=track.folder, album=track.album)
            .exclude(id=track.id).exclude(state=Track.State.MISSING))


def album_gain(track: Track, others=None) -> tuple[float | None, float | None]:
    """(album gain in dB, album peak) from the track as it is in memory and its album's others as stored.

    None, None while any of them is unmeasured (or measured by another
    feature version) or not measurable: an album gain over part of an album
    would be wrong for the rest.
    """
    others = album_tracks(track) if others is None else others
    if others is None or not track.features.get("album_data"):
        return None, None
    measured = [track.features]
    for features, version in others.values_list("features", "features_version"):
        if version != FEATURES_VERSION or not (features or {}).get("album_data"):
            return None, None
        measured.append(features)
    result = album([Features.from_json(f) for f in measured])
    if result.gain_db is None:
        return None, None
    return round(result.gain_db, 2), round(result.peak, 6)


def share_album(track: Track) -> int:
    """After ``record``: give every track of the album the album values, and queue rewrites where they changed.

    Run once the track's row is committed, so two taggers finishing an
    album's last two tracks at once both see the album whole (the one that
    commits second does; the first may too): the jobs' dedup keys make it one
    rewrite per track. Returns how many rewrites were queued.
    """
    others = album_tracks(track)
    if others is None:
        return 0
    with transaction.atomic():
        members = list(Track.objects.select_for_update().filter(id__in=others.values("id")).order_by("id"))
        fresh = Track.objects.get(id=track.id)
        gain, peak = album_gain(fresh, others)
        stale = [t for t in members + [fresh] if (t.album_gain_db, t.album_peak) != (gain, peak)]
        Track.objects.filter(id__in=[t.id for t in stale]).update(album_gain_db=gain, album_peak=peak)
    rewrites = [t for t in stale if t.state == Track.State.TAGGED]
    return queue.enqueue_many("calibrate", [NewJob(key=f"album:{t.id}", payload={"force": True, "reason": "album gain"},
                                                   track_id=t.id, library_id=t.library_id) for t in rewrites])


# ------------------------------------------------------------------ the tags

def _key_text(features: dict, notation: str) -> str | None:
    return features.get({Library.KeyNotation.CAMELOT: "key_camelot",
                         Library.KeyNotation.OPEN_KEY: "key_open"}.get(notation, "key_short"))


def standard_values(track: Track) -> dict[str, list[str]]:
    """The standard fields' values (``workers.tagfiles.standard``), in the forms rsgain and Picard write."""
    f = track.features or {}
    values: dict[str, list[str]] = {}
    if f.get("bpm") is not None:
        values["bpm"] = [str(int(round(f["bpm"])))]
    key = _key_text(f, track.library.key_notation)
    if key:
        values["key"] = [key]
    for side, gain, peak in (("track", track.track_gain_db, track.track_peak),
                             ("album", track.album_gain_db, track.album_peak)):
        if gain is None:
            continue
        values[f"replaygain_{side}_gain"] = [f"{gain:+.2f} dB"]
        values[f"replaygain_{side}_peak"] = [f"{peak:.6f}"]
        q78 = max(-32768, min(32767, int(round((gain - R128_OFFSET_DB) * 256))))  # Q7.8 dB
        values[f"r128_{side}_gain"] = [str(q78)]
    return values


def namespace_fields(track: Track) -> dict[str, list[str]]:
    """Earmark's own keys for them: the exact values and the confidences, and the reasons for what is missing."""
    f = track.features or {}
    if not f:
        return {}
    out: dict[str, list[str]] = {"features": [f.get("version") or ""]}
    if f.get("bpm") is not None:
        out["bpm"] = [f"{f['bpm']:.1f}"]
        out["bpm_confidence"] = [f"{f.get('bpm_confidence') or 0:.2f}"]
    if f.get("key"):
        out["key"] = [f["key"]]
        out["key_confidence"] = [f"{f.get('key_confidence') or 0:.2f}"]
    if f.get("loudness_lufs") is not None:
        out["loudness"] = [f"{f['loudness_lufs']:.2f} LUFS"]
    for name, reason in sorted((f.get("reasons") or {}).items()):
        out[f"{name}_unmeasured"] = [reason]
    return out
