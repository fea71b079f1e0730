"""Queueing work for given paths (``workers.library.enqueue``) and ``manage.py enqueue``, on real files.

The folder jobs run in-process through the scan worker's own job function
(``drain_scans``), except in the command tests, which run the command, a
scanner and a tagger as real processes.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workers.jobs import queue
from workers.library import enqueue, paths, scan, targeted
from workers.library.waiting import format_tags
from workers.models import Job, Library, Track
from workers.tagfiles.namespace import read_earmark_tags
from workers.tagfiles.tempfiles import TEMP_PREFIX

from tests.audio_factory import make_empty, make_file, make_image_as_audio, make_random_bytes
from tests.conftest import ROOT, category_tags, drain_scans, manage, spawn, wait_for


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    return Library.objects.create(name="music", root=str(root))


def target_jobs(state=None):
    jobs = Job.objects.filter(queue="scan", key__startswith="target:")
    return jobs.filter(state=state) if state else jobs


def track(path) -> Track:
    return Track.objects.get(path=paths.to_text(os.fsencode(path)))


def drain():
    assert drain_scans() == []


def scan_library(lib):
    scan.request_scan(lib)
    drain()


@pytest.mark.django_db
def test_files_and_folders_queue_one_job_per_folder_and_become_tracks(library):
    root = Path(library.root)
    a1 = make_file(root / "Artist" / "Album1", "mp3", seconds=1, name="01.mp3", tags={"title": "One"})
    a2 = make_file(root / "Artist" / "Album1", "flac", seconds=1, name="02.flac")
    disc = [make_file(root / "Artist" / "Album2" / f"CD{n}", "ogg", seconds=1, name=f"{n}.ogg") for n in (1, 2)]
    other = make_file(root / "Other", "m4a", seconds=1, name="x.m4a")

    out = enqueue.enqueue_paths([str(a1), os.fsencode(a2), str(root / "Artist" / "Album2")], reason="test")
    assert [o.ok for o in out] == [True, True, True], [o.error for o in out]
    assert out[0].job_ids == out[1].job_ids and out[0].job_ids != out[2].job_ids, "one job per folder"
    assert out[0].path == str(a1) and out[1].path == str(a2)
    assert out[0].track_ids == [], "not a track yet"
    jobs = {j.id: j for j in target_jobs("queued")}
    assert set(jobs) == {out[0].job_ids[0], out[2].job_ids[0]}
    album1, album2 = jobs[out[0].job_ids[0]], jobs[out[2].job_ids[0]]
    assert album1.payload["folder"] == str(a1.parent) and not album1.payload["recursive"]
    assert album2.payload["folder"] == str(root / "Artist" / "Album2") and album2.payload["recursive"]
    assert album1.priority == 20 and album1.payload["reason"] == "test"
    assert not Job.objects.filter(queue="scan", key__startswith="library:").exists(), "no library scan"

    drain()
    for f in (a1, a2, *disc):
        assert track(f).state == "scanned", f
    assert track(a1).title == "One"
    assert not Track.objects.filter(path=str(other)).exists(), "a folder nobody named is not scanned"
    tag_jobs = Job.objects.filter(queue="tag", state="queued")
    assert tag_jobs.count() == 4 and {j.priority for j in tag_jobs} == {20}, "tag jobs at the caller's priority"
    assert scan.progress(library) == {}, "no library scan was started"

    again = enqueue.enqueue_paths([str(a1)])
    assert again[0].track_ids == [track(a1).id]


@pytest.mark.django_db
def test_folder_job_reads_new_and_changed_files_and_marks_vanished_ones_missing(library):
    root = Path(library.root)
    album = root / "Album"
    keep = make_file(album, "mp3", seconds=1, name="keep.mp3")
    change = make_file(album, "flac", seconds=1, name="change.flac")
    delete = make_file(album, "ogg", seconds=1, name="delete.ogg")
    sub = make_file(album / "Bonus", "mp3", seconds=1, name="bonus.mp3")
    elsewhere = make_file(root / "Elsewhere", "mp3", seconds=1, name="e.mp3")
    scan_library(library)
    Job.objects.filter(queue="tag").update(state="done")
    Track.objects.update(state="tagged")
    gen = scan.progress(library)["gen"]

    new = make_file(album, "opus", seconds=1, name="new.opus")
    make_file(album, "flac", seconds=2, name="change.flac", seed=5)
    delete.unlink()
    shutil.rmtree(album / "Bonus")
    elsewhere.unlink()  # not in the named folder: left to the next library scan

    out = enqueue.enqueue_paths([str(album)])
    assert out[0].ok and set(out[0].track_ids) == {track(keep).id, track(change).id, track(delete).id}
    drain()
    assert track(new).state == "scanned"
    assert track(change).state == "scanned" and track(change).size == change.stat().st_size, "re-read"
    assert track(keep).state == "tagged", "unchanged: not touched"
    assert track(delete).state == "missing"
    assert track(sub).state == "missing", "a known folder below the named one that is gone"
    assert track(elsewhere).state == "tagged", "outside the named folder"
    assert set(Job.objects.filter(queue="tag", state="queued").values_list("track_id", flat=True)) == {
        track(new).id, track(change).id}
    assert track(new).scan_gen > gen

    # Twice in a row on one folder: the second run sees what the first one saw go.
    enqueue.enqueue_paths([str(new)])
    drain()
    new.unlink()
    enqueue.enqueue_paths([str(album)])
    drain()
    assert track(new).state == "missing"

    # A library scan afterwards starts above the targeted generations and agrees.
    scan_library(library)
    assert track(keep).state == "tagged" and track(change).state == "scanned"
    assert track(elsewhere).state == "missing"
    assert scan.progress(library)["gen"] > track(keep).scan_gen - 1


@pytest.mark.django_db
def test_bad_paths_get_a_clear_error_and_queue_nothing(library, tmp_path):
    root = Path(library.root)
    good = make_file(root / "A", "mp3", seconds=1, name="good.mp3")
    outside = make_file(tmp_path / "outside", "mp3", seconds=1, name="secret.mp3")
    os.symlink(outside, root / "A" / "escape.mp3")
    os.symlink(outside.parent, root / "escape-dir")
    os.symlink(root / "A" / "nowhere.mp3", root / "A" / "broken.mp3")
    (root / "A" / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    (root / "A" / "notes.txt").write_text("liner notes")
    junk = make_random_bytes(root / "A", name="junk.flac")
    png = make_image_as_audio(root / "A", name="cover.mp3")
    empty = make_empty(root / "A", name="empty.ogg")
    temp = root / "A" / f"{TEMP_PREFIX}abc-1-2-good.mp3"
    shutil.copy(good, temp)
    fifo = root / "A" / "pipe.mp3"
    os.mkfifo(fifo)
    other_root = tmp_path / "other"
    other_file = make_file(other_root, "mp3", seconds=1, name="o.mp3")
    other = Library.objects.create(name="other", root=str(other_root))
    off_root = tmp_path / "off"
    off_file = make_file(off_root, "mp3", seconds=1, name="off.mp3")
    Library.objects.create(name="off", root=str(off_root), enabled=False)

    cases = {
        str(root / "A" / "gone.mp3"): "does not exist",
        os.fsencode(root) + b"/\xffbad.mp3": "does not exist",
        str(outside): "outside every library",
        f"{root}/../outside/secret.mp3": "outside every library",
        str(root / "A" / "escape.mp3"): "symlink leading out of its library music",
        str(root / "escape-dir"): "symlink leading out of its library music",
        str(root / "escape-dir" / "secret.mp3"): "outside every library",
        str(root / "A" / "broken.mp3"): "broken symlink",
        str(root / "A" / "cover.jpg"): "not audio: .jpg is not an audio format",
        str(root / "A" / "notes.txt"): "not audio: .txt",
        str(junk): "the file is not",
        str(png): "the file is not audio: the file is a PNG image",
        str(empty): "empty (0 bytes)",
        str(temp): "temporary copy",
        str(fifo): "neither a regular file nor a folder",
        str(other_file): "outside the allowed libraries",
        str(off_file): "library off, which is disabled",
        "": "empty",
    }
    out = enqueue.enqueue_paths(list(cases) + [str(good)], libraries=Library.objects.exclude(id=other.id))
    for (given, expected), o in zip(cases.items(), out):
        assert not o.ok and expected in o.error, (given, o.error)
        assert o.job_ids == [] and o.track_ids == []
    assert out[1].path == paths.to_text(os.fsencode(root) + b"/\xffbad.mp3") and "\\xff" in out[1].path
    assert out[-1].ok, out[-1].error
    jobs = list(target_jobs())
    assert [j.payload["folder"] for j in jobs] == [str(root / "A")], "only the good path's folder"
    assert enqueue.enqueue_paths([str(other_file)])[0].ok, "any library when none are named"


@pytest.mark.django_db
def test_symlinks_inside_the_library_and_relative_paths(library, monkeypatch):
    root = Path(library.root)
    real = make_file(root / "Real", "mp3", seconds=1, name="r.mp3")
    os.symlink(real, root / "alias.mp3")
    os.symlink(root / "Real", root / "AliasDir")
    monkeypatch.chdir(root)
    out = enqueue.enqueue_paths(["alias.mp3", "AliasDir", "Real/../Real/r.mp3", "./Real"])
    assert all(o.ok for o in out), [o.error for o in out]
    assert out[2].path == "Real/../Real/r.mp3", "reported as given"
    folders = sorted((j.payload["folder"], j.payload["recursive"]) for j in target_jobs())
    assert folders == [(str(root), False), (str(root / "Real"), True)], "a folder link is scanned where it leads"
    assert out[3].job_ids == out[1].job_ids and out[2].job_ids == out[1].job_ids, "covered by the named folder"
    drain()
    assert track(root / "alias.mp3").state == "scanned" and track(real).state == "scanned"


@pytest.mark.django_db
def test_a_burst_of_10000_paths_in_200_folders_makes_at_most_200_jobs_and_misses_nothing(library):
    root = Path(library.root)
    src = make_file(root, "mp3", seconds=0.2, name="src.mp3")
    given = []
    for a in range(200):
        folder = root / f"Artist{a // 20:02d}" / f"Album{a:03d}"
        folder.mkdir(parents=True)
        for t in range(50):
            dest = folder / f"{t:02d}.mp3"
            shutil.copyfile(src, dest)
            given.append(str(dest))
    src.unlink()
    out = enqueue.enqueue_paths(given)
    assert all(o.ok for o in out)
    assert target_jobs().count() == 200
    assert len({o.job_ids[0] for o in out}) == 200
    again = enqueue.enqueue_paths(given[::7])
    assert target_jobs().count() == 200, "the queued jobs absorb a second burst"
    assert {o.job_ids[0] for o in again} <= {o.job_ids[0] for o in out}
    drain()
    assert Track.objects.filter(library=library, state="scanned").count() == 10_000
    assert Job.objects.filter(queue="tag", state="queued").count() == 10_000


@pytest.mark.django_db
def test_a_running_job_does_not_absorb_a_later_request(library):
    root = Path(library.root)
    first = make_file(root / "A", "mp3", seconds=1, name="1.mp3")
    job_id = enqueue.enqueue_paths([str(first)])[0].job_ids[0]
    [claimed] = queue.claim("scan", "worker:testhost:scan:1", "boot", 1)
    assert claimed.id == job_id
    second = make_file(root / "A", "mp3", seconds=1, name="2.mp3", seed=2)  # after the running job listed it
    later = enqueue.enqueue_paths([str(second)])[0].job_ids[0]
    assert later != job_id, "a new job beside the running one"
    assert Job.objects.get(id=job_id).state == "running" and Job.objects.get(id=job_id).key.endswith(f"#{job_id}")
    assert enqueue.enqueue_paths([str(first)])[0].job_ids == [later], "and the queued one absorbs the rest"
    queue.complete([job_id], "worker:testhost:scan:1", boot_id="boot")
    drain()
    assert track(second).state == "scanned"


@pytest.mark.django_db
def test_a_recursive_job_fans_out_what_it_does_not_reach_in_time(library, monkeypatch):
    root = Path(library.root)
    for a in range(40):
        make_file(root / "Big" / f"A{a:02d}", "mp3", seconds=0.2, name="t.mp3")
    monkeypatch.setattr(scan, "INLINE_SECONDS", 0)
    out = enqueue.enqueue_paths([str(root / "Big")])
    drain()
    assert Track.objects.filter(state="scanned").count() == 40
    jobs = list(target_jobs())
    assert len(jobs) > 1 and all(not j.payload["sweep"] for j in jobs if j.id != out[0].job_ids[0])
    assert all(j.state == "done" for j in jobs)


@pytest.mark.django_db
def test_generations_rise_across_targeted_jobs_and_library_scans(library):
    a = make_file(Path(library.root), "mp3", seconds=1, name="a.mp3")
    scan_library(library)
    g = scan.progress(library)["gen"]
    enqueue.enqueue_paths([str(a)])
    drain()
    assert track(a).scan_gen == g + 1, "a targeted job takes a generation above the scan's"
    scan_library(library)
    assert scan.progress(library)["gen"] == g + 2 and track(a).scan_gen == g + 2, "and a later scan goes above it"
    assert targeted.next_gen(library.id) == g + 3
    assert targeted.next_gen(library.id) == g + 4


# --- the command, in real processes -------------------------------------------------


def queued_scan_jobs():
    return Job.objects.filter(queue="scan", key__startswith="target:", state="queued").exists()


def test_command_prints_each_path_and_fails_when_one_is_refused(worker_env, tmp_path):
    root = tmp_path / "music"
    good = make_file(root / "A", "mp3", seconds=1, name="good.mp3")
    Library.objects.create(name="music", root=str(root))
    proc = manage("enqueue", good, tmp_path / "nope.mp3", env=worker_env, check=False)
    assert proc.returncode != 0
    assert f"queued {good} (job " in proc.stdout
    assert f"error {tmp_path / 'nope.mp3'}: the path does not exist" in proc.stdout
    assert "1 path(s) refused" in proc.stderr
    assert target_jobs("queued").count() == 1
    ok = manage("enqueue", root / "A", env=worker_env, check=False)
    assert ok.returncode == 0 and f"queued {root / 'A'} (job " in ok.stdout


def test_command_wait_times_out_with_a_clear_message_when_no_tagger_runs(worker_env, tmp_path):
    root = tmp_path / "music"
    good = make_file(root / "A", "mp3", seconds=1, name="good.mp3")
    Library.objects.create(name="music", root=str(root))
    proc = spawn("enqueue", good, "--wait", "--timeout", "4", env=worker_env)
    wait_for(queued_scan_jobs, timeout=30, message="the folder job")
    drain()  # the scanner's part, in this process; no tagger runs
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "timed out after 4 s: 1 track(s) not tagged yet (1 tag job(s) still queued: is a tagger running?" in out
    assert f"not done: {good}" in out and "CommandError: the wait timed out" in out


@pytest.mark.slow
def test_command_wait_reports_the_tags_a_real_tagger_wrote(worker_env, installed_models_dir, tmp_path):
    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir))
    root = tmp_path / "music"
    files = [make_file(root / "Album", fmt, seconds=3, seed=i, name=f"{i}.{fmt}") for i, fmt in enumerate(["mp3", "flac"])]
    bad = make_random_bytes(root / "Album", name="zz-junk.ogg")  # passes no check by name, fails by content
    Library.objects.create(name="music", root=str(root))
    waiter = spawn("enqueue", root / "Album", "--wait", "--timeout", "240", env=env)
    wait_for(queued_scan_jobs, timeout=30, message="the folder job")
    manage("run_scanner", "--exit-when-idle", env=env, timeout=120)
    manage("run_tagger", "--exit-when-idle", env=env, timeout=240)
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode != 0, "the junk file's track failed"
    for f in files:
        t = track(f)
        assert t.state == "tagged"
        assert f"tagged {f}: " in out
        assert category_tags(read_earmark_tags(f)) == category_tags(t.earmark_tags), "what the file holds"
        line = next(line for line in out.splitlines() if line.startswith(f"tagged {f}: "))
        assert line.endswith(format_tags(t.earmark_tags)) and t.earmark_tags.get("genre"), line
    assert f"failed {bad}: " in out and "1 failed" in out
    assert "done: 2 track(s) tagged, 1 failed" in out




# --- the documented hooks: Lidarr's script, beets' hook config, Picard's plugin -------


def hook_env(worker_env, **more) -> dict:
    """What a hook's process has: the test database's settings (no settings file), and the hook's own variables."""
    import sys

    return {**worker_env, "EARMARK_ENV_FILE": "", "EARMARK_PYTHON": sys.executable, **more}


