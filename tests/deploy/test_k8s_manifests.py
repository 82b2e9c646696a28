"""deploy/k8s/: valid against the Kubernetes schemas, and consistent with the server's settings and each other."""

from __future__ import annotations

import copy
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from server.store import create_engine_for
from tests.deploy.checks import assert_settings_env, image_uid, setting_names
from tests.environment import find_tool

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
GPU_DIR = MANIFEST_DIR / "gpu"
# The oldest Kubernetes release that deploy/k8s/README.md supports. The newest schemas that
# kubernetes-validate ships are checked too, so a removed API version fails.
OLDEST_KUBERNETES = "1.30.0"
# The image runs as this uid and gid (USER in the Dockerfile).
IMAGE_UID = image_uid()
# PostgreSQL's defaults: max_connections is 100, and superuser_reserved_connections keeps 3 of them for
# superusers.
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_RESERVED_CONNECTIONS = 3
# Peak RSS of `tracehead serve` under 16 concurrent generations with float32 weights, measured for the
# Sizing section of deploy/k8s/README.md.
MEASURED_PEAK_RSS_BYTES = 1.62e9
SETTING_NAME = re.compile(r"\bTRACEHEAD_[A-Z0-9_]+\b")
MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def manifest_files() -> list[Path]:
    return sorted(MANIFEST_DIR.rglob("*.yaml"))


@cache
def documents(directory: Path) -> tuple[dict, ...]:
    """Every resource in the .yaml files directly inside ``directory``."""
    found: list[dict] = []
    for path in sorted(directory.glob("*.yaml")):
        found.extend(document for document in yaml.safe_load_all(path.read_text()) if document)
    return tuple(found)


