"""The deployment configs: ``cluster.yaml`` (Ray cluster launcher) and
``deploy/kuberay-rayjob.yaml`` (KubeRay RayJob).

``cluster.yaml`` goes through the same offline steps as ``ray up`` before it
contacts a cloud: ``prepare_config`` (merge with the provider's defaults) and
``validate_config`` (Ray's JSON schema, ``ray/autoscaler/ray-schema.json``).
Network access is blocked while they run. Then the properties users rely on
are checked, and broken copies must fail each check.
"""
from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "kuberay-rayjob.yaml"
IMAGE = f"rayproject/ray:{ray.__version__}-gpu"


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (validation must stay offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError("config validation tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate_cluster(config: dict) -> dict:
    """What ``ray up`` does before the cloud provider's bootstrap; returns the merged config.

    The file itself is checked against the schema first: ``prepare_config``
    would crash with a TypeError on some malformed values (a string where a
    command list belongs) before Ray's own validation sees them.
    """
    validate_config(copy.deepcopy(config))
    merged = prepare_config(copy.deepcopy(config))
    validate_config(merged)
    return merged


# ----------------------------------------------------------------- cluster.yaml
def cluster_problems(config: dict) -> list[str]:
    """Properties of cluster.yaml that the README and users rely on; [] when all hold."""
    problems = []
    cfg = prepare_config(copy.deepcopy(config))  # as `ray up` sees it (defaults merged in)
    docker = cfg.get("docker") or {}
    images = {docker.get(k) for k in ("image", "head_image", "worker_image")} - {None}
    if images != {IMAGE}:
        problems.append(f"docker images {sorted(images)} != {IMAGE}")
    if any("ray-ml" in str(image) for image in images):
        problems.append("ray-ml images are discontinued")

    # Node types as written: prepare_config would fill a missing per-type
    # max_workers from the global one.
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    head = types.get(head_type, {})
    if head.get("max_workers") != 0:
        problems.append("head node type must have max_workers: 0")
    if set(head.get("resources", {})) - {"CPU"}:
        problems.append(f"head resources must be CPU only, got {head.get('resources')}")
    workers = {name: t for name, t in types.items() if name != head_type}
    gpu_workers = {name: t for name, t in workers.items() if t.get("resources", {}).get("GPU", 0) > 0}
    if not gpu_workers:
        problems.append("no GPU worker node type")
    if not any(t.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in gpu_workers.values()):
        problems.append("no spot GPU worker node type")
    if not isinstance(cfg.get("idle_timeout_minutes"), (int, float)) or cfg["idle_timeout_minutes"] <= 0:
        problems.append("idle_timeout_minutes must be set and > 0")
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0 (autoscale from zero)")
        if not isinstance(t.get("max_workers"), int) or t["max_workers"] < 1:
            problems.append(f"{name}: max_workers must be set and >= 1")
        if not isinstance(t.get("idle_timeout_s"), (int, float)) or t["idle_timeout_s"] <= 0:
            problems.append(f"{name}: idle_timeout_s must be set and > 0")
        if t.get("max_workers", 0) > cfg.get("max_workers", 0):
            problems.append(f"{name}: max_workers above the global max_workers")

    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    if "ray start --head" not in head_start:
        problems.append("head_start_ray_commands do not start a Ray head")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    if hosts != ["127.0.0.1"]:
        problems.append(f"dashboard must listen on 127.0.0.1 only, got --dashboard-host {hosts}")
    if "0.0.0.0" in head_start:
        problems.append("head_start_ray_commands bind something to 0.0.0.0")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if "RAY_AUTH_MODE=token" not in " ".join(cfg.get(key, [])):
            problems.append(f"{key}: Ray must start with RAY_AUTH_MODE=token")
    if "security_group" in cfg.get("provider", {}):
        problems.append("provider.security_group: keep Ray's default (no public ports)")
    if not any("pip install" in c and "fisher-ray" in c for c in cfg.get("setup_commands", [])):
        problems.append("setup_commands do not install the project")
    return problems


def test_cluster_yaml_validates_against_rays_schema(no_network):
    merged = validate_cluster(load_cluster())
    assert merged["provider"]["type"] == "aws"


def test_cluster_yaml_uses_the_schema_that_ray_ships():
    import json
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster(), schema)


def test_cluster_yaml_properties():
    assert cluster_problems(load_cluster()) == []


def test_cluster_yaml_image_matches_installed_ray():
    cfg = load_cluster()
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-gpu"
    # the pip line keeps Ray at the image's version
    assert any(f"=={ray.__version__}" in c for c in cfg["setup_commands"])


def test_cluster_yaml_mounts_the_repo_and_the_token():
    cfg = load_cluster()
    assert cfg["file_mounts"]["~/fisher-ray"] == "."
    assert cfg["file_mounts"]["~/ray_auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in cfg["rsync_filter"]          # .venv/ and runs/ stay behind


def _set(config, path, value):
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


SCHEMA_BREAKS = {
    "unknown top-level key": (("dashboard_port",), 8265),
    "string resource": (("available_node_types", "gpu_spot", "resources", "GPU"), "one"),
    "negative resource": (("available_node_types", "gpu_ondemand", "resources", "CPU"), -1),
    "unknown node-type key": (("available_node_types", "gpu_spot", "spot"), True),
    "max_workers not an integer": (("max_workers",), "8"),
    "commands not a list": (("setup_commands",), "pip install -e ."),
    "unknown docker key": (("docker", "gpus"), "all"),
}


@pytest.mark.parametrize("path,value", SCHEMA_BREAKS.values(), ids=SCHEMA_BREAKS.keys())
def test_schema_rejects_broken_copies(path, value, no_network):
    broken = load_cluster()
    _set(broken, path, value)
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster(broken)


def test_ray_rejects_head_type_missing_from_node_types(no_network):
    broken = load_cluster()
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster(broken)


def test_ray_rejects_min_workers_above_max_workers(no_network):
    broken = load_cluster()
    broken["available_node_types"]["gpu_ondemand"]["min_workers"] = 9
    with pytest.raises(ValueError, match="max_workers"):
        validate_cluster(broken)


def _drop(config, path):
    node = config
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


PROPERTY_BREAKS = {
    "public dashboard": (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")), "dashboard"),
    # without its own start commands the config inherits Ray's AWS defaults,
    # which start the dashboard with --dashboard-host=0.0.0.0
    "default start commands": (lambda c: _drop(c, ("head_start_ray_commands",)), "dashboard"),
    "workers always on": (lambda c: _set(c, ("available_node_types", "gpu_ondemand", "min_workers"), 1),
                          "min_workers"),
    "no worker max": (lambda c: _drop(c, ("available_node_types", "gpu_spot", "max_workers")), "max_workers"),
    "no idle timeout": (lambda c: _drop(c, ("available_node_types", "gpu_spot", "idle_timeout_s")),
                        "idle_timeout_s"),
    "other Ray version": (lambda c: _set(c, ("docker", "image"), "rayproject/ray:2.9.0-gpu"), "docker images"),
    "ray-ml image": (lambda c: _set(c, ("docker", "image"), f"rayproject/ray-ml:{ray.__version__}-gpu"),
                     "ray-ml"),
    "GPU head": (lambda c: _set(c, ("available_node_types", "head", "resources"), {"CPU": 8, "GPU": 1}),
                 "head resources"),
    "autoscaling head": (lambda c: _set(c, ("available_node_types", "head", "max_workers"), 2), "head node type"),
    "no spot": (lambda c: _drop(c, ("available_node_types", "gpu_spot", "node_config", "InstanceMarketOptions")),
                "spot"),
    "open security group": (lambda c: _set(c, ("provider", "security_group"),
                                           {"GroupName": "open", "IpPermissions": []}), "security_group"),
    "no auth": (lambda c: _set(c, ("worker_start_ray_commands",),
                               ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]), "RAY_AUTH_MODE"),
    "project not installed": (lambda c: _set(c, ("setup_commands",), []), "install the project"),
}


@pytest.mark.parametrize("mutate,expected", PROPERTY_BREAKS.values(), ids=PROPERTY_BREAKS.keys())
def test_property_checks_catch_broken_copies(mutate, expected):
    _assert_check_catches(load_cluster, cluster_problems, mutate, expected)


def _assert_check_catches(load, check, mutate, expected):
    """A fresh copy of a shipped config, broken by ``mutate``, must draw a problem naming ``expected``."""
    broken = load()
    mutate(broken)
    problems = check(broken)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------- deploy/kuberay-rayjob.yaml
def load_rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d is not None]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{RAYJOB_YAML}: expected one RayJob, found {len(jobs)}"
    return jobs[0]


def _get(obj, path: str):
    """``a.b[0].c`` lookup; raises KeyError naming the missing part."""
    node = obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                raise KeyError(f"{path}: no item {index}")
            node = node[index]
        else:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{path}: no field {part!r}")
            node = node[part]
    return node


RAYJOB_REQUIRED = [
    "apiVersion", "kind", "metadata.name", "spec.entrypoint",
    "spec.rayClusterSpec.rayVersion",
    "spec.rayClusterSpec.headGroupSpec.rayStartParams",
    "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image",
    "spec.rayClusterSpec.workerGroupSpecs",
]
WORKER_GROUP_REQUIRED = ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                         "template.spec.containers[0].image"]


