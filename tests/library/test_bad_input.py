"""Bad input: every kind of damaged or hostile file in one library, with real scanner and tagger processes.

Two scanners and two taggers (real ``manage.py`` processes, kept running,
not ``--exit-when-idle``) work through a library that holds good files of
every format and odd name next to every kind of bad input the issues name.
Afterwards every bad file is a failed track whose error a person can read
(checked per kind), every good file is tagged, and every worker is still up
and stops cleanly. Files that must never be read are guarded by the
decoder's test-only abort hook: if a tagger ever opened one, it would die
(``os.abort()``) and the test would see it.
"""
import os
import re
import signal
from pathlib import Path

import pytest

from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Job, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX
from workers.tagfiles.namespace import read_earmark_tags

from tests.audio_factory import (make_corrupt_id3_mp3, make_empty, make_file, make_id3_only, make_image_as_audio,
                            make_random_bytes, make_truncated, tone)
from tests.conftest import spawn, wait_for

pytestmark = pytest.mark.slow

FORMATS = ["mp3", "flac", "ogg", "opus", "m4a", "alac", "wav", "aiff"]
NEVER_READ = "NEVER-READ"

# What a person is told, per kind of bad file (a regular expression on Track.error).
EXPECTED = {
    "empty.mp3": r"^empty file \(0 bytes\)$",
    "noise.flac": r"^not audio: the data is not in any audio format",
    "cover.mp3": r"^not audio: the file is a PNG image",
    "corrupt-id3.mp3": r"^corrupt: the file starts like an MP3 with an ID3 tag but cannot be read",
    "tag-only.mp3": r"^not audio: the file holds only an ID3 tag and no audio after it",
    "too-short.wav": r"^too short to tag: 0.40 s of audio",
    "broken-link.mp3": r"^broken symlink",
    f"{NEVER_READ}-link.flac": r"^symlink leads outside the library root; not followed$",
    "loop-a.mp3": r"^symlink loop: the link leads back to itself; not followed$",
    "loop-b.mp3": r"^symlink loop: the link leads back to itself; not followed$",
    # A container that declares its length and decodes far short of it is "truncated"; an MP4 cut
    # before its index cannot even be opened, and says so.
    **{f"truncated-{fmt}.{ext}": r"^truncated: (decoded 1.6 s of 4.0 s|the Ogg stream breaks off)"
       for fmt, ext in [("mp3", "mp3"), ("flac", "flac"), ("ogg", "ogg"), ("opus", "opus"), ("wav", "wav"),
                        ("aiff", "aiff")]},
    "truncated-m4a.m4a": r"^corrupt: the file starts like an MP4/M4A file but cannot be read \(damaged or cut short",
    "truncated-alac.m4a": r"^corrupt: the file starts like an MP4/M4A file but cannot be read \(damaged or cut short",
}


def build_library(root: Path, outside: Path) -> tuple[list[Path], dict[str, Path]]:
    good_dir, bad_dir = root / "Good", root / "Bad"
    good = [make_file(good_dir, fmt, seconds=2.5, seed=i, name=f"good-{fmt}{'.m4a' if fmt == 'alac' else '.' + fmt}")
            for i, fmt in enumerate(FORMATS)]
    good.append(make_file(good_dir, "wav", samples=tone(3, 8000, amplitude=0.0)[None], sample_rate=8000,
                          name="silence-8k-mono.wav"))
    # Valid files with names that are not plain ASCII: accents, a newline, bytes that are not UTF-8.
    good.append(make_file(good_dir, "flac", seconds=2.5, seed=20, name="Sigur Rós – Hoppípolla.flac"))
    good.append(make_file(good_dir, "mp3", seconds=2.5, seed=21, name="line\nbreak.mp3"))
    latin1 = make_file(good_dir, "ogg", seconds=2.5, seed=22, name="latin1.ogg")
    latin1_name = os.path.join(os.fsencode(good_dir), b"caf\xe9 cr\xe8me.ogg")
    os.rename(latin1, latin1_name)
    good.append(Path(os.fsdecode(latin1_name)))

    bad = {}
    bad_dir.mkdir()
    bad["empty.mp3"] = make_empty(bad_dir, "empty.mp3")
    bad["noise.flac"] = make_random_bytes(bad_dir, "noise.flac")
    bad["cover.mp3"] = make_image_as_audio(bad_dir, "cover.mp3")
    bad["corrupt-id3.mp3"] = make_corrupt_id3_mp3(bad_dir)
    bad["tag-only.mp3"] = make_id3_only(bad_dir)
    bad["too-short.wav"] = make_file(bad_dir, "wav", seconds=0.4, name="too-short.wav")
    for fmt in FORMATS:
        path = make_truncated(bad_dir, fmt, fraction=0.4, seconds=4.0)
        bad[path.name] = path
    (bad_dir / "broken-link.mp3").symlink_to(bad_dir / "does-not-exist.mp3")
    bad["broken-link.mp3"] = bad_dir / "broken-link.mp3"
    secret = make_file(outside, "flac", seconds=2.5, seed=30, name=f"{NEVER_READ}-private.flac")
    (bad_dir / f"{NEVER_READ}-link.flac").symlink_to(secret)
    bad[f"{NEVER_READ}-link.flac"] = bad_dir / f"{NEVER_READ}-link.flac"
    (bad_dir / "loop-a.mp3").symlink_to(bad_dir / "loop-b.mp3")
    (bad_dir / "loop-b.mp3").symlink_to(bad_dir / "loop-a.mp3")
    bad["loop-a.mp3"], bad["loop-b.mp3"] = bad_dir / "loop-a.mp3", bad_dir / "loop-b.mp3"
    # Not files at all: a directory loop and a directory with an audio name (neither becomes a track).
    (bad_dir / "Loop").mkdir()
    (bad_dir / "Loop" / "again").symlink_to(bad_dir)
    (bad_dir / "folder.mp3").mkdir()
    make_file(bad_dir / "folder.mp3", "mp3", seconds=2.5, seed=23, name="inside a folder named like a file.mp3")
    good.append(bad_dir / "folder.mp3" / "inside a folder named like a file.mp3")
    return good, bad


