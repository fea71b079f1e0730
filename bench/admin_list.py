"""``python -m bench.admin_list``: how fast the admin's track list answers with tag columns, filters and search.

Builds libraries of 50,000 and 100,000 tagged tracks (five categories, one
to three values each, with strengths, as ``TrackTag`` rows) in fresh SQLite
files, and times the track list's page as staff see it (Django's test
client, in process, the real admin) for: the plain list, one category filter,
two filters with a strength, and a search on a tag value; and (issue 16) with
tempo, key and loudness on 85% of the tracks: the list sorted by BPM, a BPM
range, a key, a loudness range, a BPM range with a key, and a search on a key.
Each is the median of several loads after one warm-up. The target (issue 15):
every page at 100,000 tracks under 0.3 s, the plain list's time at 50,000
before tag filters existed; the 50,000 column is the side-by-side baseline.
``--quick``: 100,000 tracks only, 3 loads per page.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from bench.common import Workspace, setup_django, use_database

SIZES = (50_000, 100_000)
TARGET_S = 0.3
VALUES = {
    "genre": ["rock", "pop", "jazz", "classical", "electronic", "ambient", "metal", "folk", "hip hop", "blues"],
    "mood": ["calm", "dark", "happy", "sad", "energetic", "dreamy", "aggressive", "romantic"],
    "instrument": ["piano", "guitar", "strings", "drums", "synth", "violin", "flute", "bass", "harp", "organ"],
    "vocals": ["female vocal", "male vocal", "no vocals", "choir"],
    "era": ["60s", "70s", "80s", "90s", "00s"],
}
PAGES = {
    "plain list": {},
    "mood = calm": {"mood": "calm"},
    "mood + instrument, strength ≥ 0.75": {"mood": "calm", "instrument": "piano", "strength": "0.75"},
    "search 'piano'": {"q": "piano"},
    "sorted by BPM (descending)": {"o": "-bpm"},
    "BPM 120–140": {"bpm": "120-140"},
    "key = A minor": {"key": "A minor"},
    "loudness −14 to −9 LUFS": {"loudness": "14-9"},
    "BPM 120–140 + key A minor": {"bpm": "120-140", "key": "A minor"},
    "search '8A' (a key)": {"q": "8A"},
}
COLD = "plain list, counts not cached"
MEASURED = 0.85  # the share of tracks with tempo, key and loudness (the rest: not measurable, or not yet)


def populate(n: int, seed: int = 0) -> None:
    """``n`` tagged tracks with their tag rows, in batches (the way many scans and writes would leave them)."""
    from workers.models import Library, Track, TrackTag
    from workers.tagging.feature_groups import KEYS

    rng = random.Random(seed)
    library = Library.objects.create(name="bench", root="/srv/music")
    for start in range(0, n, 5000):
        tracks, tags = [], []
        for i in range(start, min(n, start + 5000)):
            chosen = {c: rng.sample(v, rng.randint(1, 3 if c != "era" else 1)) for c, v in VALUES.items()}
            measured = rng.random() < MEASURED
            bpm = round(rng.uniform(60, 190), 2) if measured else None
            lufs = round(rng.gauss(-11, 3.5), 2) if measured else None
            key = rng.choice(KEYS) if measured else ""
            tracks.append(Track(library=library, path=f"/srv/music/a{i // 20}/t{i}.mp3", folder=f"/srv/music/a{i // 20}",
                                format="mp3", state="tagged", artist=f"Artist {i % 997}", title=f"Title {i}",
                                earmark_tags=chosen, bpm=bpm, bpm_confidence=0.8 if measured else None,
                                musical_key=key, key_confidence=0.5 if measured else None, loudness_lufs=lufs,
                                track_gain_db=None if lufs is None else round(-18 - lufs, 2),
                                track_peak=0.9 if measured else None))
        Track.objects.bulk_create(tracks, batch_size=1000)
        for track in tracks:
            for category, values in track.earmark_tags.items():
                tags += [TrackTag(track_id=track.id, category=category, value=v, rank=r,
                                  strength=round(rng.uniform(0.5, 1.0), 3)) for r, v in enumerate(values)]
        TrackTag.objects.bulk_create(tags, batch_size=2000)
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("ANALYZE")


def _resolve(params: dict) -> dict:
    """``o`` named by model field (``-bpm``) becomes the changelist's column index."""
    from workers.admin.tracks import TrackAdmin

    if "o" not in params:
        return params
    columns = {"bpm": "bpm_column", "musical_key": "key_column", "loudness_lufs": "loudness_column"}
    sign, field = ("-", params["o"][1:]) if params["o"].startswith("-") else ("", params["o"])
    return {**params, "o": f"{sign}{TrackAdmin.list_display.index(columns[field]) + 1}"}


def time_pages(repeats: int) -> dict[str, float]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_superuser("bench", "bench@example.com", "pw")
    client = Client()
    client.force_login(user)
    out = {}
    for name, params in PAGES.items():
        params = _resolve(params)
        assert client.get("/admin/workers/track/", params).status_code == 200  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get("/admin/workers/track/", params)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
        out[name] = statistics.median(times)
    from django.core.cache import cache

    times = []
    for _ in range(repeats):  # once a minute a load recomputes the sidebar's counts
        cache.clear()
        started = time.perf_counter()
        assert client.get("/admin/workers/track/").status_code == 200
        times.append(time.perf_counter() - started)
    out[COLD] = statistics.median(times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admin_list", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--quick", action="store_true", help="100,000 tracks only, 3 loads per page")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [SIZES[-1]], 3
    setup_django()
    from django.conf import settings

    settings.ALLOWED_HOSTS = ["testserver", *settings.ALLOWED_HOSTS]
    # The pages are timed without collectstatic: plain static storage, as in the tests.
    settings.STORAGES = {**settings.STORAGES,
                         "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    results = {}
    with Workspace() as ws:
        for n in args.sizes:
            use_database(ws.fresh_db())
            started = time.perf_counter()
            populate(n)
            print(f"{n:,} tracks populated in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            results[n] = time_pages(args.repeats)
    sizes = list(results)
    print(f"bench.admin_list: the admin's track list, median of {args.repeats} loads (seconds), SQLite")
    print(f"{'page':<38}" + "".join(f"{n:>12,}" for n in sizes) + f"{'vs target ' + str(TARGET_S):>18}")
    worst = 0.0
    for name in [*PAGES, COLD]:
        row = [results[n][name] for n in sizes]
        worst = max(worst, row[-1])
        print(f"{name:<38}" + "".join(f"{t:>12.3f}" for t in row) + f"{row[-1] / TARGET_S:>17.2f}×")
    print(f"slowest page at {sizes[-1]:,} tracks: {worst:.3f} s ({'within' if worst <= TARGET_S else 'over'} "
          f"the {TARGET_S} s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