def _exposed(service_type) -> bool:
    return service_type in ("LoadBalancer", "NodePort")


def rayjob_problems(doc: dict, all_docs: list[dict] | None = None) -> list[str]:
    """Fields KubeRay needs and properties users rely on; [] when all hold."""
    problems = []
    for path in RAYJOB_REQUIRED:
        try:
            _get(doc, path)
        except KeyError as e:
            problems.append(f"missing {e.args[0]}")
    if problems:
        return problems
    if doc["apiVersion"] != "ray.io/v1" or doc["kind"] != "RayJob":
        problems.append(f"not a ray.io/v1 RayJob: {doc['apiVersion']} {doc['kind']}")
    spec = doc["spec"]
    entry = spec["entrypoint"]
    for part in ("fisher run", "--preset mnist-paper", "--data ", "--out s3://"):
        if part not in entry:
            problems.append(f"entrypoint lacks {part!r}: {entry}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
        problems.append("ttlSecondsAfterFinished must be set (seconds)")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    if not any("fisher-ray" in str(p) for p in runtime_env.get("pip", [])) and "working_dir" not in runtime_env:
        problems.append("runtimeEnvYAML does not install the project (pip or working_dir)")

    cluster = spec["rayClusterSpec"]
    if cluster["rayVersion"] != ray.__version__:
        problems.append(f"rayVersion {cluster['rayVersion']} != {ray.__version__}")
    head = cluster["headGroupSpec"]
    images = [head["template"]["spec"]["containers"][0]["image"]]
    if _exposed(head.get("serviceType", "ClusterIP")):
        problems.append(f"head serviceType {head['serviceType']} exposes the dashboard")
    head_service = (head.get("headService") or {}).get("spec") or {}
    if _exposed(head_service.get("type")):
        problems.append(f"headService type {head_service['type']} exposes the dashboard")
    if head.get("enableIngress"):
        problems.append("enableIngress exposes the dashboard")
    groups = cluster["workerGroupSpecs"]
    if not isinstance(groups, list) or not groups:
        problems.append("workerGroupSpecs must be a non-empty list")
        groups = []
    for i, group in enumerate(groups):
        for path in WORKER_GROUP_REQUIRED:
            try:
                _get(group, path)
            except KeyError as e:
                problems.append(f"workerGroupSpecs[{i}]: missing {e.args[0]}")
        if any(p.startswith(f"workerGroupSpecs[{i}]") for p in problems):
            continue
        images.append(group["template"]["spec"]["containers"][0]["image"])
        if not 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"workerGroupSpecs[{i}]: need minReplicas <= replicas <= maxReplicas")
        if group["minReplicas"] != 0:
            problems.append(f"workerGroupSpecs[{i}]: minReplicas must be 0 (autoscale from zero)")
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) < 1:
            problems.append(f"workerGroupSpecs[{i}]: no nvidia.com/gpu limit")
    if set(images) != {IMAGE}:
        problems.append(f"images {sorted(set(images))} != {IMAGE}")
    for other in all_docs or []:
        if other.get("kind") == "Service" and _exposed(other.get("spec", {}).get("type")):
            problems.append(f"Service {other.get('metadata', {}).get('name')} is a {other['spec']['type']}")
        if other.get("kind") == "Ingress":
            problems.append("an Ingress exposes the cluster")
    return problems


