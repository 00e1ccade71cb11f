# syntax=docker/dockerfile:1.7
#
# kfloop's one image. Its entry point is the kfloop CLI, so the same image runs
#   kfloop predictor | transformer   (the KServe InferenceService's containers)
#   kfloop watch | trigger           (the drift detector and the trigger service)
# and it is the base_image of the training pipeline's KFP components (their pods run
# their own command, which replaces the entry point).
#
#   docker build -t ghcr.io/kfloop/kfloop:0.1.0 .
#
# The base is pinned by exact tag. Its digest is NOT recorded: this file was written on a
# machine with no Docker engine and no access to the image registry, so no digest could be
# read. Before a production build, pin it in PYTHON_IMAGE, e.g. with
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm
# -> python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: the kfloop wheel and wheels of everything it needs ------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kfloop/ kfloop/
COPY components/ components/
COPY pipelines/ pipelines/
COPY serving/ serving/
COPY policies/ policies/
COPY manifests/ manifests/
# Registry back-ends: kfloop's pods read and write s3:// (or gs://, with gcsfs) through fsspec.
ARG STORAGE_PACKAGES="s3fs==2026.9.0"
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip wheel --wheel-dir /wheels /wheels/kfloop-*.whl ${STORAGE_PACKAGES}

# ---- final: wheels installed, no compilers, no sources, a non-root user -----------------------
FROM ${PYTHON_IMAGE}
ARG STORAGE_PACKAGES="s3fs==2026.9.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kfloop \
    KFLOOP_HOME=/home/kfloop/.kfloop
RUN groupadd --gid 10001 kfloop \
 && useradd --uid 10001 --gid 10001 --home-dir /home/kfloop --create-home --shell /usr/sbin/nologin kfloop
# Installed from the builder's wheels only (--no-index): nothing is compiled or fetched here.
# setuptools stays: grpcio-tools (a kserve dependency) imports it at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels kfloop ${STORAGE_PACKAGES} \
 && kfloop --help >/dev/null
USER 10001:10001
WORKDIR /home/kfloop
EXPOSE 8080
ENTRYPOINT ["kfloop"]
CMD ["--help"]
