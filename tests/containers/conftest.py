"""The container tests' parts: the Docker daemon `make test-containers` started (``DOCKER_HOST``), the image it
built or loaded (``KFLOOP_TEST_IMAGE``), and containers started as KServe and the manifests start them.

Every test module here is marked ``containers`` (``pytestmark``): `make test` leaves them out
(``-m "not containers"``), and `make test-containers` (hack/containers.py) runs only them, with its own
daemon. No Kubernetes runs here: containers share the host's network namespace (each server on 127.0.0.1
and a port of its own) where a cluster would give each pod its own address.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from testbed import Containers


@pytest.fixture(scope="session")
def image() -> str:
    tag = os.environ.get("KFLOOP_TEST_IMAGE")
    if not tag or not os.environ.get("DOCKER_HOST"):
        pytest.fail("the container tests run under `make test-containers` (DOCKER_HOST and KFLOOP_TEST_IMAGE unset)")
    return tag


@pytest.fixture(scope="session")
def docker_client(image):
    import docker

    client = docker.from_env()
    client.images.get(image)
    yield client
    client.close()


@pytest.fixture
def containers(docker_client, image) -> Iterator[Containers]:
    started = Containers(docker_client, image)
    yield started
    started.remove_all()
