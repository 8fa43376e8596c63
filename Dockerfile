# syntax=docker/dockerfile:1
# elgs: the REST service (`elgs serve`, the default command) and the attack / defence CLI in one image.
#
#   docker build -t elgs .                              # bakes VGG16 + InceptionV3 weights (needs network at build)
#   docker build --build-arg FETCH_WEIGHTS=0 -t elgs .  # no weights baked: mount them or let them download
#   docker run --gpus all -p 8000:8000 elgs
#   docker run --gpus all -v "$PWD/data:/data" elgs elgs attack eval --data /data ...
#   docker build --build-arg EXTRAS=ray -t elgs:ray .   # with Ray Serve (deploy/ray/docker-compose.yml)
#   docker build --build-arg EXTRAS=bench -t elgs:research .  # with `elgs bench` and `attack eval --plot`
#
# The base matches torch's CUDA build: torch 2.14.1 from PyPI is built against CUDA 13.0
# (torch.version.cuda == "13.0"); the host needs an NVIDIA driver that supports CUDA 13.0 (>= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# 1: fetch the VGG16 and InceptionV3 ImageNet weights into TORCH_HOME at build time; 0: skip.
ARG FETCH_WEIGHTS=1
# Optional extras of elgs to install, comma-separated: "ray" for Ray Serve (deploy/ray/, docs/deploy.md),
# "bench" for the benchmarks and plots (httpx, matplotlib). Empty: the lean runtime that `elgs serve` needs.
ARG EXTRAS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
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
    && mkdir -p "$TORCH_HOME" /data /out \
    && chown -R elgs:elgs "$TORCH_HOME" /data /out

WORKDIR /opt/elgs
COPY pyproject.toml README.md ./
COPY service ./service
# The extras' pins are in pyproject.toml (ray[serve]==2.60.0); without EXTRAS no httpx or matplotlib.
# hadolint ignore=DL3013
RUN pip install . && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi && elgs --help > /dev/null

USER 10001:10001
# A named volume mounted on TORCH_HOME starts as a copy of this directory, so baked weights persist.
RUN if [ "$FETCH_WEIGHTS" = "1" ]; then elgs models fetch vgg16 inception_v3; fi
# At run time the weights come from the image, the volume or ELGS_WEIGHTS_DIR, never from the network
# (set ELGS_ALLOW_DOWNLOAD=1 to let a container without them download once into TORCH_HOME).
ENV ELGS_ALLOW_DOWNLOAD=0

WORKDIR /home/elgs
EXPOSE 8000
# /health/ready answers 503 until the models are loaded and warmed up; urllib raises on it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]

CMD ["elgs", "serve", "--host", "0.0.0.0", "--port", "8000"]
