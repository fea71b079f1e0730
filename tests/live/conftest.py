"""Fixtures the admin tests share."""
import pytest
from django.core.cache import cache

from workers.library.libraries import add_library


@pytest.fixture(autouse=True)
def _fresh_counts():
    """The sidebar's counts are cached for a minute; every test starts without them."""
    cache.clear()


@pytest.fixture
def library(tmp_path):
    """An empty library "music" (a module needing files in it defines its own)."""
    (tmp_path / "music").mkdir()
    return add_library("music", str(tmp_path / "music"))
