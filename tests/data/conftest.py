"""Fixtures of the synthetic-world tests: a train split drawn once per module."""

from pathlib import Path

import pytest
from pycocotools.coco import COCO

from pixelllm.data.synthetic import generate


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A train split of the test module's ``IMAGES`` images drawn with its ``SEED``, one worker."""
    out = tmp_path_factory.mktemp("shapes") / "train"
    generate(out, request.module.IMAGES, request.module.SEED, "train", workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def coco(world: Path) -> COCO:
    """The split's COCO instances."""
    return COCO(str(world / "refcoco" / "instances.json"))
