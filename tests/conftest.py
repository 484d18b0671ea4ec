"""Shared test fixtures."""

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parent / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real public data (see tests/fixtures/real/README.md for sources and licenses)."""
    return REAL_DATA


def pytest_configure(config):
    """One torch thread per test process: ``pytest -n 2`` already fills both cores, and two
    processes of two spinning OpenMP threads each run many times slower than one thread each."""
    import torch

    torch.set_num_threads(1)
