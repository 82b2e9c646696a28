"""What the tests need from the machine, and what a missing piece does: a skip here, a failure in CI."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``; under CI (the CI variable set), fail with it instead.

    CI installs everything the tests use, so a missing piece there is a broken
    setup, never a reason to pass quietly.
    """
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def find_tool(name: str, install_hint: str) -> str:
    """Path of the executable ``name``, looked up beside this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} not found beside {sys.executable} or on PATH; {install_hint}")
    return path
