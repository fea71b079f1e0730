"""Genre and mood in the standard fields (issue 14), on real files of every format, through the safe write.

Each policy on files with and without the user's own values, ID3v2.3 and v2.4,
several existing genres, a re-tag that changes Earmark's values, and
``untag`` putting every file's tags back exactly, audio bytes unchanged.
"""
from pathlib import Path

import pytest
from django.core.management import call_command
from mutagen.id3 import ID3, TCON, TMOO, TXXX

from tests.audio_factory import make_file
from workers.library.untag import untag
from workers.models import Library
from workers.tagfiles import standard
from workers.tagfiles.namespace import open_tags, read_earmark_tags, read_user_tags
from workers.tagfiles.safewrite import safe_write_tags
from workers.tagfiles.verify import verify_same_audio

FORMATS = ["mp3", "flac", "ogg", "opus", "m4a", "wav", "aiff"]
TAGS = {"title": "Song", "artist": "Someone", "album": "Record"}
OURS = {"genre": ["ambient", "electronic"], "mood": ["calm"]}


def field(path, name) -> list[str]:
    return (open_tags(path).standard_raw(name) or {}).get("text") or []


def tag(path, policy: str, values=OURS, version="v1"):
    return safe_write_tags(path, {"version": [version]}, None, None, standard.Request(policy, values))


def with_user_fields(path: Path, genre: list[str] | None = None, mood: list[str] | None = None) -> Path:
    """Give the file the user's own genre and mood, as a tagger would (several values where the format allows)."""
    tags = open_tags(path)
    for name, values in (("genre", genre), ("mood", mood)):
        if values:
            tags.set_standard_raw(name, {"text": values, "encoding": None})
    tags.save()
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_fill_empty_fills_only_what_the_user_left_empty(tmp_path, fmt):
    empty = make_file(tmp_path, fmt, tags=TAGS, name=f"empty.{fmt}")
    tag(empty, "fill-empty")
    assert field(empty, "genre") == ["ambient", "electronic"] and field(empty, "mood") == ["calm"]

    users = with_user_fields(make_file(tmp_path, fmt, tags=TAGS, name=f"user.{fmt}"), genre=["Jazz"])
    before = read_user_tags(users)
    tag(users, "fill-empty")
    assert field(users, "genre") == ["Jazz"], "the user's genre is never touched"
    assert field(users, "mood") == ["calm"]
    after = read_user_tags(users)
    ours = open_tags(users).is_standard_key
    assert {k: v for k, v in after.items() if not ours(k)} == {k: v for k, v in before.items() if not ours(k)}


@pytest.mark.parametrize("fmt", ["mp3", "flac", "m4a"])
def test_append_adds_after_the_users_values_without_case_duplicates(tmp_path, fmt):
    path = with_user_fields(make_file(tmp_path, fmt, tags=TAGS), genre=["Rock", "Ambient"])
    tag(path, "append")
    assert field(path, "genre") == ["Rock", "Ambient", "electronic"]
    assert standard.user_values(open_tags(path), "genre") == ["Rock", "Ambient"]
    tag(path, "append", {"genre": ["classical"], "mood": []}, version="v2")  # a re-tag with another result
    assert field(path, "genre") == ["Rock", "Ambient", "classical"], "Earmark's old value goes, the user's stay"
    assert field(path, "mood") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_replace_then_untag_restores_every_tag_exactly(tmp_path, fmt, db):
    path = with_user_fields(make_file(tmp_path / "lib", fmt, tags=TAGS), genre=["Jazz", "Blues"], mood=["Sad"])
    user_before = read_user_tags(path)
    copy = tmp_path / f"original{path.suffix}"
    copy.write_bytes(path.read_bytes())
    tag(path, "fill-empty")  # tag
    tag(path, "append", {"genre": ["ambient"], "mood": ["calm"]}, version="v2")  # re-tag, another policy
    tag(path, "replace", {"genre": ["classical"], "mood": ["calm"]}, version="v3")  # recalibrated, replace
    assert field(path, "genre") == ["classical"] and field(path, "mood") == ["calm"]
    Library.objects.create(name="lib", root=str(tmp_path / "lib"))
    [change] = untag(["lib"], dry_run=True)
    assert change.standard["genre"] == (["classical"], ["Jazz", "Blues"]) and read_earmark_tags(path)
    untag(["lib"])
    assert read_earmark_tags(path) == {}
    assert read_user_tags(path) == user_before, "tag by tag, frame by frame as before Earmark"
    verify_same_audio(str(copy), str(path))


