"""What each of the 100 musicnn labels means as a tag, in one table.

The two pretrained musicnn networks each emit 50 sigmoid outputs: ``MTT_musicnn``
the MagnaTagATune tags, ``MSD_musicnn`` the Last.fm tags of the Million Song
Dataset (label lists from ``musicnn/configuration.py`` in the 0.1.0 wheel, in
output order). Across the two, many labels say the same thing ("female",
"woman", "female vocalists"...), some say nothing a playlist can use ("beat",
"solo"), and some contradict each other ("fast"/"slow"). This module is the
single place that decides, for every label:

* its **category** (genre, mood, instrument, vocals, era) or ``None`` when it
  is too vague to write as a tag (its score is still stored, and written in
  full mode);
* its **canonical name**, the value written into files: synonyms share one
  name so that a file gets "rock" once, however many labels voted for it;
* its **default threshold** on the raw sigmoid output, used until the library
  has a calibration (see ``default_threshold``).

``OPPOSING`` lists the canonical values that cannot both be true of a track;
``tagset.build_tags`` keeps the stronger side.

Label identifiers are ``"<model>:<name>"`` with the model's tag name verbatim
(``"msd:Hip-Hop"``, ``"mtt:no vocals"``), so that they match the networks'
outputs one to one. Pure data and arithmetic: no torch, no Django.
"""
from __future__ import annotations

from dataclasses import dataclass

GENRE = "genre"
MOOD = "mood"
INSTRUMENT = "instrument"
VOCALS = "vocals"
ERA = "era"

#: The categories, in the order tags are written and shown.
CATEGORIES: tuple[str, ...] = (GENRE, MOOD, INSTRUMENT, VOCALS, ERA)

# ---------------------------------------------------------------------------
# The table. One row per network output, in each network's output order
# (which is also the order of tag frequency in its training set: both label
# lists were made by taking the 50 most frequent tags).
#
#   label                         category     canonical name
# ---------------------------------------------------------------------------
_MTT_ROWS: tuple[tuple[str, str | None, str | None], ...] = (
    ("guitar",                    INSTRUMENT,  "guitar"),
    ("classical",                 GENRE,       "classical"),
    ("slow",                      MOOD,        "slow"),
    ("techno",                    GENRE,       "techno"),
    ("strings",                   INSTRUMENT,  "strings"),
    ("drums",                     INSTRUMENT,  "drums"),
    ("electronic",                GENRE,       "electronic"),
    ("rock",                      GENRE,       "rock"),
    ("fast",                      MOOD,        "fast"),
    ("piano",                     INSTRUMENT,  "piano"),
    ("ambient",                   GENRE,       "ambient"),
    ("beat",                      None,        None),          # "has a beat": says nothing
    ("violin",                    INSTRUMENT,  "violin"),
    ("vocal",                     VOCALS,      "vocals"),
    ("synth",                     INSTRUMENT,  "synth"),
    ("female",                    VOCALS,      "female"),
    ("indian",                    GENRE,       "indian"),
    ("opera",                     GENRE,       "opera"),
    ("male",                      VOCALS,      "male"),
    ("singing",                   VOCALS,      "vocals"),
    ("vocals",                    VOCALS,      "vocals"),
    ("no vocals",                 VOCALS,      "instrumental"),
    ("harpsichord",               INSTRUMENT,  "harpsichord"),
    ("loud",                      MOOD,        "loud"),
    ("quiet",                     MOOD,        "quiet"),
    ("flute",                     INSTRUMENT,  "flute"),
    ("woman",                     VOCALS,      "female"),
    ("male vocal",                VOCALS,      "male"),
    ("no vocal",                  VOCALS,      "instrumental"),
    ("pop",                       GENRE,       "pop"),
    ("soft",                      MOOD,        "soft"),
    ("sitar",                     INSTRUMENT,  "sitar"),
    ("solo",                      None,        None),          # solo what? ambiguous
    ("man",                       VOCALS,      "male"),
    ("classic",                   GENRE,       "classical"),   # MTT's "classic" is classical music
    ("choir",                     VOCALS,      "choir"),
    ("voice",                     VOCALS,      "vocals"),
    ("new age",                   GENRE,       "new age"),
    ("dance",                     GENRE,       "dance"),
    ("male voice",                VOCALS,      "male"),
    ("female vocal",              VOCALS,      "female"),
    ("beats",                     None,        None),          # as "beat"
    ("harp",                      INSTRUMENT,  "harp"),
    ("cello",                     INSTRUMENT,  "cello"),
    ("no voice",                  VOCALS,      "instrumental"),
    ("weird",                     MOOD,        "weird"),
    ("country",                   GENRE,       "country"),
    ("metal",                     GENRE,       "metal"),
    ("female voice",              VOCALS,      "female"),
    ("choral",                    VOCALS,      "choir"),
)

