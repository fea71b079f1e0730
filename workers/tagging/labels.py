"""The tag vocabularies of the musicnn networks, read from the installed labels.json.

``install_models`` copies the two lists out of ``musicnn/configuration.py`` in
the wheel, in the order of the networks' 50 outputs, so the names always match
the weights they were installed with. The tagger's combined 100-score vector is
MTT's 50 outputs then MSD's 50, named ``mtt:<tag>`` and ``msd:<tag>`` because the
two vocabularies overlap ("rock", "guitar", "female vocalists" vs "female vocal").
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

LABELS_FILE = "labels.json"
DATASETS = ("mtt", "msd")  # key in labels.json, also the prefix in combined names


def default_models_dir() -> Path:
    """``settings.EARMARK_MODELS_DIR``, read late so tests can override it."""
    from django.conf import settings

    return Path(settings.EARMARK_MODELS_DIR)


def dataset_of(model_name: str) -> str:
    """``MTT_musicnn`` -> ``mtt``: which vocabulary a checkpoint's outputs use."""
    dataset = model_name.split("_", 1)[0].lower()
    if dataset not in DATASETS:
        raise ValueError(f"unknown musicnn model {model_name!r}")
    return dataset


@lru_cache(maxsize=16)
def _read(path: Path, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """Parse and validate labels.json; cached per file version (path, mtime)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    labels = {}
    for dataset in DATASETS:
        names = data.get(dataset)
        if not isinstance(names, list) or len(names) != 50 or len(set(names)) != 50:
            raise ValueError(f"{path}: {dataset!r} must list 50 distinct tags")
        labels[dataset] = tuple(str(n) for n in names)
    return labels


def load_labels(models_dir: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """{"mtt": 50 tags, "msd": 50 tags} from ``<models_dir>/labels.json``."""
    path = Path(models_dir or default_models_dir()) / LABELS_FILE
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `manage.py install_models` first") from None
    return _read(path, mtime)


def mtt_labels(models_dir: str | Path | None = None) -> list[str]:
    """The 50 MagnaTagATune tags, in MTT network output order."""
    return list(load_labels(models_dir)["mtt"])


def msd_labels(models_dir: str | Path | None = None) -> list[str]:
    """The 50 Million Song Dataset (Last.fm) tags, in MSD network output order."""
    return list(load_labels(models_dir)["msd"])


def labels_for(model_name: str, models_dir: str | Path | None = None) -> list[str]:
    """The output names of one network, e.g. ``labels_for("MSD_vgg")``."""
    return list(load_labels(models_dir)[dataset_of(model_name)])


def combined_labels(models_dir: str | Path | None = None) -> list[str]:
    """The 100 names of the MTT+MSD score vector: ``mtt:<tag>`` x 50, then ``msd:<tag>`` x 50."""
    labels = load_labels(models_dir)
    return [f"{dataset}:{tag}" for dataset in DATASETS for tag in labels[dataset]]
