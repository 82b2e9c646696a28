"""deploy/compose.yaml: what it wires together holds up against the settings and the gateway config.

No container engine with compose runs here; the image and the gateway are each
run for real in test_image.py and test_gateway.py. This checks the file that
joins them.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.checks import assert_settings_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load((DEPLOY / "gateway" / "envoy.yaml").read_text())


def test_every_tracehead_variable_is_a_valid_setting(compose):
    for name in ("migrate", "tracehead"):
        environment = dict(compose["services"][name]["environment"])
        environment["TRACEHEAD_DATABASE_URL"] = "postgresql+psycopg://tracehead:secret@postgres:5432/tracehead"
        assert_settings_env(environment)


def test_images_build_from_the_repo_dockerfile(compose):
    for name in ("migrate", "tracehead"):
        build = compose["services"][name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY.parent / "Dockerfile"
    assert compose["services"]["migrate"]["command"] == ["db", "upgrade"]


def test_gateway_is_sole_published_port_and_trusted_proxy(compose):
    services = compose["services"]
    assert [name for name, service in services.items() if "ports" in service] == ["gateway"]

    gateway_address = ipaddress.ip_address(services["gateway"]["networks"]["backend"]["ipv4_address"])
    subnet = ipaddress.ip_network(compose["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    trusted = json.loads(services["tracehead"]["environment"]["TRACEHEAD_TRUSTED_PROXIES"])
    assert gateway_address in subnet
    assert [ipaddress.ip_address(address) for address in trusted] == [gateway_address]


def test_gateway_mounts_repo_config_and_reaches_tracehead(compose, envoy):
    gateway = compose["services"]["gateway"]
    source, target = gateway["volumes"][0].split(":")[:2]
    assert (DEPLOY / source).resolve() == DEPLOY / "gateway" / "envoy.yaml"
    assert target in gateway["command"]

    [cluster] = envoy["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint["address"] in compose["services"]
    assert endpoint["port_value"] == 8000  # the image's TRACEHEAD_PORT
    listener_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert gateway["ports"] == [f"{listener_port}:{listener_port}"]


def test_stop_grace_period_exceeds_shutdown_grace(compose):
    tracehead = compose["services"]["tracehead"]
    grace_s = int(tracehead["environment"]["TRACEHEAD_SHUTDOWN_GRACE_S"])
    assert int(tracehead["stop_grace_period"].removesuffix("s")) > grace_s
