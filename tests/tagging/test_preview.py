"""``manage.py preview``: what each standard-tags policy would write, read from the real file, writing nothing."""
import json
from io import StringIO
from pathlib import Path

import numpy as np
from django.core.management import call_command

from tests.audio_factory import make_file
from workers.library import paths
from workers.models import Library, Track
from workers.tagfiles.namespace import open_tags
from workers.tagging import scores
from workers.tagging.categories import GENRE, LABELS
from workers.tagging.preview import LABEL_ORDER


def test_preview_shows_every_policy_on_the_users_own_genre_and_writes_nothing(tmp_path, db):
    root = tmp_path / "music"
    path = make_file(root, "flac", tags={"title": "Song", "genre": "Jazz"})
    library = Library.objects.create(name="music", root=str(root))
    track = Track.objects.create(library=library, path=paths.to_text(bytes(path)), folder=str(root), format="flac",
                                 state="tagged")
    means = np.full(len(LABEL_ORDER), 0.001, dtype=np.float32)
    genre_label = next(i for i, label in enumerate(LABEL_ORDER) if LABELS[label].category == GENRE)
    means[genre_label] = 0.99
    scores.save(track, "m@1", LABEL_ORDER, means, np.zeros_like(means), 3)
    before = Path(path).read_bytes()
    out = StringIO()
    call_command("preview", "music", "--json", stdout=out)
    [row] = json.loads(out.getvalue())
    ours = row["earmark"]["genre"]
    assert ours == [LABELS[LABEL_ORDER[genre_label]].canonical] and row["now"]["genre"] == ["Jazz"]
    assert row["policies"]["off"]["genre"] == ["Jazz"]
    assert row["policies"]["fill-empty"]["genre"] == ["Jazz"]
    assert row["policies"]["append"]["genre"] == ["Jazz", *ours]
    assert row["policies"]["replace"]["genre"] == ours
    assert Path(path).read_bytes() == before and open_tags(path).earmark() == {}
    text = StringIO()
    call_command("preview", "music", stdout=text)
    assert "*fill-empty" in text.getvalue() and "replace" in text.getvalue()


def test_the_admin_preview_page_is_for_staff_and_lists_every_policy(tmp_path, db, admin_client, client):
    root = tmp_path / "music"
    path = make_file(root, "mp3", tags={"title": "Song"})
    library = Library.objects.create(name="music", root=str(root))
    track = Track.objects.create(library=library, path=paths.to_text(bytes(path)), folder=str(root), format="mp3")
    means = np.full(len(LABEL_ORDER), 0.001, dtype=np.float32)
    scores.save(track, "m@1", LABEL_ORDER, means, np.zeros_like(means), 1)
    url = f"/admin/preview/{library.id}/"
    assert client.get(url).status_code == 302, "anonymous: to the login page"
    page = admin_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert all(f'data-policy="{p}"' in html for p in ("off", "fill-empty", "append", "replace"))
    assert path.name in html
    assert url in admin_client.get(f"/admin/workers/library/{library.id}/change/").content.decode()


def test_samples_are_scored_tracks_picked_by_id_range_not_a_sort_of_the_whole_library(tmp_path, db):
    import random

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from workers.tagging.preview import sample_ids

    library = Library.objects.create(name="music", root=str(tmp_path))
    other = Library.objects.create(name="other", root=str(tmp_path / "other"))
    means = np.zeros(len(LABEL_ORDER), dtype=np.float32)
    scored = set()
    for i in range(60):
        track = Track.objects.create(library=other if i % 5 == 4 else library, path=f"{tmp_path}/{i}.mp3",
                                     folder=str(tmp_path), format="mp3")
        if i % 3:  # every third track has no scores yet
            scores.save(track, "m@1", LABEL_ORDER, means, means, 1)
            if track.library_id == library.id:
                scored.add(track.id)
    with CaptureQueriesContext(connection) as queries:
        picked = sample_ids(library, 5, random.Random(7))
    assert len(picked) == 5 == len(set(picked)) and set(picked) <= scored
    assert not any("RANDOM()" in q["sql"].upper() for q in queries.captured_queries)
    assert sample_ids(library, 5, random.Random(8)) != picked, "another draw, other tracks"
    assert sorted(sample_ids(library, 100)) == sorted(scored), "a small library gives all its scored tracks"
    assert sample_ids(Library.objects.create(name="empty", root=str(tmp_path / "e")), 5) == []
