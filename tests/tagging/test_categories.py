"""The label table and ``build_tags``: every label mapped, synonyms merged,
contradictions resolved, thresholds sane, calibrations pluggable."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from workers.tagging import categories as cat
from workers.tagging.tagset import (
    TIERS,
    UNCALIBRATED,
    Calibration,
    TagSet,
    build_tags,
    format_version,
    score_key,
)

# musicnn 0.1.0, configuration.py, in output order (the source of truth).
MTT = [
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman",
    "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir", "voice",
    "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello", "no voice",
    "weird", "country", "metal", "female voice", "choral",
]
MSD = [
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill",
    "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic", "experimental",
    "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening", "sexy",
    "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop",
    "sad", "House", "happy",
]
MODELS = "MTT_musicnn@abcd1234+MSD_musicnn@ef567890"


def tags(scores, **kwargs) -> TagSet:
    return build_tags(scores, models=MODELS, **kwargs)


def at(label: str, factor: float) -> dict[str, float]:
    """A score ``factor`` times the label's default threshold."""
    return {label: cat.get_label(label).threshold * factor}


# ------------------------------------------------------------------ the table

def test_every_label_is_in_the_table_in_model_order():
    assert list(cat.MTT_TAGS) == MTT
    assert list(cat.MSD_TAGS) == MSD
    assert len(cat.LABELS) == 100
    assert list(cat.LABELS) == [f"mtt:{t}" for t in MTT] + [f"msd:{t}" for t in MSD]
    for model, names in (("mtt", MTT), ("msd", MSD)):
        for index, name in enumerate(names):
            label = cat.LABELS[f"{model}:{name}"]
            assert (label.model, label.name, label.index) == (model, name, index)
        assert cat.label_ids(model) == tuple(f"{model}:{n}" for n in names)


def test_categories_and_canonical_names_are_consistent():
    for label in cat.LABELS.values():
        assert label.category in (*cat.CATEGORIES, None)
        if label.category is None:
            assert label.canonical is None
        else:
            assert label.canonical == label.canonical.strip().lower() and label.canonical


@pytest.mark.parametrize("labels, category, value", [
    (["msd:female vocalists", "msd:female vocalist", "mtt:female", "mtt:woman",
      "mtt:female voice", "mtt:female vocal"], "vocals", "female"),
    (["mtt:male", "mtt:man", "mtt:male vocal", "mtt:male voice", "msd:male vocalists"], "vocals", "male"),
    (["mtt:no vocals", "mtt:no vocal", "mtt:no voice", "msd:instrumental"], "vocals", "instrumental"),
    (["mtt:vocal", "mtt:vocals", "mtt:singing", "mtt:voice"], "vocals", "vocals"),
    (["mtt:choir", "mtt:choral"], "vocals", "choir"),
    (["mtt:classical", "mtt:classic"], "genre", "classical"),
    (["mtt:rock", "msd:rock"], "genre", "rock"),
    (["mtt:electronic", "msd:electronic", "msd:electronica"], "genre", "electronic"),
    (["msd:chill", "msd:chillout"], "mood", "chill"),
    (["msd:00s"], "era", "2000s"),
    (["msd:80s"], "era", "1980s"),
    (["msd:Hip-Hop"], "genre", "hip hop"),
    (["msd:rnb"], "genre", "r&b"),
])
def test_synonyms_share_a_canonical_value(labels, category, value):
    for label in labels:
        assert (cat.LABELS[label].category, cat.LABELS[label].canonical) == (category, value)


def test_synonyms_merge_into_one_value_with_the_strongest_strength():
    scores = {}
    for label in ("mtt:female", "mtt:woman", "msd:female vocalists", "mtt:rock", "msd:rock"):
        scores.update(at(label, 1.2))
    scores.update(at("mtt:female vocal", 3.0))
    result = tags(scores)
    assert result.categories["vocals"] == ["female"]
    assert result.categories["genre"] == ["rock"]
    assert result.strengths["vocals"]["female"] == pytest.approx(1.5)


def test_vague_labels_are_never_written_as_tags():
    result = tags({**at("mtt:beat", 5), **at("mtt:solo", 5), **at("mtt:beats", 5)})
    assert all(values == [] for values in result.categories.values())


def test_opposing_groups_are_defined_on_real_values():
    for category, side_a, side_b in cat.OPPOSING:
        values = set(cat.canonical_values(category))
        assert side_a <= values and side_b <= values and not side_a & side_b


# --------------------------------------------------------- opposing groups

@pytest.mark.parametrize("strong, weak, category, kept, dropped", [
    ("mtt:no vocals", "mtt:vocals", "vocals", ["instrumental"], ["vocals"]),
    ("mtt:vocals", "msd:instrumental", "vocals", ["vocals"], ["instrumental"]),
    ("mtt:female", "mtt:male", "vocals", ["female"], ["male"]),
    ("mtt:male voice", "msd:female vocalists", "vocals", ["male"], ["female"]),
    ("mtt:fast", "mtt:slow", "mood", ["fast"], ["slow"]),
    ("mtt:slow", "mtt:fast", "mood", ["slow"], ["fast"]),
    ("mtt:loud", "mtt:quiet", "mood", ["loud"], ["quiet"]),
    ("mtt:soft", "mtt:loud", "mood", ["soft"], ["loud"]),
    ("msd:happy", "msd:sad", "mood", ["happy"], ["sad"]),
    ("msd:sad", "msd:happy", "mood", ["sad"], ["happy"]),
])
def test_opposing_groups_keep_the_stronger_side(strong, weak, category, kept, dropped):
    result = tags({**at(strong, 2.0), **at(weak, 1.5)})
    assert result.categories[category] == kept
    assert not set(dropped) & set(result.categories[category])


