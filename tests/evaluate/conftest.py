"""Fixtures for the metric tests: one METEOR process for the whole session (Java start-up and the
paraphrase table take seconds)."""

import shutil

import pytest

from pixelllm.evaluate.captions import MeteorScorer


@pytest.fixture(scope="session")
def meteor():
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    with MeteorScorer() as scorer:
        yield scorer