def test_id3v23_joins_genres_and_uses_txxx_mood_and_untag_restores_the_frames(tmp_path, db):
    path = make_file(tmp_path / "lib", "mp3", tags=TAGS)
    tags = ID3(path)
    tags.add(TCON(encoding=1, text=["Rock/Pop"]))
    tags.save(v2_version=3)
    frames_before = {k: repr(v) for k, v in ID3(path).items()}
    tag(path, "append")
    id3 = ID3(path)
    assert id3.version[:2] == (2, 3), "the file keeps its version"
    assert id3["TCON"].text == ["Rock/Pop/ambient/electronic"], "v2.3: one string, joined as Picard does"
    assert id3["TXXX:MOOD"].text == ["calm"] and "TMOO" not in id3
    assert standard.user_values(open_tags(path), "genre") == ["Rock", "Pop"]
    Library.objects.create(name="lib", root=str(tmp_path / "lib"))
    call_command("untag", str(path))
    assert {k: repr(v) for k, v in ID3(path).items()} == frames_before


def test_id3v24_writes_lists_in_tcon_and_tmoo(tmp_path):
    path = make_file(tmp_path, "mp3", tags=TAGS)
    tag(path, "replace")
    id3 = ID3(path)
    assert id3.version[:2] == (2, 4)
    assert id3["TCON"].text == ["ambient", "electronic"] and id3["TMOO"].text == ["calm"]
    assert "TXXX:MOOD" not in id3


def test_off_takes_earmarks_values_out_and_leaves_the_users(tmp_path):
    path = with_user_fields(make_file(tmp_path, "flac", tags=TAGS), genre=["Jazz"])
    tag(path, "append")
    assert field(path, "genre") == ["Jazz", "ambient", "electronic"]
    tag(path, "off")
    assert field(path, "genre") == ["Jazz"] and field(path, "mood") == []
    assert "standard" not in read_earmark_tags(path), "nothing of ours is left to record"


def test_a_users_edit_after_tagging_survives_untag(tmp_path, db):
    path = make_file(tmp_path / "lib", "flac", tags=TAGS)
    tag(path, "fill-empty")
    tags = open_tags(path)  # the user adds a genre of their own beside Earmark's
    tags.set_standard_raw("genre", {"text": ["ambient", "electronic", "Dub"], "encoding": None})
    tags.save()
    Library.objects.create(name="lib", root=str(tmp_path / "lib"))
    untag(["lib"])
    assert field(path, "genre") == ["Dub"] and read_earmark_tags(path) == {}


def test_without_a_request_the_standard_fields_and_their_record_stay(tmp_path):
    path = make_file(tmp_path, "ogg", tags=TAGS)
    tag(path, "replace")
    record = read_earmark_tags(path)["standard"]
    safe_write_tags(path, {"version": ["v9"]})  # an older caller that knows nothing of standard fields
    assert field(path, "genre") == ["ambient", "electronic"] and read_earmark_tags(path)["standard"] == record


def test_untag_refuses_a_path_outside_every_library(tmp_path, db):
    Library.objects.create(name="lib", root=str(tmp_path / "lib"))
    (tmp_path / "lib").mkdir()
    outside = make_file(tmp_path / "elsewhere", "flac", tags=TAGS)
    with pytest.raises(Exception, match="not a library's name nor a path inside"):
        call_command("untag", str(outside))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        standard.Request("overwrite")
    assert set(standard.POLICIES) == set(Library.StandardTags.values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_beets_mediafile_reads_the_genre_and_mood_earmark_wrote(tmp_path, fmt):
    import mediafile  # beets' own tag reader, from the test extra
    path = make_file(tmp_path, fmt, tags=TAGS)
    tag(path, "fill-empty")
    read = mediafile.MediaFile(str(path))
    assert read.genres == ["ambient", "electronic"] and read.genre == "ambient"
    assert read.title == "Song", "and the user's tags as they were"


def test_through_the_taggers_write_path_untag_restores_the_original(tmp_path, db):
    """Tag, re-tag with other scores, switch the library to replace and rewrite (as the recalibrator does), untag."""
    import numpy as np

    from workers.library import paths
    from workers.models import Track
    from workers.tagging import apply
    from workers.tagging.categories import GENRE, LABELS

    root = tmp_path / "music"
    path = with_user_fields(make_file(root, "mp3", tags=TAGS), genre=["Jazz"], mood=["Sad"])
    user_before = read_user_tags(path)
    library = Library.objects.create(name="music", root=str(root))
    track = Track.objects.create(library=library, path=paths.to_text(bytes(path)), folder=str(root), format="mp3")
    genres = [label for label, spec in LABELS.items() if spec.category == GENRE]

    def write(strong: str) -> None:
        means = {label: 0.001 for label in LABELS}
        means[strong] = 0.99
        written = apply.write_file_tags(Track.objects.get(id=track.id), means, {}, "m@1")
        Track.objects.filter(id=track.id).update(size=written.size, mtime_ns=written.mtime_ns)

    write(genres[0])  # fill-empty: the user's genre and mood stay
    assert field(path, "genre") == ["Jazz"]
    write(genres[1])  # re-tag with another result
    Library.objects.filter(id=library.id).update(standard_tags="replace")
    write(genres[2])  # rewritten under the replace policy
    assert field(path, "genre") == [LABELS[genres[2]].canonical]
    call_command("untag", "music")
    assert read_earmark_tags(path) == {} and read_user_tags(path) == user_before
