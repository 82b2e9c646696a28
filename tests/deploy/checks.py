"""Checks shared by the deployment tests: settings written in deployment files, and the image's user."""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

from server.settings import Settings

PREFIX = "TRACEHEAD_"
DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def setting_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def assert_settings_env(environment: dict[str, str]) -> Settings:
    """Assert that each TRACEHEAD_* name is a setting and that the values load; return the settings.

    A misspelt name would be ignored by the server without a word, so it fails here.
    """
    names = {name for name in environment if name.startswith(PREFIX)}
    unknown = names - setting_names()
    assert not unknown, f"not settings of server/settings.py: {sorted(unknown)}"
    values = {name: str(environment[name]) for name in names}
    # Settings read the process environment, as in a container; nothing else of ours may leak in.
    clean = {name: value for name, value in os.environ.items() if not name.startswith(PREFIX)}
    with mock.patch.dict(os.environ, clean | values, clear=True):
        return Settings()


def image_uid() -> int:
    """The numeric uid that the Dockerfile's runtime stage runs as."""
    match = re.search(r"^USER (\d+):\d+$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the Dockerfile sets no numeric USER uid:gid"
    return int(match.group(1))