def test_every_kind_of_bad_file_fails_with_a_reason_and_the_good_ones_are_tagged(worker_env, tmp_path,
                                                                                  installed_models_dir):
    root, outside = tmp_path / "music", tmp_path / "outside"
    good, bad = build_library(root, outside)
    secret = outside / f"{NEVER_READ}-private.flac"
    secret_before = (secret.read_bytes(), os.stat(secret).st_mtime_ns)
    library = add_library("music", str(root))
    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir), EARMARK_TEST_ABORT_MARKER=NEVER_READ)
    workers = [spawn("run_scanner", "--number", n, env=env) for n in (1, 2)]
    workers += [spawn("run_tagger", "--number", n, env=env) for n in (1, 2)]
    try:
        scan.request_scan(library)
        wait_for(lambda: scan.progress(library).get("state") == "done", timeout=60, message="the scan")
        wait_for(lambda: Job.objects.filter(queue="tag").exists()
                 and not Job.objects.filter(queue="tag", state__in=Job.ACTIVE_STATES).exists(),
                 timeout=120, interval=0.3, message="every tag job finished")
        alive = [p.poll() is None for p in workers]
    finally:
        for p in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60)[0] for p in workers]
    assert alive == [True] * 4, "every worker stayed up:\n" + "\n".join(outputs)
    assert [p.returncode for p in workers] == [0] * 4, outputs
    for out in outputs:
        assert "Traceback" not in out and "database is locked" not in out, out

    tracks = {Path(os.fsdecode(os.fsencode(t.path) if "\\" not in t.path else _bytes(t.path))): t
              for t in Track.objects.filter(library=library)}
    # Every bad file: failed, with a sentence a person understands.
    for name, path in bad.items():
        track = tracks.get(path)
        assert track is not None, f"{name} has no track"
        assert track.state == "failed", (name, track.state, track.error)
        assert re.search(EXPECTED[name], track.error, re.I), (name, track.error)
        assert not re.search(r"Traceback|object at 0x|b'/|Errno", track.error), (name, track.error)
    # Every good file: tagged, in the file and in the database.
    for path in good:
        track = tracks.get(path)
        assert track is not None and track.state == "tagged", (path, track and (track.state, track.error))
        assert read_earmark_tags(path)["version"], path
    assert set(tracks) == set(good) | set(bad.values()), "no other track (no directory, no temporary file)"
    # The file outside the root was neither read (no tagger died on it) nor written.
    assert (secret.read_bytes(), os.stat(secret).st_mtime_ns) == secret_before
    assert not list(root.rglob(f"{TEMP_PREFIX}*")) and not list(outside.rglob(f"{TEMP_PREFIX}*"))
    # The tag jobs of bad files failed with the same reasons, at once (no retries burnt on them).
    for job in Job.objects.filter(queue="tag", state="failed"):
        assert job.attempts == 1 and job.last_error, (job.key, job.attempts, job.last_error)


def _bytes(text: str) -> bytes:
    from workers.library import paths

    return paths.to_bytes(text)
