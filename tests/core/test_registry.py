"""The model registry: numbered versions, atomic production pointer, torn writes invisible."""

from __future__ import annotations

import json

import pytest

from kfloop.errors import RegistryError
from kfloop.registry import ModelRegistry


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "files"
    source.mkdir()
    (source / "model.joblib").write_bytes(b"model")
    (source / "preprocessor.joblib").write_bytes(b"prep")
    return {name: str(source / name) for name in ("model.joblib", "preprocessor.joblib")}


def test_versions_count_up_and_start_as_candidates(tmp_path, files):
    registry = ModelRegistry(tmp_path / "reg")
    assert registry.register("m", files, {"metrics": {"accuracy": 0.9}}) == "1"
    assert registry.register("m", files, {"metrics": {"accuracy": 0.8}}) == "2"
    assert registry.versions("m") == ["1", "2"]
    meta = registry.metadata("m", "2")
    assert meta["status"] == "candidate" and meta["version"] == "2" and meta["model"] == "m"
    assert (tmp_path / "reg" / "m" / "2" / "model.joblib").read_bytes() == b"model"
    assert registry.uri("m", "2") == f"{(tmp_path / 'reg' / 'm' / '2').resolve()}/"


def test_promote_moves_the_pointer_and_reject_leaves_it(tmp_path, files):
    registry = ModelRegistry(tmp_path / "reg")
    for _ in range(3):
        registry.register("m", files, {})
    registry.promote("m", "1", {"reason": "first"})
    registry.promote("m", "2", {"reason": "better"})
    registry.reject("m", "3", {"reason": "worse"})
    assert registry.production_version("m") == "2"
    pointer = json.loads((tmp_path / "reg" / "m" / "production.json").read_text())
    assert pointer["previous"] == "1"
    assert registry.metadata("m", "3")["status"] == "rejected"
    assert registry.metadata("m", "3")["gate"] == {"reason": "worse"}
    assert not list((tmp_path / "reg" / "m").glob("*.tmp-*"))


def test_folder_without_metadata_is_not_a_version(tmp_path, files):
    registry = ModelRegistry(tmp_path / "reg")
    registry.register("m", files, {})
    (tmp_path / "reg" / "m" / "2").mkdir()  # a crash before metadata.json was written
    assert registry.versions("m") == ["1"]
    assert registry.register("m", files, {}) == "3"


def test_failed_register_leaves_no_staging_folder(tmp_path, files):
    registry = ModelRegistry(tmp_path / "reg")
    with pytest.raises(FileNotFoundError):
        registry.register("m", {**files, "missing": str(tmp_path / "nope")}, {})
    assert registry.versions("m") == []
    assert not list((tmp_path / "reg" / "m").glob(".staging-*"))


def test_missing_version_and_missing_production_are_registry_errors(tmp_path, files):
    registry = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="has no production version .* run 'kfloop train' first"):
        registry.resolve("m")
    registry.register("m", files, {})
    with pytest.raises(RegistryError, match=r"model 'm' has no version '9' .* \(versions: 1\)"):
        registry.metadata("m", "9")


@pytest.mark.parametrize("version", ["../other/1", "1/../2", "", "one", "-1", "1.0", "٣"])
def test_a_version_that_is_not_whole_digits_never_becomes_a_path(tmp_path, version):
    from kfloop.errors import InputError

    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(InputError, match="not a registry version"):
        registry.metadata("leaf", version)
    with pytest.raises(InputError, match="not a registry version"):
        registry.uri("leaf", version)


@pytest.mark.parametrize("model", ["../leaf", "a/b", "..", ""])
def test_a_model_name_with_path_parts_is_refused(tmp_path, model):
    from kfloop.errors import InputError

    with pytest.raises(InputError, match="model name"):
        ModelRegistry(tmp_path / "registry").uri(model)