def test_instrumental_beating_vocals_drops_the_singers_too():
    scores = {**at("mtt:no vocals", 3.0), **at("mtt:male", 2.0), **at("mtt:vocals", 1.5),
              **at("mtt:choir", 1.2)}
    assert tags(scores).categories["vocals"] == ["instrumental"]


def test_both_loud_and_soft_sides_resolve_as_one_group():
    scores = {**at("mtt:loud", 1.4), **at("mtt:quiet", 1.2), **at("mtt:soft", 1.6)}
    assert tags(scores).categories["mood"] == ["soft", "quiet"]


def test_no_conflict_when_only_one_side_passes():
    scores = {**at("mtt:fast", 2.0), **at("mtt:slow", 0.5)}
    assert tags(scores).categories["mood"] == ["fast"]


# ---------------------------------------------------------------- thresholds

def test_default_thresholds_are_bounded_and_follow_label_frequency():
    for model in ("mtt", "msd"):
        thresholds = [cat.LABELS[i].threshold for i in cat.label_ids(model)]
        assert all(cat.FLOOR <= t <= cat.CAP for t in thresholds)
        assert thresholds == sorted(thresholds, reverse=True), "rarer labels never need more"
    assert cat.LABELS["mtt:guitar"].threshold > cat.LABELS["mtt:choral"].threshold


def test_threshold_is_the_regular_cutoff_when_uncalibrated():
    label = "msd:jazz"
    assert tags(at(label, 1.0)).categories["genre"] == ["jazz"]
    assert tags(at(label, 0.99)).categories["genre"] == []
    assert tags(at(label, 1.2), tier="strict").categories["genre"] == []
    assert tags(at(label, 1.6), tier="strict").categories["genre"] == ["jazz"]
    assert tags(at(label, 0.7), tier="loose").categories["genre"] == ["jazz"]


def test_values_are_ordered_strongest_first():
    scores = {**at("msd:jazz", 1.1), **at("msd:blues", 2.5), **at("msd:soul", 1.7)}
    assert tags(scores).categories["genre"] == ["blues", "soul", "jazz"]


# ------------------------------------------------------------------ TagSet

def test_minimal_and_full_modes():
    scores = {label: 0.123456 for label in cat.LABELS}
    minimal = tags(scores)
    assert minimal.scores is None and minimal.mode == "minimal"
    assert not any(k.startswith("score_") for k in minimal.fields())
    full = tags(scores, mode="full")
    assert full.scores is not None and len(full.scores) == 100
    assert set(full.scores.values()) == {0.123}
    fields = full.fields()
    assert fields["score_mtt_female_vocal"] == ["0.123"]
    assert fields["score_msd_hip_hop"] == ["0.123"]
    assert fields["version"] == [full.version]


def test_fields_leave_out_empty_categories():
    fields = tags(at("msd:jazz", 2)).fields()
    assert fields == {"genre": ["jazz"], "version": [f"earmark/1 models={MODELS} calibration=uncalibrated"]}


def test_score_keys_are_unique_and_legal_vorbis_field_names():
    keys = [score_key(label) for label in cat.LABELS]
    assert len(set(keys)) == 100
    for key in keys:
        field = "EARMARK_" + key.upper()
        assert all(0x20 <= ord(ch) <= 0x7D and ch != "=" for ch in field)
        assert key == key.lower() and " " not in key


def test_version_names_models_calibration_and_non_default_tier():
    assert tags({}).version == "earmark/1 models=MTT_musicnn@abcd1234+MSD_musicnn@ef567890 calibration=uncalibrated"
    assert format_version(["MTT_musicnn@1", "MSD_musicnn@2"], "lib-v3", "strict") == (
        "earmark/1 models=MTT_musicnn@1+MSD_musicnn@2 calibration=lib-v3 tier=strict"
    )
    with pytest.raises(ValueError):
        format_version("", "x")


class MinMax:
    """A p5/p95 min-max calibration, as the library calibration will be."""

    def __init__(self, version, stats):
        self.version = version
        self.stats = stats

    def scale(self, label, raw):
        p5, p95 = self.stats[label]
        return (raw - p5) / (p95 - p5)


def test_a_calibration_plugs_in_through_the_protocol():
    calibration = MinMax("lib1-v7", {"msd:jazz": (0.01, 0.05), "msd:blues": (0.2, 0.9)})
    assert isinstance(calibration, Calibration) and isinstance(UNCALIBRATED, Calibration)
    result = tags({"msd:jazz": 0.04, "msd:blues": 0.3}, calibration=calibration)
    assert result.categories["genre"] == ["jazz"]          # 0.75 passes, blues at 0.14 does not
    assert result.version.endswith("calibration=lib1-v7")
    assert TIERS["regular"] == 0.5


def test_bad_input_fails_loudly():
    with pytest.raises(KeyError, match="unknown label"):
        tags({"mtt:female vocals": 0.5})
    with pytest.raises(ValueError, match="finite"):
        tags({"mtt:rock": math.nan})
    with pytest.raises(ValueError, match="finite"):
        tags({"mtt:rock": 0.5}, spreads={"mtt:rock": math.inf})
    with pytest.raises(ValueError, match="mode"):
        tags({}, mode="everything")
    with pytest.raises(ValueError, match="tier"):
        tags({}, tier="medium")


def test_tagging_modules_never_import_torch():
    code = ("import sys, workers.tagging.tagset, workers.tagfiles.namespace, workers.tagfiles.safewrite; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
