"""Shared fixtures: the ../shared data (tests that need it skip without it), a CLI runner, small policies,
and the expensive parts tests in several folders share (a serving stack, a registry with a weak version 1).

The folders below mirror the package (``core/`` is ``kfloop/`` itself). Test modules import the plain
functions and classes they share from ``testbed.py`` beside this file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # pytest's default (prepend) import mode puts it there; the other modes do not
    sys.path.insert(0, str(TESTS))

from objectstore import SeaweedS3  # noqa: E402
from testbed import EventSink, digits_csv, register_version  # noqa: E402
from kfloop.local.runtime import ServingRuntime  # noqa: E402
from kfloop.local.supervisor import free_port  # noqa: E402
from kfloop.registry import ModelRegistry  # noqa: E402
from kfloop.training import Prepared  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_SPECS = SHARED / "specs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "kaggle_leaf_train.csv").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_specs() -> Path:
    if not SHARED_SPECS.exists():
        pytest.skip("../shared/specs is not present")
    return SHARED_SPECS


class CliResult:
    def __init__(self, completed: subprocess.CompletedProcess) -> None:
        self.code = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def kfloop_cli(tmp_path: Path):
    """Run ``python -m kfloop ...`` for real, with its own home folder."""
    home = tmp_path / "home"

    def run(*args: str, timeout: float = 600) -> CliResult:
        completed = subprocess.run(
            [sys.executable, "-m", "kfloop", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_clean_env(), "KFLOOP_HOME": str(home), "COLUMNS": "200"},
        )
        return CliResult(completed)

    return run


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("KFLOOP_")}


@pytest.fixture
def small_policy(tmp_path: Path) -> Path:
    """A policy with a tiny, fast search (2 candidates in one task, 3-fold CV)."""
    path = tmp_path / "small-policy.yaml"
    path.write_text(yaml.safe_dump({
        "model": "digits",
        "training": {
            "search_space": {"n_estimators": [20, 40], "max_features": ["sqrt"], "min_samples_leaf": [1]},
            "cv_folds": 3,
            "holdout_fraction": 0.25,
            "seed": 7,
            "candidates_per_task": 2,
        },
    }))
    return path


@pytest.fixture(scope="session")
def serving_data() -> str:
    """The leaf case study when ../shared is here, else scikit-learn's digits."""
    leaf = SHARED_DATA / "kaggle_leaf_train.csv"
    return str(leaf) if leaf.exists() else "builtin:digits"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, serving_data):
    """Registry with versions 1 (production) and 2 of model 'leaf', served by a runtime with 2 replicas.

    Shared by the runtime tests (tests/local) and the server tests (tests/serving), built once per run. The
    runtime tests change its replicas, traffic and version and leave version 1 serving all traffic.
    """
    root = tmp_path_factory.mktemp("serving")
    registry = root / "registry"
    register_version(registry, "leaf", serving_data, n_estimators=60, work=root / "v1")
    register_version(registry, "leaf", serving_data, n_estimators=30, work=root / "v2", promote=False)
    sink = EventSink()
    runtime = ServingRuntime(
        str(registry), "leaf", home=root / "home", replicas=2, http_port=free_port(), grpc_port=free_port(),
        logger_url=sink.url, log_dir=root / "logs",
    )
    runtime.start()
    prepared = Prepared.load(str(root / "v1" / "prepared.npz"))
    yield {"runtime": runtime, "registry": ModelRegistry(registry), "sink": sink, "holdout": prepared, "root": root}
    runtime.stop()
    sink.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback with the bucket ``kfloop``, one per test worker."""
    server = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's environment pointed at ``s3_server`` (s3fs and botocore read their credentials from it)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.env


@pytest.fixture
def s3_registry(s3_env, request) -> str:
    """A registry URI of this test's own in the S3 server's bucket."""
    return f"s3://kfloop/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}/registry"


@pytest.fixture(scope="session")
def weak_v1(tmp_path_factory):
    """A registry with digits v1 trained on a sixth of the data (promoted); the small and the full data.

    Read-only: tests take their own copy (``registry_with_weak_v1``)."""
    root = tmp_path_factory.mktemp("weak-v1")
    small = digits_csv(root / "digits-small.csv", every=6)
    register_version(root / "registry", "digits", small, n_estimators=40, work=root / "v1", target="digit")
    return root / "registry", small, digits_csv(root / "digits-full.csv")


@pytest.fixture
def registry_with_weak_v1(tmp_path, weak_v1):
    """This test's own copy of the weak-v1 registry, with the small and the full data."""
    registry, small, full = weak_v1
    shutil.copytree(registry, tmp_path / "registry")
    return tmp_path / "registry", small, full


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``heavy`` (pipeline runs that keep both cores busy, or tests that judge windows of seconds)
    run on one xdist worker, one after another; the others share the second worker (``-n 2 --dist loadgroup``
    in pyproject.toml). A third worker does not help: the suite is CPU-bound (1.74 cores busy on average)."""
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.xdist_group("heavy"))
