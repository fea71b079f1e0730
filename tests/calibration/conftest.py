"""Shared by the calibration tests."""
import pytest

from workers.calibration import auto
from workers.tagging import calibrated


@pytest.fixture(autouse=True)
def fresh_cache():
    """``current()`` and the auto trigger's clock are per process: never let one test see another's."""
    calibrated.reset_cache()
    auto.reset()
    yield
    calibrated.reset_cache()
    auto.reset()
