# kfloop's one image. Its entry point is the kfloop CLI, so the same image runs
#   kfloop predictor | transformer   (the KServe InferenceService's containers)
#   kfloop watch | trigger           (the drift detector and the trigger service)
# is the base_image of the training pipeline's KFP components (their pods run their own
# command, which replaces the entry point; `kfloop train --runner docker` does the same here),
# and carries KServe's storage initializer (kserve-storage, pinned to KServe's version).
#
#   make image                                   # builds it with its own Docker daemon (hack/containers.py)
#   docker build --network host -t kfloop:local .                        # where python:3.11-slim can be pulled
#   docker build --network host --build-arg BASE_IMAGE=IMG -t kfloop:local .   # IMG: any Debian-like
#                                                # image with python3 and python3-venv
#
# No `syntax` line (BuildKit would fetch a frontend image) and no other downloads than the
# Python packages. What has run on this project's machines (Docker 20.10, no image registry):
# the build on a Debian bookworm base made with debootstrap, every pipeline task under
# kfp.local's DockerRunner, the predictor and transformer containers as KServe starts them
# (read-only root, all capabilities dropped, uid 10001), the storage initializer against a
# real S3 server, the watch and trigger containers (tests/containers, `make test-containers`).
# What has not: any of it on Kubernetes. Pin the base by digest for a production build.
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: a virtual environment with kfloop and everything it needs -----------------------
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/kfloop/bin:$PATH
# --upgrade-deps: a current pip and setuptools (Debian's pip 23 cannot build sdists without wheel).
RUN python3 -m venv --upgrade-deps /opt/kfloop
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kfloop/ kfloop/
COPY components/ components/
COPY pipelines/ pipelines/
COPY serving/ serving/
COPY policies/ policies/
COPY manifests/ manifests/
# s3: the registry in object storage; storage-initializer: KServe's own, for the init container.
RUN pip install --quiet '.[explain,s3,storage-initializer]' \
 && pip uninstall --quiet --yes pip \
 && find /opt/kfloop -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} + \
 && find /opt/kfloop -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.h' -o -name '*.c' \
      -o -name '*.cpp' \) -path '*/site-packages/*' -delete \
 && kfloop --help >/dev/null \
 && cd / && python3 -c "import kfloop.serving.predictor, kfloop.serving.transformer, kfloop.serving.watch, \
      kfloop.serving.trigger, kfloop.steps, kfloop.drift.detectors, sklearn.ensemble, sklearn.covariance, \
      onnxruntime, s3fs, kserve_storage"

# ---- final: the environment, no sources, no pip, a non-root user --------------------------------
FROM ${BASE_IMAGE}
ENV PATH=/opt/kfloop/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kfloop \
    KFLOOP_HOME=/home/kfloop/.kfloop
RUN groupadd --gid 10001 kfloop \
 && useradd --uid 10001 --gid 10001 --home-dir /home/kfloop --create-home --shell /usr/sbin/nologin kfloop
COPY --from=builder /opt/kfloop /opt/kfloop
USER 10001:10001
WORKDIR /home/kfloop
EXPOSE 8080
ENTRYPOINT ["kfloop"]
CMD ["--help"]
