"""Shared test fixtures."""

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parent / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real public data (see tests/fixtures/real/README.md for sources and licenses)."""
    return REAL_DATA