def one(kind: str, directory: Path = MANIFEST_DIR) -> dict:
    matches = [document for document in documents(directory) if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in {directory}, found {len(matches)}"
    return matches[0]


def deployment(variant: str) -> dict:
    return one("Deployment", GPU_DIR if variant == "gpu" else MANIFEST_DIR)


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def container(resource: dict, name: str) -> dict:
    matches = [c for c in pod_spec(resource)["containers"] + pod_spec(resource).get("initContainers", [])
               if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r} in {resource['kind']} {resource['metadata']['name']}"
    return matches[0]


def all_containers(resource: dict) -> list[dict]:
    return pod_spec(resource).get("initContainers", []) + pod_spec(resource)["containers"]


def pod_resource(name: str) -> dict:
    """The resource with a pod template: the cpu or gpu Deployment, or the migration job."""
    return one("Job") if name == "job" else deployment(name)


def settings_env(variant: str) -> dict[str, str]:
    """The TRACEHEAD_* values that the server container of ``variant`` gets, except those from the Secret."""
    env = dict(one("ConfigMap")["data"])
    for entry in container(deployment(variant), "server").get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env


def memory_bytes(quantity: str) -> float:
    number = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity)
    assert number, f"unexpected memory quantity {quantity!r}"
    return float(number[1]) * MEMORY_UNITS.get(number[2] or "", 1)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_port(server: dict, port: int | str) -> int:
    """The number of ``port``, given by number or by the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in server["ports"] if p.get("name") == port]
    assert numbers, f"no container port named {port!r} in {server['ports']}"
    return numbers[0]


def prestop_sleep_s(server: dict) -> int:
    command = server.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if command is None:
        return 0
    assert command[0] == "sleep", f"unexpected preStop command {command}"
    assert len(command) == 2, f"unexpected preStop command {command}"
    return int(command[1])


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    return find_tool("kubernetes-validate", "install the dev extra: `.venv/bin/pip install -e '.[dev]'`")


def test_manifests_found():
    kinds = sorted(document["kind"] for document in documents(MANIFEST_DIR))
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "PodDisruptionBudget",
                     "Service", "ServiceAccount"]
    assert [document["kind"] for document in documents(GPU_DIR)] == ["Deployment"]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, None], ids=["oldest", "newest-shipped"])
def test_manifests_pass_kubernetes_validate(kubernetes_validate: str, version: str | None):
    files = [str(path) for path in manifest_files()]
    pinned = ["--kubernetes-version", version] if version else []
    result = subprocess.run([kubernetes_validate, "--strict", *pinned, *files],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr

    # kubernetes-validate 1.37 exits with 0 when it finds no schema for a kind or API version, and prints a WARN line.
    assert result.returncode == 0, output
    problems = [line for line in output.splitlines() if not line.startswith("INFO ")]
    assert problems == [], output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    resource_count = len(documents(MANIFEST_DIR)) + len(documents(GPU_DIR))
    assert len(passed) == resource_count, output


def test_setting_names_are_settings_fields():
    known = setting_names()
    for path in manifest_files():
        unknown = sorted(set(SETTING_NAME.findall(path.read_text())) - known)
        assert unknown == [], f"{path.name} names settings that server/settings.py does not define: {unknown}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_configmap_values_parse_under_settings(variant: str):
    settings = assert_settings_env(settings_env(variant))

    assert settings.mode == "production"
    assert settings.auth == "keys"
    assert settings.host == "0.0.0.0"
    assert settings.device == ("cuda" if variant == "gpu" else "cpu")
    assert settings.signing_key_file is not None


def test_service_link_variable_breaks_port():
    # What the kubelet would inject for the Service "tracehead" without enableServiceLinks: false.
    env = settings_env("cpu") | {"TRACEHEAD_PORT": "tcp://10.96.0.12:8000"}
    with pytest.raises(ValidationError, match="port"):
        assert_settings_env(env)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_use_health_routes(variant: str):
    settings = assert_settings_env(settings_env(variant))
    server = container(deployment(variant), "server")

    assert [p["containerPort"] for p in server["ports"]] == [settings.port]
    expected_paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected_paths.items():
        assert server[probe]["httpGet"]["path"] == path, probe
        assert container_port(server, server[probe]["httpGet"]["port"]) == settings.port, probe


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_termination_grace_exceeds_shutdown_grace(variant: str):
    settings = assert_settings_env(settings_env(variant))
    server = container(deployment(variant), "server")
    needed = settings.shutdown_grace_s + prestop_sleep_s(server)

    assert pod_spec(deployment(variant))["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_selector_and_rollout(variant: str):
    spec = deployment(variant)["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]

    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_deployment_replaces_cpu_one():
    cpu, gpu = deployment("cpu"), deployment("gpu")

    assert gpu["metadata"]["name"] == cpu["metadata"]["name"]
    assert gpu["spec"]["selector"] == cpu["spec"]["selector"]


def test_gpu_deployment_differs_only_for_gpu():
    def without_gpu_differences(resource: dict) -> dict:
        copied = copy.deepcopy(resource)
        spec = pod_spec(copied)
        spec.pop("tolerations", None)
        for container_spec in all_containers(copied):
            del container_spec["image"]
            del container_spec["resources"]
            container_spec["env"] = [e for e in container_spec.get("env", []) if e["name"] != "TRACEHEAD_DEVICE"]
        return copied

    assert without_gpu_differences(deployment("gpu")) == without_gpu_differences(deployment("cpu"))


def test_service_selects_server_pods():
    service = one("Service")
    server_deployment = deployment("cpu")
    pod_labels = server_deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = one("Job")["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not service["spec"]["selector"].items() <= job_labels.items(), "the Service would select the Job's pod"
    for port in service["spec"]["ports"]:
        assert container_port(container(server_deployment, "server"), port["targetPort"]) == port["port"]


def test_pdb_selects_deployment_pods():
    pdb = one("PodDisruptionBudget")

    assert pdb["spec"]["selector"] == deployment("cpu")["spec"]["selector"]


def test_hpa_targets_deployment():
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]

    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment("cpu")["metadata"]["name"]}
    # The PodDisruptionBudget lets one pod go, so at least one more must keep serving.
    assert hpa["spec"]["minReplicas"] >= one("PodDisruptionBudget")["spec"]["maxUnavailable"] + 1


def test_hpa_maximum_fits_postgres_connections():
    engine = create_engine_for("postgresql+psycopg://tracehead@db.invalid/tracehead")
    try:
        # QueuePool has no public accessor for its limit on connections beyond its size.
        per_replica = engine.pool.size() + engine.pool._max_overflow
    finally:
        engine.dispose()
    max_replicas = one("HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    migration_job = 1

    assert max_replicas * per_replica + migration_job <= POSTGRES_MAX_CONNECTIONS - POSTGRES_RESERVED_CONNECTIONS


def test_job_runs_migrations_with_deployment_image():
    job_container = container(one("Job"), "migrate")
    server_image = container(deployment("cpu"), "server")["image"]

    assert job_container["image"] == server_image
    assert job_container["command"][-2:] == ["db", "upgrade"]
    assert pod_spec(one("Job"))["restartPolicy"] in ("Never", "OnFailure")


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_containers_share_one_image(variant: str):
    images = {c["name"]: c["image"] for c in all_containers(deployment(variant))}
    server_image = container(deployment("cpu"), "server")["image"]
    expected = server_image + "-cuda" if variant == "gpu" else server_image

    assert set(images.values()) == {expected}, images
    assert container(deployment(variant), "fetch-model")["command"][-2:] == ["models", "fetch"]


@pytest.mark.parametrize("name", ["cpu", "gpu", "job"])
def test_pods_run_locked_down(name: str):
    resource = pod_resource(name)
    spec = pod_spec(resource)

    assert spec.get("serviceAccountName") == one("ServiceAccount")["metadata"]["name"]
    assert spec.get("automountServiceAccountToken") is False
    # Otherwise the Service tracehead injects TRACEHEAD_PORT=tcp://..., see test_service_link_variable_breaks_port.
    assert spec.get("enableServiceLinks") is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert spec["securityContext"]["runAsGroup"] == IMAGE_UID
    for container_spec in all_containers(resource):
        context = container_spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container_spec["name"]
        assert context["readOnlyRootFilesystem"] is True, container_spec["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container_spec["name"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_writable_dirs_are_volumes(variant: str):
    settings = assert_settings_env(settings_env(variant))
    volumes = {volume["name"]: volume for volume in pod_spec(deployment(variant))["volumes"]}

    for name in ("server", "fetch-model"):
        mounts = {mount["mountPath"]: mount for mount in container(deployment(variant), name)["volumeMounts"]}
        for path in (str(settings.cache_dir), str(settings.data_dir), "/tmp"):
            assert path in mounts, f"{name} has no volume at {path}, and its root filesystem is read-only"
            assert not mounts[path].get("readOnly", False), f"{name} mounts {path} read-only"
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{name}: {path} is not an emptyDir"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_signing_key_comes_from_secret(variant: str):
    settings = assert_settings_env(settings_env(variant))
    key_file = settings.signing_key_file
    server = container(deployment(variant), "server")
    mounts = {mount["mountPath"]: mount for mount in server["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(deployment(variant))["volumes"]}

    mount = mounts[str(key_file.parent)]
    secret = volumes[mount["name"]]["secret"]
    assert mount["readOnly"] is True
    assert secret["secretName"] == "tracehead"
    assert {"key": key_file.name, "path": key_file.name} in secret["items"]


def test_secret_keys_match_readme():
    used: set[str] = set()
    for resource in map(pod_resource, ["cpu", "gpu", "job"]):
        for container_spec in all_containers(resource):
            for entry in container_spec.get("env", []):
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["name"] == "tracehead", entry["name"]
                    used.add(reference["key"])
        for volume in pod_spec(resource).get("volumes", []):
            if "secret" in volume:
                used.update(item["key"] for item in volume["secret"]["items"])
    readme = (MANIFEST_DIR / "README.md").read_text()
    created = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", readme))

    assert used == created, f"the manifests read Secret keys {sorted(used)}, README.md creates {sorted(created)}"


def test_gpu_deployment_requests_gpu():
    server = container(deployment("gpu"), "server")
    settings = assert_settings_env(settings_env("gpu"))

    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.device == "cuda"
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_taint in pod_spec(deployment("gpu"))["tolerations"]
    assert "nvidia.com/gpu" not in container(deployment("cpu"), "server")["resources"].get("limits", {})


def test_cpu_resources_fit_measured_use():
    settings = assert_settings_env(settings_env("cpu"))
    resources = container(deployment("cpu"), "server")["resources"]

    assert memory_bytes(resources["requests"]["memory"]) > MEASURED_PEAK_RSS_BYTES
    assert memory_bytes(resources["limits"]["memory"]) >= memory_bytes(resources["requests"]["memory"])
    assert settings.threads is not None, "torch would count the node's cores, not the pod's"
    assert settings.threads <= cpu_cores(resources["requests"]["cpu"])
