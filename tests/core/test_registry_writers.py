"""Writers of the registry on a local disk and on a real S3 server (SeaweedFS): concurrent registrations get
distinct versions, a writer killed midway leaves nothing listed and what it left is swept, and a store that
refuses (credentials, no bucket, no answer) is a clear error at once, never a loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfloop.errors import StorageError, StorageUnavailable
from kfloop.registry import CLAIMS, ModelRegistry

# A writer process: registers COUNT versions of model "m" and prints each version it was given.
WRITER = """
import json, sys
from kfloop.registry import ModelRegistry
registry = ModelRegistry(sys.argv[1])
for _ in range(int(sys.argv[2])):
    print(registry.register("m", json.loads(sys.argv[3]), {"writer": sys.argv[4]}), flush=True)
"""


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "files"
    source.mkdir()
    (source / "model.joblib").write_bytes(os.urandom(200_000))
    (source / "preprocessor.joblib").write_bytes(b"prep")
    return {name: str(source / name) for name in ("model.joblib", "preprocessor.joblib")}


@pytest.fixture(params=["local", "s3"])
def registry_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_registry")


def _writer(root: str, files: dict[str, str], count: int, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, root, str(count), json.dumps(files), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stored_names(registry: ModelRegistry, version: str) -> list[str]:
    folder = f"{registry._root_path}/m/{version}"
    return sorted(Path(p).name for p in registry.fs.find(folder) if p.rstrip("/") != folder)


@pytest.mark.timeout(120)
def test_sequential_versions_are_listed_whole_with_their_files(registry_root, files):
    registry = ModelRegistry(registry_root)
    acknowledged = [registry.register("m", files, {"n": n}) for n in range(3)]
    assert acknowledged == ["1", "2", "3"] == registry.versions("m")
    assert _stored_names(registry, "2") == ["metadata.json", "model.joblib", "preprocessor.joblib"]
    assert registry.metadata("m", "3")["n"] == 2
    assert registry.uri("m", "2").endswith("/m/2/")
    registry.promote("m", "2", {"reason": "best"})
    assert ModelRegistry(registry_root).production_version("m") == "2"
    with registry.local_version("m", "1") as folder:
        assert (folder / "model.joblib").read_bytes() == Path(files["model.joblib"]).read_bytes()


@pytest.mark.timeout(180)
def test_four_concurrent_writers_get_distinct_versions_and_every_one_is_listed(registry_root, files):
    writers = [_writer(registry_root, files, 3, f"w{n}") for n in range(4)]
    acknowledged = []
    for writer in writers:
        stdout, stderr = writer.communicate(timeout=150)
        assert writer.returncode == 0, stderr
        acknowledged += stdout.split()
    registry = ModelRegistry(registry_root)
    assert sorted(acknowledged, key=int) == registry.versions("m") == [str(n) for n in range(1, 13)]
    owners = [registry.metadata("m", v)["writer"] for v in registry.versions("m")]
    assert sorted(owners) == sorted(f"w{n}" for n in range(4) for _ in range(3))
    for version in registry.versions("m"):
        assert _stored_names(registry, version) == ["metadata.json", "model.joblib", "preprocessor.joblib"]


@pytest.mark.timeout(120)
def test_a_writer_killed_midway_is_never_listed_and_what_it_left_is_swept(s3_registry, files, tmp_path):
    registry = ModelRegistry(s3_registry)
    assert registry.register("m", files, {}) == "1"
    # The second file is a FIFO no one writes to: the writer blocks after storing the first file.
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    writer = _writer(s3_registry, {"model.joblib": files["model.joblib"], "preprocessor.joblib": str(fifo)}, 1, "killed")
    deadline = time.monotonic() + 60
    while _stored_names(registry, "2") != ["model.joblib"]:
        assert time.monotonic() < deadline and writer.poll() is None, writer.stderr.read() if writer.poll() else "slow"
        time.sleep(0.1)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)

    assert registry.versions("m") == ["1"]                        # half-written: not listed, not counted
    assert registry.register("m", files, {}) == "3"               # its number is not handed out again
    assert _stored_names(registry, "2") == ["model.joblib"]       # a fresh leftover is kept (its writer may be slow)
    sweeper = ModelRegistry(s3_registry, stale_seconds=0)
    assert sweeper.sweep("m") == [f"{registry._root_path}/m/2"]
    assert _stored_names(registry, "2") == []
    assert registry.versions("m") == ["1", "3"]
    claim = json.loads(registry.fs.cat_file(f"{registry._root_path}/m/{CLAIMS}/2"))
    assert claim["abandoned"] > claim["claimed"]
    assert registry.register("m", files, {}) == "4"


def test_a_local_writer_killed_midway_leaves_a_staging_folder_that_is_swept(tmp_path, files):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register("m", files, {})
    leftover = tmp_path / "registry" / "m" / ".staging-killed"  # what a writer killed before its rename leaves
    leftover.mkdir()
    (leftover / "model.joblib").write_bytes(b"half")
    assert registry.versions("m") == ["1"]
    assert registry.register("m", files, {}) == "2" and leftover.exists()  # fresh: its writer may be alive
    assert ModelRegistry(tmp_path / "registry", stale_seconds=0).sweep("m") == [str(leftover)]
    assert not leftover.exists() and registry.versions("m") == ["1", "2"]


@pytest.mark.timeout(60)
def test_wrong_credentials_are_a_storage_error_at_once(s3_registry, files, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    started = time.monotonic()
    with pytest.raises(StorageError, match="refused the credentials"):
        ModelRegistry(s3_registry).register("m", files, {})
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_a_bucket_that_does_not_exist_is_a_storage_error(s3_env, files):
    with pytest.raises(StorageError, match="bucket .*does not exist"):
        ModelRegistry("s3://no-such-bucket/registry").register("m", files, {})
    with pytest.raises(StorageError, match="bucket .*does not exist"):
        ModelRegistry("s3://no-such-bucket/registry").versions("m")


@pytest.mark.timeout(120)
def test_a_store_that_does_not_answer_is_temporary(s3_env, files, monkeypatch):
    from kfloop.local.supervisor import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageUnavailable, match="did not answer"):
        ModelRegistry("s3://kfloop/registry").register("m", files, {})
