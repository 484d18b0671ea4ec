"""Fixtures of the server tests: the embedded default model, and one server on it."""

import pytest
from serve_helpers import running

import pixelllm


@pytest.fixture(scope="session")
def predictor():
    return pixelllm.load()


@pytest.fixture(scope="module")
def url(predictor):
    """A server with the default settings, shared by a module's tests."""
    with running(predictor) as address:
        yield address