def test_lidarr_script_queues_imported_files_and_passes_the_test_event(worker_env, tmp_path):
    root = tmp_path / "music"
    album = root / "Artist" / "Album (2024) [FLAC]"
    files = [make_file(album, "flac", seconds=1, name=f"0{n} Song {n}.flac") for n in (1, 2)]
    Library.objects.create(name="music", root=str(root))
    script = ROOT / "deploy" / "hooks" / "lidarr.sh"

    test = subprocess.run([script], env=hook_env(worker_env, lidarr_eventtype="Test"), capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    grab = subprocess.run([script], env=hook_env(worker_env, lidarr_eventtype="Grab"), capture_output=True, text=True)
    assert grab.returncode == 0 and not target_jobs().exists()

    env = hook_env(worker_env, lidarr_eventtype="AlbumDownload", lidarr_artist_path=str(root / "Artist"),
                   lidarr_addedtrackpaths="|".join(map(str, files)))
    run = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(f"queued {f} (job " in run.stdout for f in files)
    assert [j.payload["folder"] for j in target_jobs("queued")] == [str(album)], "one job for the album"

    env.update(lidarr_addedtrackpaths=f"{files[0]}|{root / 'gone.flac'}")
    refused = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and f"error {root / 'gone.flac'}: the path does not exist" in refused.stdout


def readme_beets_hooks() -> list[dict]:
    import yaml

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### beets"):]
    block = section[section.index("```yaml") + len("```yaml"): section.index("```", section.index("```yaml") + 7)]
    return yaml.safe_load(block)["hook"]["hooks"]


def test_the_readme_beets_hook_config_queues_the_imported_album(worker_env, tmp_path):
    import shlex
    import string
    from types import SimpleNamespace

    class BytesToStr(string.Formatter):  # what beets' hook plugin formats with (beetsplug/hook.py, beets 2.x)
        def convert_field(self, value, conversion):
            converted = super().convert_field(value, conversion)
            return os.fsdecode(converted) if isinstance(converted, bytes) else converted

    root = tmp_path / "music"
    album = os.fsencode(root / "Artist") + b"/Caf\xe9 Album"  # beets' paths are bytes, not always UTF-8
    os.makedirs(album)
    song = make_file(Path(os.fsdecode(album)), "mp3", seconds=1, name="01 Song.mp3")
    Library.objects.create(name="music", root=str(root))
    hooks = {h["event"]: h["command"] for h in readme_beets_hooks()}
    assert set(hooks) == {"album_imported", "item_imported"}
    objects = {"album_imported": {"album": SimpleNamespace(path=album)},
               "item_imported": {"item": SimpleNamespace(path=os.fsencode(song))}}
    for event, command in hooks.items():
        pieces = [BytesToStr().format(p.replace("/opt/earmark", str(ROOT)), event=event, **objects[event])
                  for p in shlex.split(command)]
        subprocess.check_call(pieces, env=hook_env(worker_env), stdout=subprocess.DEVNULL)
    jobs = list(target_jobs("queued"))
    assert {(j.payload["folder"], j.payload["recursive"]) for j in jobs} == {
        (paths.to_text(album), True), (paths.to_text(album), False)}, "the album folder, byte for byte"


def test_picard_plugin_queues_an_album_saved_at_once_in_one_call(worker_env, tmp_path, monkeypatch):
    import importlib.util
    import sys
    import types

    root = tmp_path / "music"
    files = [make_file(root / "Album", "ogg", seconds=1, name=f"{n}.ogg") for n in range(3)]
    Library.objects.create(name="music", root=str(root))
    registered, logged = [], []
    picard = types.ModuleType("picard")
    picard.log = types.SimpleNamespace(info=lambda *a: logged.append(a), error=lambda *a: logged.append(("E",) + a))
    picard_file = types.ModuleType("picard.file")
    picard_file.register_file_post_save_processor = registered.append
    monkeypatch.setitem(sys.modules, "picard", picard)
    monkeypatch.setitem(sys.modules, "picard.file", picard_file)
    for key, value in hook_env(worker_env, EARMARK_ENQUEUE=str(ROOT / "deploy" / "earmark-enqueue")).items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("picard_earmark", ROOT / "deploy" / "hooks" / "picard_earmark.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    plugin.SETTLE_SECONDS = 0.2
    calls = []
    real_popen = plugin.subprocess.Popen
    monkeypatch.setattr(plugin.subprocess, "Popen", lambda args, **kw: calls.append(args) or real_popen(args, **kw))

    [on_saved] = registered
    for f in files:
        on_saved(types.SimpleNamespace(filename=str(f)))
    wait_for(lambda: target_jobs("queued").exists(), timeout=60, message="the plugin's enqueue")
    assert len(calls) == 1 and sorted(calls[0][1:]) == sorted(map(str, files)), "one call for the album"
    assert target_jobs().count() == 1 and ("E",) not in [entry[:1] for entry in logged]
