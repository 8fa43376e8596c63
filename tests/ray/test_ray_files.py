"""The Ray extra stays optional, and the Ray deployment files are what Ray, KubeRay and compose accept
(checked offline: no cluster, no Kubernetes, no Docker engine)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml  # the test extra: these checks need no Ray

from tests.tools import require_program

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
RAY_PIN = "ray[serve]==2.60.0"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "service"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_elgs_serve_without_ray_does_not_import_ray():
    """The parser with --ray, the app and its service objects load without importing Ray."""
    done = _python(
        "import sys, elgs.cli\n"
        "from elgs.api import Settings, create_app\n"
        "parser = elgs.cli.build_parser()\n"
        "args = parser.parse_args(['serve', '--models', 'efficientnet_lite0'])\n"
        "assert args.ray is False and args.replicas == 1\n"
        "create_app(Settings(models=['efficientnet_lite0']))\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_ray_is_an_optional_pinned_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dependency.startswith("ray") for dependency in project["dependencies"])
    assert project["optional-dependencies"]["ray"] == [RAY_PIN]
    assert ".[test,ray]" in (ROOT / "scripts" / "install.sh").read_text()


def test_installed_ray_is_the_pinned_version():
    ray = pytest.importorskip("ray")
    assert ray.__version__ == RAY_PIN.split("==")[1]


# Serve config ---------------------------------------------------------------------------------------

def _serve_config() -> dict:
    return yaml.safe_load((RAY_DIR / "serve.yaml").read_text())


def _check_serve_config(config: dict, *, gpus: float) -> None:
    """Ray's own schema accepts ``config``, and its builder makes the ingress plus one deployment per model."""
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from elgs.api.ray import INGRESS_NAME, ModelReplica, app_builder, model_deployment_name

    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "elgs.api.ray:app_builder"
    assert application["route_prefix"] == "/"
    args = application["args"]
    ingress = app_builder(args)._bound_deployment
    assert ingress.name == INGRESS_NAME
    assert ingress.num_replicas == args["ingress_replicas"]
    assert ingress.ray_actor_options.get("num_gpus", 0) == 0
    settings, models = ingress.init_args
    assert list(models) == settings.models == args["models"].split(",")
    for name, bound in models.items():
        deployment = bound._bound_deployment
        assert deployment.func_or_class is ModelReplica
        assert deployment.name == model_deployment_name(name)
        assert deployment.num_replicas == args["replicas"]
        assert deployment.ray_actor_options["num_gpus"] == gpus
        assert deployment.max_queued_requests == settings.max_queue
        assert deployment.init_args[1] == name


def test_serve_config_builds_the_app():
    _check_serve_config(_serve_config(), gpus=0)


def test_app_builder_rejects_bad_options():
    pytest.importorskip("ray.serve")
    from elgs.api.ray import app_builder

    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"):
        app_builder({"replicas": 0, "models": "efficientnet_lite0"})


# KubeRay --------------------------------------------------------------------------------------------

# Fields of the KubeRay v1 API (ray.io/v1; docs/reference/api.md of ray-project/kuberay): the manifest
# may use these and no others. The CRD itself and a cluster were not available here.
RAYSERVICE_SPEC = {"rayClusterDeletionDelaySeconds", "serveService", "upgradeStrategy", "managedBy",
                   "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc"}
RAYCLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                   "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources",
                "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((RAY_DIR / "rayservice.yaml").read_text())


def test_rayservice_fields_match_the_crd(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    spec = rayservice["spec"]
    assert set(spec) <= RAYSERVICE_SPEC and {"serveConfigV2", "rayClusterConfig"} <= set(spec)
    assert isinstance(spec["serveConfigV2"], str)  # the CRD wants the Serve config as a YAML string
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC
    assert cluster["rayVersion"] == RAY_PIN.split("==")[1]
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in groups:
        assert all(isinstance(value, str) for value in group.get("rayStartParams", {}).values())
        containers = group["template"]["spec"]["containers"]
        assert containers and all(container["name"] and container["image"] for container in containers)


def test_rayservice_gives_each_model_replica_one_gpu(rayservice):
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    _check_serve_config(serve_config, gpus=1)
    args = serve_config["applications"][0]["args"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpu_pods = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == 1 and group["rayStartParams"]["num-gpus"] == "1"
        gpu_pods += group["replicas"]
    assert gpu_pods == len(args["models"].split(",")) * args["replicas"] * args["model_num_gpus"]


# docker compose -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((RAY_DIR / "docker-compose.yml").read_text())


def test_compose_runs_a_head_and_workers_from_the_image_with_the_extra(compose):
    """The base file runs on a CPU host (no GPU reservation); docker-compose.gpu.yml adds one GPU per worker."""
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert head["build"]["args"]["EXTRAS"] == "ray" and head["image"] == worker["image"]
    assert (RAY_DIR / head["build"]["context"]).resolve() == ROOT
    assert 'ARG EXTRAS=""' in (ROOT / "Dockerfile").read_text()
    assert "elgs serve --ray --ray-address auto --host 0.0.0.0 --port 8000" in " ".join(head["command"].split())
    assert any(port.endswith(":8000") for port in head["ports"])
    assert "--address=ray-head:6379" in " ".join(worker["command"])
    assert "deploy" not in worker and "deploy" not in head
    gpu = yaml.safe_load((RAY_DIR / "docker-compose.gpu.yml").read_text())["services"]
    (device,) = gpu["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert gpu["ray-worker"]["environment"]["RAY_WORKER_GPUS"] == "1"
    assert gpu["ray-head"]["environment"]["ELGS_RAY_NUM_GPUS"] == "${ELGS_RAY_NUM_GPUS:-1}"
    for service in (head, worker):
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["stop_grace_period"] == "45s"


def test_docker_compose_config_is_valid():
    """docker-compose itself accepts the CPU file with the GPU override (skipped without it, failed under CI)."""
    docker_compose = require_program("docker-compose", install="apt-get install docker-compose")
    command = [docker_compose, "-f", str(RAY_DIR / "docker-compose.yml"), "-f", str(RAY_DIR / "docker-compose.gpu.yml"),
               "config", "-q"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_TOKEN"}
    done = subprocess.run(command, env={**env, "RAY_AUTH_TOKEN": "secret"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Without a shared token the file refuses to start a cluster.
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "RAY_AUTH_TOKEN" in done.stderr
