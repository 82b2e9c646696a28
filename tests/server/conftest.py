"""Fixtures of the server tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.base import is_model_dir_complete
from server.settings import Settings


@pytest.fixture(scope="module")
def default_model_path() -> str:
    path = Settings().model_path
    if not is_model_dir_complete(Path(path)):
        reason = f"default model not fetched to {path}; run `tracehead models fetch` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path
