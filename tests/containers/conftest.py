"""The container tests' parts: the Docker daemon `make test-containers` started (``DOCKER_HOST``), the image it
built or loaded (``KFLOOP_TEST_IMAGE``), and containers started as KServe and the manifests start them.

Every test here is marked ``containers``: `make test` leaves them out (``-m "not containers"``), and
`make test-containers` (hack/containers.py) runs only them, with its own daemon. No Kubernetes runs here:
containers share the host's network namespace (each server on 127.0.0.1 and a port of its own) where a
cluster would give each pod its own address.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

SERVING_USER = "10001:10001"  # the manifests' runAsUser / runAsGroup


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.fspath).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.containers)


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


class Containers:
    """Containers started by one test, all removed at its end (by id, whatever state they are in)."""

    def __init__(self, client, image: str) -> None:
        self.client, self.image = client, image
        self.started: list = []

    def serving(self, args: list[str], *, mounts: list | None = None, environment: dict[str, str] | None = None,
                **options):
        """A container as the manifests' securityContext runs it: uid 10001, read-only root filesystem, every
        capability dropped, no privilege escalation, writable only where a pod has an emptyDir."""
        container = self.client.containers.run(
            self.image, args, detach=True, network_mode="host", user=SERVING_USER, read_only=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges"], mounts=mounts or [],
            tmpfs={"/tmp": "", "/home/kfloop": f"uid={SERVING_USER.split(':')[0]}"},
            environment={"HOME": "/home/kfloop", **(environment or {})}, **options,
        )
        self.started.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            try:
                container.remove(force=True)
            except Exception:  # already gone (auto-removed or the daemon removed it)
                pass


@pytest.fixture
def containers(docker_client, image) -> Iterator[Containers]:
    started = Containers(docker_client, image)
    yield started
    started.remove_all()
