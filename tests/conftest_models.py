"""pytest plugin: the musicnn wheel and converted models, made once per session.

Register with ``pytest_plugins = ["tests.conftest_models"]`` in tests/conftest.py.

* ``musicnn_wheel``: path to the verified musicnn 0.1.0 wheel. Downloaded with
  ``pip download --no-deps`` the first time only, into ``$EARMARK_WHEEL_CACHE``
  or ``<project>/var/cache/wheels`` (outside any per-test data dir, so later
  sessions reuse it without network).
* ``installed_models_dir``: a temporary models dir populated by
  ``install_models`` from that wheel; treat it as read-only.
* ``musicnn_pair``: a CPU :class:`~workers.tagging.loading.MusicnnPair` on it.
"""
import os
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "musicnn_parity"


def wheel_cache_dir() -> Path:
    """The persistent wheel cache tests use."""
    return Path(os.environ.get("EARMARK_WHEEL_CACHE") or PROJECT_DIR / "var" / "cache" / "wheels")


@pytest.fixture(scope="session")
def musicnn_wheel() -> Path:
    from workers.tagging.install import InstallError, download_wheel

    try:
        return download_wheel(wheel_cache_dir())
    except InstallError as exc:
        pytest.fail(f"the musicnn wheel is needed for these tests and could not be obtained: {exc}")


@pytest.fixture(scope="session")
def installed_models_dir(musicnn_wheel, tmp_path_factory) -> Path:
    from workers.tagging.install import install_models

    models_dir = tmp_path_factory.mktemp("musicnn-models")
    install_models(models_dir=models_dir, wheel=musicnn_wheel)
    return models_dir


@pytest.fixture(scope="session")
def musicnn_pair(installed_models_dir):
    from workers.tagging.loading import MusicnnPair

    return MusicnnPair(device="cpu", models_dir=installed_models_dir)
