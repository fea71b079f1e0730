"""Calibration: percentiles and histograms, tiers and contradictions under calibrated strengths,
the current calibration per process, the automatic trigger, export/import, the command and the admin.

Statistics run on synthetic ``Score`` rows (known distributions); the
recalibrator, real files and real model scores are in ``test_recalibrator``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.urls import reverse

from workers.calibration import auto, compute, transfer
from workers.tagging import calibrated
from workers.models import Calibration, Job, Library, Meta, Score, Track
from workers.tagging import scores as stored
from workers.tagging.tagset import TIERS, UNCALIBRATED, build_tags

MODELS = "MTT_musicnn@abcd1234+MSD_musicnn@ef567890"
LABEL_IDS = compute.LABEL_ORDER

pytestmark = pytest.mark.django_db


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    return Library.objects.create(name="music", root=str(root))


def add_tracks(library, means: np.ndarray, *, state=Track.State.TAGGED, calibration_version="uncalibrated",
               model_version=MODELS, start: int = 0) -> list[int]:
    """Tracks with stored scores: one row of ``means`` (tracks × 100 labels) each, spreads 0."""
    root = Path(library.root)
    tracks = Track.objects.bulk_create([
        Track(library=library, path=str(root / f"t{start + i}.mp3"), folder=str(root), state=state,
              model_version=model_version, calibration_version=calibration_version)
        for i in range(len(means))])
    digest = stored.labels_digest(LABEL_IDS)
    Score.objects.bulk_create([
        Score(track=t, model_version=model_version, labels_version=digest, means=stored.pack(row),
              spreads=stored.pack(np.zeros(len(row))), patches=10)
        for t, row in zip(tracks, means)])
    return [t.id for t in tracks]


def random_means(n: int, seed: int = 0) -> np.ndarray:
    """Sigmoid-like scores: mostly near 0, a long tail, a different shape per label."""
    rng = np.random.default_rng(seed)
    a = np.linspace(0.3, 2.0, len(LABEL_IDS))
    return rng.beta(a, 8.0, size=(n, len(LABEL_IDS))).astype(np.float32)


def minmax(version="lib-v1", **ranges) -> calibrated.LibraryCalibration:
    """A calibration with the given (p5, p95) per label (``msd_jazz=(0.1, 0.5)``)."""
    stats = {}
    for key, (p5, p95) in ranges.items():
        label = key.replace("__", " ").replace("_", ":", 1)
        stats[label] = {"p5": p5, "p95": p95, "min": p5, "max": p95, "counts": [0] * compute.BINS}
    return calibrated.LibraryCalibration(version, stats)


# ------------------------------------------------------------------ statistics

def test_percentiles_and_histograms_on_known_distributions():
    n = 10001
    ramp = np.arange(n, dtype=np.float32) / (n - 1)             # 0, 0.0001, ..., 1: evenly spaced
    scale = np.linspace(0.01, 1.0, len(LABEL_IDS), dtype=np.float32)
    matrix = ramp[:, None] * scale[None, :]                      # label j: uniform on [0, scale_j]
    stats = compute.statistics(matrix, LABEL_IDS)
    for j, label in enumerate(LABEL_IDS):
        s = stats[label]
        assert s["p5"] == pytest.approx(0.05 * scale[j], rel=1e-5, abs=1e-7)
        assert s["p95"] == pytest.approx(0.95 * scale[j], rel=1e-5, abs=1e-7)
        assert (s["min"], s["max"]) == (0.0, pytest.approx(float(scale[j])))
        assert sum(s["counts"]) == n and len(s["counts"]) == compute.BINS
        assert max(s["counts"]) - min(s["counts"]) <= 2, "an even ramp fills every bin alike"


def test_histogram_edges_and_constant_labels():
    by_label = np.array([[0.0, 0.25, 0.5, 1.0], [0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    counts = compute.histograms(by_label, by_label.min(axis=1), by_label.max(axis=1), bins=4)
    assert counts.tolist() == [[1, 1, 1, 1], [4, 0, 0, 0]]      # the max lands in the last bin


def test_compute_matches_numpy_and_uses_only_tagged_tracks(library):
    means = random_means(500)
    add_tracks(library, means)
    add_tracks(library, np.ones((50, 100), np.float32), state=Track.State.MISSING, start=500)
    short = add_tracks(library, random_means(1, seed=9), start=600)
    Score.objects.filter(track_id=short[0]).update(means=b"\x00" * 12)    # a damaged row is skipped
    timings = {}
    row, created = compute.compute(min_count=100, timings=timings)
    assert created and row.track_count == 500 and row.model_version == MODELS
    expected = np.percentile(np.ascontiguousarray(means.T), [5, 95], axis=1)
    assert [row.stats[l]["p5"] for l in LABEL_IDS] == pytest.approx(expected[0].tolist(), rel=1e-6)
    assert [row.stats[l]["p95"] for l in LABEL_IDS] == pytest.approx(expected[1].tolist(), rel=1e-6)
    assert set(timings) == {"load", "load_query", "load_decode", "stats", "save"}
    again, created_again = compute.compute(min_count=100)
    assert not created_again and again.version == row.version, "same scores, same version"


def test_too_few_tracks_is_refused(library):
    add_tracks(library, random_means(5))
    with pytest.raises(compute.NotEnoughTracks, match="5 tagged track"):
        compute.compute(min_count=6)
    assert not Calibration.objects.exists()


def test_scale_is_min_max_unclipped_with_a_floor_on_the_span():
    c = minmax(msd_jazz=(0.1, 0.5), msd_blues=(0.2, 0.2001))
    assert c.scale("msd:jazz", 0.1) == 0.0 and c.scale("msd:jazz", 0.5) == 1.0
    assert c.scale("msd:jazz", 0.9) == pytest.approx(2.0), "not clipped: stronger still outranks"
    assert c.scale("msd:blues", 0.2 + calibrated.MIN_SPAN) == pytest.approx(1.0), "a flat label needs a real rise"
    assert c.scale("msd:rock", 0.2) == UNCALIBRATED.scale("msd:rock", 0.2), "uncovered labels stay uncalibrated"


# --------------------------------------------------------- tiers and contradictions

def tiers_of(scores, spreads=None, calibration=None, mode="minimal"):
    result = build_tags(scores, spreads, calibration, mode, models=MODELS)
    return {tier: result.tiers[tier]["genre"] for tier in TIERS}, result


def test_tiers_from_calibrated_score_and_spread():
    c = minmax(msd_jazz=(0.1, 0.5))
    # strength 0.875: strict while the spread is small, regular when it swings across patches
    assert tiers_of({"msd:jazz": 0.45}, {"msd:jazz": 0.02}, c)[0] == {"strict": ["jazz"], "regular": ["jazz"],
                                                                       "loose": ["jazz"]}
    assert tiers_of({"msd:jazz": 0.45}, {"msd:jazz": 0.1}, c)[0]["strict"] == []
    # strength 0.25: only loose, and only because parts of the track are strong (mean + spread)
    assert tiers_of({"msd:jazz": 0.2}, {"msd:jazz": 0.0}, c)[0]["loose"] == []
    assert tiers_of({"msd:jazz": 0.2}, {"msd:jazz": 0.05}, c)[0] == {"strict": [], "regular": [], "loose": ["jazz"]}
    # the regular lists depend on the means alone
    assert tiers_of({"msd:jazz": 0.31}, {"msd:jazz": 0.3}, c)[0]["regular"] == ["jazz"]


def test_full_mode_writes_strict_and_loose_lists():
    c = minmax(msd_jazz=(0.1, 0.5), msd_blues=(0.1, 0.5))
    scores, spreads = {"msd:jazz": 0.45, "msd:blues": 0.2}, {"msd:jazz": 0.0, "msd:blues": 0.05}
    _, full = tiers_of(scores, spreads, c, mode="full")
    fields = full.fields()
    assert fields["genre"] == ["jazz"] and fields["genre_strict"] == ["jazz"]
    assert fields["genre_loose"] == ["jazz", "blues"]
    assert fields["version"] == [f"earmark/1 models={MODELS} calibration=lib-v1"]
    _, minimal = tiers_of(scores, spreads, c)
    assert not any(k.endswith(("_strict", "_loose")) for k in minimal.fields())


def test_opposing_labels_resolve_on_calibrated_strength():
    # raw female > raw male, but female's library range is much higher: calibrated, male wins
    c = minmax(msd_female__vocalists=(0.2, 0.9), msd_male__vocalists=(0.01, 0.2))
    result = build_tags({"msd:female vocalists": 0.6, "msd:male vocalists": 0.18}, None, c, models=MODELS)
    assert result.categories["vocals"] == ["male"]
    # instrumental beats the whole vocal side
    c = minmax(msd_instrumental=(0.05, 0.3), msd_female__vocalists=(0.05, 0.5))
    result = build_tags({"msd:instrumental": 0.3, "msd:female vocalists": 0.4}, None, c, models=MODELS)
    assert result.categories["vocals"] == ["instrumental"]


def test_tiers_never_list_the_side_another_tier_rejected():
    c = minmax(msd_female__vocalists=(0.0, 1.0), msd_male__vocalists=(0.0, 1.0))
    scores = {"msd:male vocalists": 0.9, "msd:female vocalists": 0.8}
    spreads = {"msd:male vocalists": 0.3, "msd:female vocalists": 0.01}   # male swings, female steady
    result = build_tags(scores, spreads, c, "full", models=MODELS)
    assert result.tiers["regular"]["vocals"] == ["male"]
    assert result.tiers["strict"]["vocals"] == [], "female lost the contradiction; strict must not list it"
    assert result.tiers["loose"]["vocals"] == ["male"]


# ------------------------------------------------------------ current() and activation

def test_current_follows_activation_with_a_cheap_cache(library, django_assert_num_queries):
    assert calibrated.current() is UNCALIBRATED
    add_tracks(library, random_means(200))
    first, _ = compute.compute(min_count=100)
    assert compute.activate(first) == 200
    now = calibrated.current(max_age=0)
    assert now.version == first.version and now.scale("msd:jazz", first.stats["msd:jazz"]["p95"]) == 1.0
    with django_assert_num_queries(0):
        assert calibrated.current() is now, "cached within REFRESH_SECONDS"
    with django_assert_num_queries(1):
        assert calibrated.current(max_age=0) is now, "same version: one meta read, the row is not reloaded"
    add_tracks(library, random_means(100, seed=1), start=200)
    second, _ = compute.compute(min_count=100)
    compute.activate(second)
    assert calibrated.current().version == first.version, "still cached"
    assert calibrated.current(expect=second.version).version == second.version, "a job for a newer version refreshes"


def test_activation_queues_each_stale_track_once(library):
    ids = add_tracks(library, random_means(150))
    row, _ = compute.compute(min_count=100)
    Track.objects.filter(id=ids[0]).update(calibration_version=row.version)   # already written with it
    Track.objects.filter(id=ids[1]).update(state=Track.State.MISSING)
    disabled = Library.objects.create(name="off", root=library.root, enabled=False)
    add_tracks(disabled, random_means(5, seed=4), start=1000)
    assert compute.activate(row) == 148, "not the missing track, nor the one already written, nor a disabled library's"
    job = Job.objects.get(queue="calibrate", track_id=ids[2])
    assert job.key == f"calibrate:{ids[2]}:{row.version}" and job.payload == {"calibration": row.version}
    assert compute.activate(row) == 0, "active jobs are not queued twice"
    forced = Job.objects.create(queue="calibrate", key=f"calibrate:{ids[3]}", payload={"force": True},
                                track_id=ids[3], run_after=row.created_at, created_at=row.created_at)
    newer = Calibration.objects.create(version="cal-newer", model_version=MODELS, stats=row.stats, track_count=150)
    assert compute.activate(newer) == 149
    cancelled = Job.objects.filter(queue="calibrate", state="cancelled")
    assert cancelled.count() == 148 and {j.payload["calibration"] for j in cancelled} == {row.version}
    forced.refresh_from_db()
    assert forced.state == "queued", "a person's forced job is never cancelled"
    compute.activate(row)
    assert Meta.objects.get(key=calibrated.CURRENT_KEY).value == {"id": row.id, "version": row.version,
                                                           "track_count": 150}


# ------------------------------------------------------------------ the auto trigger

@override_settings(EARMARK_CALIBRATION_MIN_TRACKS=100, EARMARK_CALIBRATION_GROWTH=0.2)
def test_auto_trigger_at_the_minimum_and_after_growth(library):
    add_tracks(library, random_means(99))
    assert auto.auto_recalibrate() is None and not Calibration.objects.exists()
    add_tracks(library, random_means(1, seed=1), start=99)
    first = auto.auto_recalibrate()
    assert first is not None and first.calibration.track_count == 100 and first.jobs == 100
    Track.objects.update(calibration_version=first.calibration.version)   # the recalibrators did their work
    add_tracks(library, random_means(19, seed=2), start=100, calibration_version=first.calibration.version)
    assert auto.auto_due().needed == 120
    assert auto.auto_recalibrate() is None, "119 tagged: not yet 20% more"
    add_tracks(library, random_means(1, seed=3), start=119, calibration_version=first.calibration.version)
    second = auto.auto_recalibrate()
    assert second is not None and second.calibration.track_count == 120
    assert second.calibration.version != first.calibration.version and second.jobs == 120
    assert calibrated.current_pointer()["version"] == second.calibration.version
    assert auto.auto_due().needed == 144


@override_settings(EARMARK_CALIBRATION_MIN_TRACKS=10)
def test_the_sweep_requeues_tracks_a_race_left_behind(library):
    add_tracks(library, random_means(10))
    result = auto.auto_recalibrate()
    Job.objects.all().delete()
    Track.objects.update(calibration_version=result.calibration.version)
    Track.objects.filter(id=Track.objects.first().id).update(calibration_version="uncalibrated")
    assert auto.auto_recalibrate() is None
    assert Job.objects.filter(queue="calibrate").count() == 1


@override_settings(EARMARK_CALIBRATION_MIN_TRACKS=10, EARMARK_CALIBRATION_CHECK_SECONDS=3600)
def test_the_hook_is_throttled_per_process_and_across_processes(library, django_assert_num_queries):
    add_tracks(library, random_means(10))
    assert auto.maybe_recalibrate() is not None
    with django_assert_num_queries(0):
        assert auto.maybe_recalibrate() is None, "within the interval: no database access at all"
    auto.reset()   # another process: its own clock, but the meta row says it is not its turn
    add_tracks(library, random_means(10, seed=1), start=10)
    assert auto.maybe_recalibrate() is None and Calibration.objects.count() == 1


@override_settings(EARMARK_CALIBRATION_MIN_TRACKS=10, EARMARK_CALIBRATION_CHECK_SECONDS=0)
def test_a_due_calibration_without_usable_scores_is_not_retried_until_the_count_moves(library):
    add_tracks(library, random_means(10), model_version="old@1")
    Score.objects.update(labels_version="another-label-list")
    assert auto.maybe_recalibrate() is None
    assert Meta.objects.get(key=auto.AUTO_KEY).value["blocked_at"] == 10
    assert auto.auto_recalibrate() is None and not Calibration.objects.exists()


# ------------------------------------------------------------------ export and import

def test_export_import_round_trip(library, tmp_path):
    add_tracks(library, random_means(120))
    row, _ = compute.compute(min_count=100)
    document = json.loads(json.dumps(transfer.export_json(row)))
    assert document["format"] == transfer.EXPORT_FORMAT and len(document["stats"]) == 100
    version, stats = row.version, row.stats
    Meta.objects.filter(key=calibrated.CURRENT_KEY).delete()
    row.delete()
    imported, created = transfer.import_json(document, source="big-library.json")
    assert created and imported.version == version and imported.stats == stats
    assert imported.source == "imported from big-library.json" and imported.track_count == 120
    assert transfer.import_json(document) == (imported, False), "importing twice is harmless"
    assert compute.activate(imported) == 120
    assert calibrated.current().scale("mtt:guitar", stats["mtt:guitar"]["p5"]) == 0.0


def test_import_refuses_bad_documents_and_foreign_models(library):
    add_tracks(library, random_means(20))
    row, _ = compute.compute(min_count=10)
    good = transfer.export_json(row)
    for broken, message in [
        ({**good, "format": "something-else"}, "not an Earmark calibration"),
        ({**good, "version": "has space"}, "without spaces"),
        ({**good, "stats": {"mtt:nope": good["stats"]["mtt:guitar"]}}, "unknown label"),
        ({**good, "stats": {"mtt:guitar": {**good["stats"]["mtt:guitar"], "p5": math.nan}}}, "finite"),
        ({**good, "stats": {"mtt:guitar": {**good["stats"]["mtt:guitar"], "p5": 2.0}}}, "min <= p5"),
        ({**good, "stats": {"mtt:guitar": {**good["stats"]["mtt:guitar"], "counts": [1, 2]}}}, "counts"),
    ]:
        with pytest.raises(transfer.ImportRefused, match=message):
            transfer.import_json(broken)
    foreign = {**good, "version": "cal-other", "model_version": "MTT_musicnn@00000000+MSD_musicnn@11111111"}
    with pytest.raises(transfer.ImportRefused, match="--force"):
        transfer.import_json(foreign)
    assert transfer.import_json(foreign, force=True)[1]
    clash = {**good, "stats": {**good["stats"], "mtt:guitar": {**good["stats"]["mtt:guitar"], "p95": 0.99,
                                                                "max": 1.0}}}
    with pytest.raises(transfer.ImportRefused, match="different calibration"):
        transfer.import_json(clash)


# ------------------------------------------------------------------ the command

def test_calibrate_command_computes_exports_and_imports(library, tmp_path, capsys):
    add_tracks(library, random_means(30))
    with pytest.raises(CommandError, match="30 tagged track"):
        call_command("calibrate")                          # default minimum: 100
    call_command("calibrate", "--min-tracks", "20")
    out = capsys.readouterr().out
    row = Calibration.objects.get()
    assert f"calibration {row.version} (new) over 30 tracks" in out and "30 track(s) queued" in out
    exported = tmp_path / "cal.json"
    call_command("calibrate", "--export", str(exported))
    assert json.loads(exported.read_text())["version"] == row.version
    Meta.objects.all().delete()
    Calibration.objects.all().delete()
    call_command("calibrate", "--import", str(exported))
    assert f"imported calibration {row.version}" in capsys.readouterr().out
    assert calibrated.current_pointer()["version"] == row.version


def test_calibrate_wait_times_out_without_recalibrators(library):
    add_tracks(library, random_means(10))
    with pytest.raises(SystemExit) as exit_:
        call_command("calibrate", "--min-tracks", "5", "--wait", "--timeout", "0.2")
    assert exit_.value.code == 2


# ------------------------------------------------------------------ the admin

@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("boss", "boss@example.com", "pw")
    client.force_login(user)
    return client


@override_settings(EARMARK_CALIBRATION_MIN_TRACKS=10)
def test_admin_computes_lists_plots_and_exports(admin_client, library):
    changelist = reverse("admin:workers_calibration_changelist")
    page = admin_client.get(changelist).content.decode()
    assert "Compute a new calibration now" in page and "0 tagged tracks" in page
    add_tracks(library, random_means(12))
    response = admin_client.post(reverse("admin:workers_calibration_compute"), follow=True)
    row = Calibration.objects.get()
    assert f"New calibration {row.version} over 12 tracks" in response.content.decode()
    assert calibrated.current_pointer()["version"] == row.version
    detail = admin_client.get(reverse("admin:workers_calibration_change", args=[row.id])).content.decode()
    assert detail.count("<svg xmlns") >= 100 and detail.count("aria-label=\"mtt:") == 50 and "p95" in detail
    export = admin_client.post(changelist, {"action": "export_json", "_selected_action": [row.id]})
    assert export["Content-Type"] == "application/json"
    assert json.loads(export.content)["version"] == row.version
    assert admin_client.get(reverse("admin:workers_calibration_compute")).status_code == 405