_MSD_ROWS: tuple[tuple[str, str | None, str | None], ...] = (
    ("rock",                      GENRE,       "rock"),
    ("pop",                       GENRE,       "pop"),
    ("alternative",               GENRE,       "alternative"),
    ("indie",                     GENRE,       "indie"),
    ("electronic",                GENRE,       "electronic"),
    ("female vocalists",          VOCALS,      "female"),
    ("dance",                     GENRE,       "dance"),
    ("00s",                       ERA,         "2000s"),
    ("alternative rock",          GENRE,       "alternative rock"),
    ("jazz",                      GENRE,       "jazz"),
    ("beautiful",                 MOOD,        "beautiful"),
    ("metal",                     GENRE,       "metal"),
    ("chillout",                  MOOD,        "chill"),
    ("male vocalists",            VOCALS,      "male"),
    ("classic rock",              GENRE,       "classic rock"),
    ("soul",                      GENRE,       "soul"),
    ("indie rock",                GENRE,       "indie rock"),
    ("Mellow",                    MOOD,        "mellow"),
    ("electronica",               GENRE,       "electronic"),  # players file both under one shelf
    ("80s",                       ERA,         "1980s"),
    ("folk",                      GENRE,       "folk"),
    ("90s",                       ERA,         "1990s"),
    ("chill",                     MOOD,        "chill"),
    ("instrumental",              VOCALS,      "instrumental"),
    ("punk",                      GENRE,       "punk"),
    ("oldies",                    ERA,         "oldies"),
    ("blues",                     GENRE,       "blues"),
    ("hard rock",                 GENRE,       "hard rock"),
    ("ambient",                   GENRE,       "ambient"),
    ("acoustic",                  INSTRUMENT,  "acoustic"),
    ("experimental",              GENRE,       "experimental"),
    ("female vocalist",           VOCALS,      "female"),
    ("guitar",                    INSTRUMENT,  "guitar"),
    ("Hip-Hop",                   GENRE,       "hip hop"),
    ("70s",                       ERA,         "1970s"),
    ("party",                     MOOD,        "party"),
    ("country",                   GENRE,       "country"),
    ("easy listening",            GENRE,       "easy listening"),
    ("sexy",                      MOOD,        "sexy"),
    ("catchy",                    MOOD,        "catchy"),
    ("funk",                      GENRE,       "funk"),
    ("electro",                   GENRE,       "electro"),     # a distinct style, not "electronic"
    ("heavy metal",               GENRE,       "heavy metal"),
    ("Progressive rock",          GENRE,       "progressive rock"),
    ("60s",                       ERA,         "1960s"),
    ("rnb",                       GENRE,       "r&b"),
    ("indie pop",                 GENRE,       "indie pop"),
    ("sad",                       MOOD,        "sad"),
    ("House",                     GENRE,       "house"),
    ("happy",                     MOOD,        "happy"),
)

#: Values that cannot both describe one track. Each pair is (side A, side B)
#: of canonical values within one category; when both sides have a value
#: above threshold, the side with the weaker best value is dropped whole
#: (instrumental beating vocals also drops "male", "female" and "choir").
#: Groups are resolved in this order.
OPPOSING: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = (
    (VOCALS, frozenset({"vocals", "male", "female", "choir"}), frozenset({"instrumental"})),
    (VOCALS, frozenset({"male"}), frozenset({"female"})),
    (MOOD, frozenset({"fast"}), frozenset({"slow"})),
    (MOOD, frozenset({"loud"}), frozenset({"quiet", "soft"})),
    (MOOD, frozenset({"happy"}), frozenset({"sad"})),
)