def test_rayjob_parses_and_has_what_kuberay_needs():
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d is not None]
    assert rayjob_problems(load_rayjob(), docs) == []


def test_rayjob_worker_groups_autoscale_gpus():
    spec = load_rayjob()["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]


RAYJOB_BREAKS = {
    "no entrypoint": (lambda d: _drop(d, ("spec", "entrypoint")), "spec.entrypoint"),
    "no metadata name": (lambda d: _drop(d, ("metadata", "name")), "metadata.name"),
    "no head rayStartParams": (lambda d: _drop(d, ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams")),
                               "rayStartParams"),
    "no head image": (lambda d: _drop(d, ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec",
                                          "containers", 0, "image")), "image"),
    "no groupName": (lambda d: _drop(d, ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName")),
                     "groupName"),
    "no maxReplicas": (lambda d: _drop(d, ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas")),
                       "maxReplicas"),
    "no worker template": (lambda d: _drop(d, ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template")),
                           "template"),
    "LoadBalancer head": (lambda d: _set(d, ("spec", "rayClusterSpec", "headGroupSpec", "serviceType"),
                                         "LoadBalancer"), "serviceType"),
    "LoadBalancer headService": (lambda d: _set(d, ("spec", "rayClusterSpec", "headGroupSpec", "headService"),
                                                {"spec": {"type": "LoadBalancer"}}), "headService"),
    "ingress": (lambda d: _set(d, ("spec", "rayClusterSpec", "headGroupSpec", "enableIngress"), True),
                "enableIngress"),
    "no GPU limit": (lambda d: _drop(d, ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec",
                                         "containers", 0, "resources", "limits", "nvidia.com/gpu")), "nvidia.com/gpu"),
    "other Ray version": (lambda d: _set(d, ("spec", "rayClusterSpec", "rayVersion"), "2.9.0"), "rayVersion"),
    "kept running": (lambda d: _set(d, ("spec", "shutdownAfterJobFinishes"), False), "shutdownAfterJobFinishes"),
    "local output": (lambda d: _set(d, ("spec", "entrypoint"), "fisher run --preset mnist-paper --data x --out runs"),
                     "--out s3://"),
    "project not installed": (lambda d: _drop(d, ("spec", "runtimeEnvYAML")), "runtimeEnvYAML"),
}


@pytest.mark.parametrize("mutate,expected", RAYJOB_BREAKS.values(), ids=RAYJOB_BREAKS.keys())
def test_rayjob_checks_catch_broken_copies(mutate, expected):
    _assert_check_catches(load_rayjob, rayjob_problems, mutate, expected)


def test_rayjob_check_catches_a_loadbalancer_service_beside_the_job():
    job = load_rayjob()
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dashboard"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    assert any("LoadBalancer" in p for p in rayjob_problems(job, [job, service]))
