"""The versioned model registry on a local path or any fsspec URI.

Layout (each version folder is directly usable as a KServe ``storageUri``)::

    <root>/<model>/<version>/   model.joblib, model.onnx, preprocessor.joblib,
                                reference.npz, metadata.json
    <root>/<model>/production.json   {"version": "3", "updated": ...}
    <root>/<model>/captures/    payload rows and labelled shards (:mod:`kfloop.captures`)

Versions are whole numbers, counted up. A version folder is written under a
staging name and renamed into place, and ``metadata.json`` is written last,
so a crash never leaves a torn version: a folder without ``metadata.json`` is
not a version. Metadata and the production pointer are replaced by
write-then-rename, never edited in place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec

from kfloop.bundle import METADATA, PREPROCESSOR, ModelBundle
from kfloop.captures import CAPTURES, CaptureArea
from kfloop.durable import atomic_write
from kfloop.errors import InputError, RegistryError
from kfloop.preprocessing import Preprocessor

PRODUCTION_POINTER = "production.json"
STATUS_CANDIDATE = "candidate"
STATUS_APPROVED = "approved"  # passed the promotion gate; a rollout moves the production pointer to it
STATUS_PROMOTED = "promoted"
STATUS_REJECTED = "rejected"


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def checked_version(version: str) -> str:
    """``version`` if it can name a registry version (whole digits), else an :class:`InputError`.

    Versions arrive from outside -- admin calls, routes, a predictor's 409
    header, CloudEvents, the command line -- and become paths: nothing but
    digits may (``../other/1`` must not reach another folder).
    """
    if not isinstance(version, str) or not version.isdigit() or not version.isascii() or len(version) > 12:
        raise InputError(f"version {version!r} is not a registry version: versions are whole numbers (1, 2, ...)")
    return version


def checked_model(model: str) -> str:
    """``model`` if it can name a registry model (letters, digits, ``.``, ``_``, ``-``), else an :class:`InputError`."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model) or ".." in model:
        raise InputError(f"model name {model!r} is not allowed: letters, digits, '.', '_' and '-', at most 63")
    return model


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ModelRegistry:
    """Versioned model storage under one root URI."""

    def __init__(self, root: str | Path) -> None:
        self.root = str(root).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # --- addresses ---------------------------------------------------------------------------

    def uri(self, model: str, version: str | None = None) -> str:
        """The URI of a model, or of one version (what KServe's storageUri points at)."""
        checked_model(model)
        if version is not None:
            checked_version(version)
        if self.is_local:
            base = str(Path(self._root_path).resolve() / model)
        else:
            base = f"{self.root}/{model}"
        return f"{base}/{version}" if version is not None else base

    def captures(self, model: str) -> CaptureArea:
        """The model's captures area: captured payload rows and labelled shards."""
        return CaptureArea(f"{self.uri(model)}/{CAPTURES}", model, is_local=self.is_local)

    def _path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts])

    # --- reading -----------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.fs.exists(self._root_path):
            return []
        return sorted(
            Path(p).name for p in self.fs.ls(self._root_path, detail=False) if self.versions(Path(p).name)
        )

    def versions(self, model: str) -> list[str]:
        """Complete versions of ``model``, oldest first."""
        folder = self._path(model)
        if not self.fs.exists(folder):
            return []
        found = []
        for entry in self.fs.ls(folder, detail=False):
            name = Path(entry).name
            if name.isdigit() and self.fs.exists(self._path(model, name, METADATA)):
                found.append(name)
        return sorted(found, key=int)

    def metadata(self, model: str, version: str) -> dict[str, Any]:
        path = self._path(checked_model(model), checked_version(version), METADATA)
        if not self.fs.exists(path):
            known = ", ".join(self.versions(model)) or "none"
            raise RegistryError(f"model {model!r} has no version {version!r} in {self.root} (versions: {known})")
        with self.fs.open(path, "r") as handle:
            return json.load(handle)

    def production_version(self, model: str) -> str | None:
        path = self._path(model, PRODUCTION_POINTER)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            return str(json.load(handle)["version"])

    def resolve(self, model: str, version: str | None = None) -> str:
        """``version`` itself, or the production version when None."""
        if version is not None:
            self.metadata(model, version)
            return version
        production = self.production_version(model)
        if production is None:
            raise RegistryError(f"model {model!r} has no production version in {self.root}; run 'kfloop train' first")
        return production

    @contextmanager
    def local_version(self, model: str, version: str) -> Iterator[Path]:
        """A local folder holding the version's files (downloaded first for remote registries)."""
        self.metadata(model, version)
        if self.is_local:
            yield Path(self._path(model, version))
            return
        with tempfile.TemporaryDirectory(prefix="kfloop-version-") as tmp:
            self.fs.get(self._path(model, version) + "/", tmp + "/", recursive=True)
            yield Path(tmp)

    def load(self, model: str, version: str | None = None, **options: Any) -> ModelBundle:
        """Load a version (production by default) for prediction."""
        with self.local_version(model, self.resolve(model, version)) as folder:
            return ModelBundle.load(folder, **options)

    def preprocessor(self, model: str, version: str) -> Preprocessor:
        """Only the version's fitted preprocessor (what a transformer needs)."""
        import joblib

        with self.local_version(model, version) as folder:
            return joblib.load(folder / PREPROCESSOR)

    # --- writing -----------------------------------------------------------------------------

    def register(self, model: str, files: dict[str, str], metadata: dict[str, Any]) -> str:
        """Store local ``files`` (name -> path) as the next version of ``model``; returns the version."""
        staging = self._path(model, f".staging-{uuid.uuid4().hex}")
        self.fs.makedirs(staging, exist_ok=True)
        try:
            for name, local_path in files.items():
                self._store_file(local_path, f"{staging}/{name}")
            while True:
                version = str(max((int(v) for v in self._all_version_folders(model)), default=0) + 1)
                target = self._path(model, version)
                if self.fs.exists(target):
                    continue
                try:
                    self._rename(staging, target)
                except OSError:
                    if self.fs.exists(target):  # another writer took this number first
                        continue
                    raise
                break
        except BaseException:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
            raise
        record = {**metadata, "model": model, "version": version, "status": STATUS_CANDIDATE, "created": utc_now()}
        self._write_json(self._path(model, version, METADATA), record)
        return version

    def update_metadata(self, model: str, version: str, **fields: Any) -> dict[str, Any]:
        record = {**self.metadata(model, version), **fields}
        self._write_json(self._path(model, version, METADATA), record)
        return record

    def promote(self, model: str, version: str, decision: dict[str, Any] | None = None) -> None:
        """Record ``version`` as promoted (with the gate's ``decision``, if given: a rollout keeps the one recorded
        at approval) and point production at it."""
        gate = {} if decision is None else {"gate": decision}
        self.update_metadata(model, version, status=STATUS_PROMOTED, **gate)
        self.set_production(model, version)

    def approve(self, model: str, version: str, decision: dict[str, Any]) -> None:
        """Record ``version`` as approved by the gate (with its ``decision``); production is left to a rollout."""
        self.update_metadata(model, version, status=STATUS_APPROVED, gate=decision)

    def reject(self, model: str, version: str, decision: dict[str, Any]) -> None:
        """Record ``version`` as rejected (with the gate's ``decision``); production is left as it is."""
        self.update_metadata(model, version, status=STATUS_REJECTED, gate=decision)

    def set_production(self, model: str, version: str) -> None:
        """Point production at an existing version (used by rollbacks)."""
        self.metadata(model, version)
        self._write_json(
            self._path(model, PRODUCTION_POINTER),
            {"version": version, "updated": utc_now(), "previous": self.production_version(model)},
        )

    def _store_file(self, local_path: str, target: str) -> None:
        """Copy a file in; on a local registry a hard link when possible (forests are 100+ MB, and
        the files handed in are fresh pipeline artifacts that nothing rewrites in place)."""
        if self.is_local:
            try:
                os.link(local_path, target)
                return
            except OSError:
                pass  # another file system, or links not allowed: copy
        self.fs.put_file(local_path, target)

    def _all_version_folders(self, model: str) -> list[str]:
        folder = self._path(model)
        return [Path(p).name for p in self.fs.ls(folder, detail=False) if Path(p).name.isdigit()]

    def _rename(self, source: str, target: str) -> None:
        if self.is_local:
            Path(source).rename(target)  # atomic; fails if target exists and is not empty
        else:
            self.fs.mv(source, target, recursive=True)

    def _write_json(self, path: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, indent=2, sort_keys=True)
        if self.is_local:
            atomic_write(path, text)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "w") as handle:
            handle.write(text)
        self.fs.mv(tmp, path)