# ---------------------------------------------------------------------------
# Default thresholds (uncalibrated case).
#
# A network trained with binary cross-entropy outputs roughly P(tag | audio),
# so a tag's outputs hover around its prevalence in the training set: for
# rare tags ("choral", "happy") a clearly positive track often scores 0.1-0.3
# and almost never 0.5, while a common tag ("guitar", "rock") sits near 0.2
# on tracks that merely could have it. One global cut-off (0.5) would
# therefore never fire rare tags and fire common ones too eagerly.
#
# Instead a label fires when the network rates it LIFT times more likely than
# for a random training track: threshold = LIFT × prevalence, kept within
# [FLOOR, CAP]. The floor stops rare tags firing on noise (typical outputs of
# an absent rare tag are 0.001-0.01); the cap keeps very common tags
# reachable. Prevalence is estimated from the label's rank, because both lists
# are sorted by frequency: it falls geometrically from the head to the tail
# (MTT: guitar ~19% of clips down to choral ~3%; MSD: rock ~20% of tracks
# down to happy ~2%). Only the order is exact; the magnitudes are
# approximations and only seed the uncalibrated case, which a library
# calibration (per-label p5/p95 over the user's own music) replaces.
# ---------------------------------------------------------------------------
LIFT = 2.0
FLOOR = 0.10
CAP = 0.40
_PREVALENCE_RANGE = {"mtt": (0.19, 0.028), "msd": (0.20, 0.02)}


@dataclass(frozen=True)
class Label:
    """One network output and what it means as a tag."""

    id: str                 # "mtt:female vocal"
    model: str              # "mtt" or "msd"
    name: str               # the model's own tag name, verbatim
    index: int              # position in the model's output vector
    category: str | None    # one of CATEGORIES, or None: score only
    canonical: str | None   # the value written into files
    threshold: float        # default cut-off on the raw sigmoid output


def default_threshold(model: str, index: int, count: int = 50) -> float:
    """The uncalibrated cut-off for the label at ``index`` of ``model``.

    See the comment block above for the reasoning; rounded to 3 decimals so
    that the table reads cleanly and stays stable across platforms.
    """
    head, tail = _PREVALENCE_RANGE[model]
    prevalence = head * (tail / head) ** (index / (count - 1))
    return round(min(CAP, max(FLOOR, LIFT * prevalence)), 3)


def _build(model: str, rows) -> dict[str, Label]:
    """Turn one model's rows into ``Label`` records keyed by label id."""
    labels = {}
    for index, (name, category, canonical) in enumerate(rows):
        if (category is None) != (canonical is None):
            raise ValueError(f"{model}:{name}: category and canonical name go together")
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"{model}:{name}: unknown category {category!r}")
        label = Label(f"{model}:{name}", model, name, index, category, canonical,
                      default_threshold(model, index, len(rows)))
        labels[label.id] = label
    return labels


#: The model's own tag names, in output order (what a network port indexes by).
MTT_TAGS: tuple[str, ...] = tuple(row[0] for row in _MTT_ROWS)
MSD_TAGS: tuple[str, ...] = tuple(row[0] for row in _MSD_ROWS)
MODEL_TAGS: dict[str, tuple[str, ...]] = {"mtt": MTT_TAGS, "msd": MSD_TAGS}

#: Every label, keyed by id ("mtt:guitar"), MTT first, each in output order.
LABELS: dict[str, Label] = {**_build("mtt", _MTT_ROWS), **_build("msd", _MSD_ROWS)}


def label_ids(model: str) -> tuple[str, ...]:
    """The label ids of one model ("mtt" or "msd") in output order."""
    return tuple(f"{model}:{name}" for name in MODEL_TAGS[model])


def get_label(label_id: str) -> Label:
    """The ``Label`` for an id, or a KeyError that says what ids look like."""
    try:
        return LABELS[label_id]
    except KeyError:
        raise KeyError(
            f"unknown label {label_id!r}: expected 'mtt:<tag>' or 'msd:<tag>' "
            "with the model's tag name verbatim (e.g. 'msd:Hip-Hop')"
        ) from None


def canonical_values(category: str) -> tuple[str, ...]:
    """Every value a category can take, in table order, without repeats."""
    seen: dict[str, None] = {}
    for label in LABELS.values():
        if label.category == category:
            seen.setdefault(label.canonical, None)
    return tuple(seen)
