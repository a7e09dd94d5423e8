# syntax=docker/dockerfile:1
#
# The byoc container image: `byoc serve` with the built-in processors and the example processors.
#
#   CPU (default):  docker build -t byoc:local .
#   GPU:            docker build -t byoc:gpu \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .
#                   (Ubuntu 24.04's own Python 3.12 is installed by the step below; on an
#                   ubuntu22.04 CUDA image add --build-arg PYTHON=python3.11 for Python 3.11)
#
# Any base works that either has a Python >= 3.11 with venv (the python:* images) or can
# `apt-get install` one (Debian and Ubuntu images, the nvidia/cuda ones included).
# nvidia-ml-py (the `gpu` extra) is installed in both variants: it only reports GPU memory, and does
# so whenever the NVIDIA container runtime mounts the driver (`docker run --gpus all`).
#
# Your own processor: build FROM this image, `COPY my_model.py /app/` and set
# BYOC_PROCESSOR=my_model:MyModel (see examples/sepia_processor.py and the README, "Deploying").

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The interpreter to use (or install, when the base has none): python3, or e.g. python3.11.
ARG PYTHON=python3
# Extras of the byoc package to install; empty for none.
ARG BYOC_EXTRAS=gpu

# Python itself only when the base image lacks it (CUDA images); a virtual environment in every case,
# so that the install works the same way on bases whose system Python is externally managed.
# The distribution's packages are not pinned (DL3008): which ones, and their versions, follow the base
# image and the PYTHON argument, and a pin for one base release fails on every other.
# hadolint ignore=DL3008
RUN set -eux; \
    if ! "$PYTHON" -m venv /opt/venv; then \
        rm -rf /opt/venv; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "$PYTHON" "$PYTHON-venv" ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
        "$PYTHON" -m venv /opt/venv; \
    fi; \
    /opt/venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'; \
    groupadd --system --gid 10001 byoc; \
    useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/byoc \
        --shell /usr/sbin/nologin byoc

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# byoc from the build context (README.md is part of the package metadata). What pip installs is this
# checkout itself, not a package from an index, so there is no version to pin (DL3013); its
# dependencies' ranges are the ones in pyproject.toml.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src/ ./src/
# hadolint ignore=DL3013
RUN set -eux; \
    target=.; \
    if [ -n "$BYOC_EXTRAS" ]; then target=".[$BYOC_EXTRAS]"; fi; \
    pip install --no-cache-dir "$target"; \
    byoc --version; \
    rm -rf /build

# Processors outside the byoc package live in /app, which is on the import path.
WORKDIR /app
COPY examples/ ./examples/
ENV PYTHONPATH=/app

# Defaults; every setting can be changed with BYOC_<NAME> at run time (`byoc serve --help` lists them).
# The processor comes from BYOC_PROCESSOR rather than from CMD, so that setting the variable is enough.
ENV BYOC_HOST=0.0.0.0 \
    BYOC_PORT=8000 \
    BYOC_PROCESSOR=passthrough \
    BYOC_MAX_SESSIONS=4 \
    BYOC_DRAIN_TIMEOUT_S=8 \
    BYOC_CAPABILITY_NAME=byoc \
    BYOC_LOG_LEVEL=INFO \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video

USER 10001:10001
EXPOSE 8000

# `byoc serve` drains on SIGTERM: it answers 503, unregisters, ends every session (final segments,
# final events, DELETEd channels) and exits 0 within BYOC_DRAIN_TIMEOUT_S. Give it a stop timeout
# above that (docker's default is 10 s; compose: stop_grace_period; Kubernetes:
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# 200 while it can serve, 503 while loading, draining or broken (urlopen raises on 503: exit 1).
# The start period covers a slow model load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BYOC_PORT', '8000') + '/health', timeout=4)"]

# Exec form: byoc is PID 1 and receives SIGTERM itself. Arguments after the image name are passed
# to `byoc serve` (e.g. `docker run byoc:local invert` or `... --max-sessions 8`).
ENTRYPOINT ["byoc", "serve"]
CMD []
