"""``python -m bench.admin_list``: how fast the admin's track list answers with tag columns, filters and search.

Builds libraries of 50,000 and 100,000 tagged tracks (five categories, one
to three values each, with strengths, as ``TrackTag`` rows) in fresh SQLite
files, and times the track list's page as staff see it (Django's test
client, in process, the real admin) for: the plain list, one category filter,
two filters with a strength, and a search on a tag value. Each is the median
of several loads after one warm-up. The target (issue 15): every page at
100,000 tracks under 0.3 s, the plain list's time at 50,000 before tag
filters existed; the 50,000 column is the side-by-side baseline.
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
}


def populate(n: int, seed: int = 0) -> None:
    """``n`` tagged tracks with their tag rows, in batches (the way many scans and writes would leave them)."""
    from workers.models import Library, Track, TrackTag

    rng = random.Random(seed)
    library = Library.objects.create(name="bench", root="/srv/music")
    for start in range(0, n, 5000):
        tracks, tags = [], []
        for i in range(start, min(n, start + 5000)):
            chosen = {c: rng.sample(v, rng.randint(1, 3 if c != "era" else 1)) for c, v in VALUES.items()}
            tracks.append(Track(library=library, path=f"/srv/music/a{i // 20}/t{i}.mp3", folder=f"/srv/music/a{i // 20}",
                                format="mp3", state="tagged", artist=f"Artist {i % 997}", title=f"Title {i}",
                                earmark_tags=chosen))
        Track.objects.bulk_create(tracks, batch_size=1000)
        for track in tracks:
            for category, values in track.earmark_tags.items():
                tags += [TrackTag(track_id=track.id, category=category, value=v, rank=r,
                                  strength=round(rng.uniform(0.5, 1.0), 3)) for r, v in enumerate(values)]
        TrackTag.objects.bulk_create(tags, batch_size=2000)
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("ANALYZE")


def time_pages(repeats: int) -> dict[str, float]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_superuser("bench", "bench@example.com", "pw")
    client = Client()
    client.force_login(user)
    out = {}
    for name, params in PAGES.items():
        assert client.get("/admin/workers/track/", params).status_code == 200  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get("/admin/workers/track/", params)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
        out[name] = statistics.median(times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admin_list", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = p.parse_args(argv)
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
    for name in PAGES:
        row = [results[n][name] for n in sizes]
        worst = max(worst, row[-1])
        print(f"{name:<38}" + "".join(f"{t:>12.3f}" for t in row) + f"{row[-1] / TARGET_S:>17.2f}×")
    print(f"slowest page at {sizes[-1]:,} tracks: {worst:.3f} s ({'within' if worst <= TARGET_S else 'over'} "
          f"the {TARGET_S} s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
