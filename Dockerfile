# elgs: the REST service (`elgs serve`, the default command) and the attack / defence CLI in one image.
#
#   docker build -t elgs .                              # bakes VGG16 + InceptionV3 weights (needs network at build)
#   docker build --build-arg FETCH_WEIGHTS=0 -t elgs .  # no weights baked: mount them or let them download
#   docker run --gpus all -p 8000:8000 --stop-timeout 45 elgs
#   docker run --gpus all -v "$PWD/data:/data" elgs elgs attack eval --data /data ...
#   docker build --build-arg EXTRAS=ray -t elgs:ray .   # with Ray Serve (deploy/ray/docker-compose.yml)
#   docker build --build-arg EXTRAS=bench -t elgs:research .  # with `elgs bench` and `attack eval --plot`
#
# Layers go from what changes least to what changes most: the base, Python, torch, elgs's dependencies,
# then the build args EXTRAS and FETCH_WEIGHTS and elgs itself. A build arg is declared just before the
# step that uses it, so another value of it rebuilds only the layers after it and never reinstalls torch.
#
# The base is CUDA's `-base` flavour, not `-runtime`: torch 2.14.1 from PyPI is built against CUDA 13.0
# (torch.version.cuda == "13.0") and its wheels bring their own CUDA libraries (cuBLAS, cuDNN, cuFFT, NCCL,
# ... under site-packages/nvidia), so `-runtime`'s copies of the same libraries would ship twice. `-base`
# keeps what the NVIDIA Container Toolkit reads (NVIDIA_REQUIRE_CUDA, NVIDIA_DRIVER_CAPABILITIES): the host
# needs an NVIDIA driver that supports CUDA 13.0 (>= 580), and a too old one is refused at `docker run`.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# HOME is a folder any uid may write: `docker run --user "$(id -u):$(id -g)"` (a uid without a passwd
# entry) keeps it, so matplotlib and ~/.config/elgs work instead of warning about `/.config`.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/elgs \
    TORCH_HOME=/var/lib/elgs/torch \
    MPLBACKEND=Agg \
    ELGS_MODELS=vgg16,inception_v3

# Ubuntu 24.04's python3 is 3.12; elgs needs >= 3.11. Versions float with the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: it is most of the image and changes least often.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

RUN groupadd --system --gid 10001 elgs \
    && useradd --system --uid 10001 --gid elgs --create-home --home-dir /home/elgs elgs \
    && chmod 1777 /home/elgs \
    && mkdir -p "$TORCH_HOME" /data /out \
    && chown -R elgs:elgs "$TORCH_HOME" /data /out

WORKDIR /opt/elgs
# elgs's runtime dependencies (pyproject.toml's [project] dependencies), so a change of the code alone
# reinstalls only elgs itself.
COPY pyproject.toml ./
# hadolint ignore=DL3013,DL3042
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Optional extras of elgs to install, comma-separated: "ray" for Ray Serve (deploy/ray/, docs/deploy.md),
# "bench" for the benchmarks and plots (httpx, matplotlib). Empty: the lean runtime that `elgs serve` needs.
ARG EXTRAS=""
COPY README.md ./
COPY service ./service
# The extras' pins are in pyproject.toml (ray[serve]==2.60.0); without EXTRAS no httpx or matplotlib.
# hadolint ignore=DL3013
RUN pip install . && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi && elgs --help > /dev/null

USER 10001:10001
# 1: fetch the VGG16 and InceptionV3 ImageNet weights into TORCH_HOME at build time; 0: skip.
ARG FETCH_WEIGHTS=1
# A named volume mounted on TORCH_HOME starts as a copy of this directory, so baked weights persist.
RUN if [ "$FETCH_WEIGHTS" = "1" ]; then elgs models fetch vgg16 inception_v3; fi
# At run time the weights come from the image, the volume or ELGS_WEIGHTS_DIR, never from the network
# (set ELGS_ALLOW_DOWNLOAD=1 to let a container without them download once into TORCH_HOME).
ENV ELGS_ALLOW_DOWNLOAD=0

WORKDIR /home/elgs
EXPOSE 8000
# /health/ready answers 503 until the models are loaded and warmed up; urllib raises on it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]

# SIGTERM (Docker's default, written out): uvicorn stops accepting connections, answers every request in
# flight, then the lifespan stops the batchers. A request takes at most ELGS_REQUEST_TIMEOUT_S (30 s), so
# give the stop more than that: `docker stop -t 45`, `docker run --stop-timeout 45`, compose's
# stop_grace_period: 45s (Docker's default of 10 s kills the requests still running; docs/deploy.md).
STOPSIGNAL SIGTERM
CMD ["elgs", "serve", "--host", "0.0.0.0", "--port", "8000"]
