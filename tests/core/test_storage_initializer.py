"""KServe's own storage initializer (``kserve-storage``, pinned to KServe's version) reads a registry version's
``storageUri`` exactly: run as the init container runs it -- its own process, the credentials in its
environment only -- against a real S3 server holding versions 1 to 10."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from objectstore import INITIALIZER
from kfloop.registry import ModelRegistry


def initialize(storage_uri: str, models: Path, credentials: dict[str, str]) -> set[str]:
    """Files (relative paths) the storage initializer puts under ``models`` for ``storage_uri``."""
    env = {"PATH": os.environ["PATH"], "HOME": str(models.parent), **credentials}
    completed = subprocess.run([sys.executable, "-c", INITIALIZER, storage_uri, str(models)], env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return {str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()}


@pytest.mark.timeout(180)
def test_the_storage_initializer_copies_exactly_version_1_with_version_10_beside_it(s3_server, s3_registry, tmp_path):
    registry = ModelRegistry(s3_registry)
    for number in range(1, 11):
        source = tmp_path / f"files-{number}"
        source.mkdir()
        (source / "model.joblib").write_text(f"forest of version {number}")
        (source / "preprocessor.joblib").write_text("scaler")
        assert registry.register("classifier", {p.name: str(p) for p in source.iterdir()}, {}) == str(number)

    landed = initialize(registry.uri("classifier", "1"), tmp_path / "exact" / "models", s3_server.env)
    assert landed == {"model.joblib", "preprocessor.joblib", "metadata.json"}
    assert (tmp_path / "exact" / "models" / "model.joblib").read_text() == "forest of version 1"

    # The URI without its final '/' is a bare prefix to KServe: version 10 comes along under 0/.
    bare = initialize(registry.uri("classifier", "1").rstrip("/"), tmp_path / "bare" / "models", s3_server.env)
    assert bare == landed | {"0/model.joblib", "0/preprocessor.joblib", "0/metadata.json"}
