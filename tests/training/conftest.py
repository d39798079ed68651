"""Training fixtures: a real tiny model trained on the photos the repository ships
(tests/data/photos) and converted to a real int8 bundle. Nothing outside the checkout is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PHOTOS
from tiny import train_and_convert


@pytest.fixture(scope="session")
def tiny_data() -> Path:
    return PHOTOS


@pytest.fixture(scope="session")
def tiny_bundle(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_convert(tiny_data, tmp_path_factory.mktemp("train"))
