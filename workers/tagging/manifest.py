"""What models are installed, read from ``manifest.json`` without importing torch.

The scanner and recalibrator need the current model version (to decide what
is due for tagging) but must never load torch; ``install_models`` writes this
manifest beside the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings

DEFAULT_MODELS = ("MTT_musicnn", "MSD_musicnn")


def manifest_path(models_dir: Path | None = None) -> Path:
    return Path(models_dir or settings.EARMARK_MODELS_DIR) / "manifest.json"


def read_manifest(models_dir: Path | None = None) -> dict | None:
    try:
        return json.loads(manifest_path(models_dir).read_text())
    except (OSError, ValueError):
        return None


def current_model_version(models_dir: Path | None = None, names=DEFAULT_MODELS) -> str | None:
    """``MTT_musicnn@ab12cd34+MSD_musicnn@ef56ab78``, or None before ``install_models``."""
    manifest = read_manifest(models_dir)
    if not manifest:
        return None
    models = manifest.get("models", {})
    if not all(n in models for n in names):
        return None
    return "+".join(models[n]["version"] for n in names)
