"""The versioned model registry on a local path or any fsspec URI (``s3://`` with the ``s3`` extra).

Layout (each version folder is directly usable as a KServe ``storageUri``)::

    <root>/<model>/<version>/   model.joblib, model.onnx, preprocessor.joblib,
                                reference.npz, metadata.json
    <root>/<model>/production.json   {"version": "3", "updated": ...}
    <root>/<model>/.claims/<version> who took the number (object stores only; ``.settled``
                                beside it once the sweep has nothing more to do with it)
    <root>/<model>/captures/    payload rows and labelled shards (:mod:`kfloop.captures`)

Versions are whole numbers, counted up, and ``metadata.json`` is written last: a
folder without it is not a version (never listed, served or counted). On a
local disk a version is written under a staging name and renamed into place.
An object store has no rename (s3fs "moves" by copy and delete), so there a
writer takes a number by creating its claim only if it does not exist yet
(S3's ``If-None-Match: *``) and writes into the numbered folder. Both ways try
a bounded number of numbers; what a killed writer left is swept once stale.
Metadata and the production pointer are replaced whole, never edited in place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec

from kfloop.bundle import METADATA, PREPROCESSOR, ModelBundle
from kfloop.captures import CAPTURES, CaptureArea
from kfloop.durable import atomic_write
from kfloop.errors import InputError, KfloopError, RegistryError, StorageError, StorageUnavailable
from kfloop.preprocessing import Preprocessor

PRODUCTION_POINTER = "production.json"
CLAIMS = ".claims"  # <model>/.claims/<version>: who took a number on an object store (kept: numbers are never reused)
SETTLED = ".settled"  # <model>/.claims/<version>.settled: the sweep has nothing more to do with that version
STAGING = ".staging-"  # <model>/.staging-<id>/: a local version before its rename
VERSION_ATTEMPTS = 16  # numbers a writer tries (each taken by another writer meanwhile) before it gives up
STALE_SECONDS = 3600.0  # an unfinished version this old was left by a writer that died: swept
STATUS_CANDIDATE = "candidate"
STATUS_APPROVED = "approved"  # passed the promotion gate; a rollout moves the production pointer to it
STATUS_PROMOTED = "promoted"
STATUS_REJECTED = "rejected"


log = logging.getLogger(__name__)

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

    def __init__(self, root: str | Path, *, stale_seconds: float = STALE_SECONDS) -> None:
        self.root = str(root).rstrip("/")
        # No listing cache (other processes write versions, and a cached listing would hide them), and a
        # file system of its own (fsspec shares one per URI, with the credentials it was first built with).
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, use_listings_cache=False, skip_instance_cache=True)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.stale_seconds = stale_seconds

    # --- addresses ---------------------------------------------------------------------------

    def uri(self, model: str, version: str | None = None) -> str:
        """The URI of a model, or of one version's folder (what KServe's ``storageUri`` points at).

        A version's URI ends with ``/``: KServe's storage initializer lists objects by
        the bare prefix, so ``.../1`` would also copy versions 10-19, 100-199, ...
        """
        checked_model(model)
        if version is not None:
            checked_version(version)
        if self.is_local:
            base = str(Path(self._root_path).resolve() / model)
        else:
            base = f"{self.root}/{model}"
        return f"{base}/{version}/" if version is not None else base

    def captures(self, model: str) -> CaptureArea:
        """The model's captures area: captured payload rows and labelled shards."""
        return CaptureArea(f"{self.uri(model)}/{CAPTURES}", model, is_local=self.is_local)

    def _path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts])

    # --- reading -----------------------------------------------------------------------------

    def models(self) -> list[str]:
        with self._storage_errors():
            if not self.fs.exists(self._root_path):
                self._check_bucket()
                return []
            names = [Path(p).name for p in self.fs.ls(self._root_path, detail=False)]
        return sorted(name for name in names if self.versions(name))

    def versions(self, model: str) -> list[str]:
        """Complete versions of ``model`` (their ``metadata.json`` written), oldest first."""
        with self._storage_errors():
            return sorted((n for n in self._numbered_folders(model) if self._is_complete(model, n)), key=int)

    def metadata(self, model: str, version: str) -> dict[str, Any]:
        path = self._path(checked_model(model), checked_version(version), METADATA)
        with self._storage_errors():
            if not self.fs.exists(path):
                known = ", ".join(self.versions(model)) or "none"
                raise RegistryError(f"model {model!r} has no version {version!r} in {self.root} (versions: {known})")
            with self.fs.open(path, "r") as handle:
                return json.load(handle)

    def production_version(self, model: str) -> str | None:
        path = self._path(model, PRODUCTION_POINTER)
        with self._storage_errors():
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
            with self._storage_errors():
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
        """Store local ``files`` (name -> path) as the next version of ``model``; returns the version.

        The files are written first and ``metadata.json`` last, as the commit. Raises
        :class:`StorageUnavailable` when every number tried was taken meanwhile (or the
        store did not answer) and :class:`StorageError` when the store refuses for good.
        """
        checked_model(model)
        if not files:
            raise InputError(f"a version of {model!r} needs at least one file")
        with self._storage_errors():
            self.sweep(model)
            version = self._write_by_rename(model, files) if self.is_local else self._write_by_claim(model, files)
            record = {**metadata, "model": model, "version": version, "status": STATUS_CANDIDATE, "created": utc_now()}
            self._write_json(self._path(model, version, METADATA), record)
        return version

    def sweep(self, model: str) -> list[str]:
        """Remove what writers that died left of ``model`` once it is ``stale_seconds`` old: staging folders
        (local) and claimed versions without ``metadata.json`` (object stores). Returns the paths removed."""
        now = time.time()
        removed = []
        with self._storage_errors():
            if self.is_local:
                folder = Path(self._path(model))
                for staging in folder.glob(f"{STAGING}*") if folder.is_dir() else ():
                    if now - staging.stat().st_mtime >= self.stale_seconds:
                        shutil.rmtree(staging, ignore_errors=True)
                        removed.append(str(staging))
                return removed
            names = set(self._claim_names(model))
            for version in sorted((n for n in names if n.isdigit() and n + SETTLED not in names), key=int):
                claim = self._claim_record(model, version)
                if now - float(claim.get("claimed", 0)) < self.stale_seconds:
                    continue  # its writer may be at work
                if not claim.get("abandoned") and not self._is_complete(model, version):
                    # Marked first: a writer that was only slow finds the mark before its commit and gives up.
                    self.fs.pipe_file(self._path(model, CLAIMS, version), json.dumps({**claim, "abandoned": now}).encode())
                    folder = self._path(model, version)
                    if self.fs.exists(folder):
                        self.fs.rm(folder, recursive=True)
                    removed.append(folder)
                self.fs.pipe_file(self._path(model, CLAIMS, version + SETTLED), b"")  # never read again
        return removed

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

    # --- version numbers and the two ways to write a version ---------------------------------------

    def _write_by_rename(self, model: str, files: dict[str, str]) -> str:
        """A local version: staged under a private name, renamed into the first free number (atomic)."""
        staging = Path(self._path(model, f"{STAGING}{uuid.uuid4().hex}"))
        staging.mkdir(parents=True)
        try:
            for name, local_path in files.items():
                self._store_file(local_path, str(staging / name))
            for _ in range(VERSION_ATTEMPTS):
                version = self._next_number(model)
                try:
                    os.rename(staging, self._path(model, version))  # fails when the number's folder holds files
                    return version
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            raise self._contention(model)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_by_claim(self, model: str, files: dict[str, str]) -> str:
        """An object-store version: a number taken by a conditional create of its claim, then the files."""
        writer = uuid.uuid4().hex
        for _ in range(VERSION_ATTEMPTS):
            version = self._next_number(model)
            if self._claim(model, version, writer):
                break
        else:
            raise self._contention(model)
        folder = self._path(model, version)
        try:
            for name, local_path in files.items():
                self.fs.put_file(local_path, f"{folder}/{name}")
            if self._claim_record(model, version).get("abandoned"):
                raise StorageUnavailable(
                    f"registry {self.root}: version {version} of {model!r} took longer than {self.stale_seconds:g} s "
                    "to write and was swept as abandoned; register again"
                )
        except BaseException:
            self._discard(folder)  # the claim stays: the number is never handed out again
            raise
        return version

    def _discard(self, folder: str) -> None:
        """Remove a version folder its writer gave up on; if the store refuses now too, the sweep will."""
        try:
            if self.fs.exists(folder):
                self.fs.rm(folder, recursive=True)
        except Exception as exc:  # the writer's own error is the one to raise
            log.warning("registry %s: could not remove the unfinished %s (%s: %s); a later registration sweeps it once "
                        "stale", self.root, folder, type(exc).__name__, exc)

    def _claim(self, model: str, version: str, writer: str) -> bool:
        """Create ``.claims/<version>`` only if no one has (``If-None-Match: *``): whether this writer took it."""
        record = {"writer": writer, "host": socket.gethostname(), "pid": os.getpid(), "claimed": time.time()}
        try:
            with self.fs.open(self._path(model, CLAIMS, version), "xb") as handle:
                handle.write(json.dumps(record).encode())
        except FileExistsError:
            return False
        except OSError as exc:
            if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _claim_record(self, model: str, version: str) -> dict[str, Any]:
        """What the claim of ``version`` says (``{}`` when there is none, or it is unreadable: it still holds its number)."""
        try:
            return json.loads(self.fs.cat_file(self._path(model, CLAIMS, version)))
        except (FileNotFoundError, ValueError):
            return {}

    def _claim_names(self, model: str) -> list[str]:
        """The names in ``.claims/`` (one listing, no reads): ``<version>`` and ``<version>.settled``."""
        folder = self._path(model, CLAIMS)
        return [Path(p).name for p in self.fs.ls(folder, detail=False)] if self.fs.exists(folder) else []

    def _next_number(self, model: str) -> str:
        taken = [int(n) for n in self._numbered_folders(model)]
        if not self.is_local:
            taken += [int(n) for n in self._claim_names(model) if n.isdigit()]
        return str(max(taken, default=0) + 1)

    def _numbered_folders(self, model: str) -> list[str]:
        folder = self._path(model)
        if not self.fs.exists(folder):
            self._check_bucket()
            return []
        return [name for name in (Path(p).name for p in self.fs.ls(folder, detail=False)) if name.isdigit()]

    def _is_complete(self, model: str, version: str) -> bool:
        return self.fs.exists(self._path(model, version, METADATA))

    def _check_bucket(self) -> None:
        """On an object store, an absent folder is either new or in a bucket that does not exist: tell them apart."""
        bucket = self._root_path.lstrip("/").split("/", 1)[0]
        if not self.is_local and bucket and not self.fs.exists(bucket):
            raise StorageError(f"registry {self.root}: the bucket {bucket!r} does not exist")

    def _contention(self, model: str) -> StorageUnavailable:
        return StorageUnavailable(
            f"registry {self.root}: other writers took each of {VERSION_ATTEMPTS} version numbers of {model!r} "
            "tried; register again"
        )

    @contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """The store's own errors as kfloop's: refused for good, or not answering (retry)."""
        try:
            yield
        except KfloopError:
            raise
        except PermissionError as exc:
            raise StorageError(
                f"registry {self.root}: the storage refused the credentials ({exc}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the store's own)"
            ) from exc
        except FileNotFoundError as exc:
            if _s3_error_code(exc) == "NoSuchBucket" or "bucket does not exist" in str(exc):
                raise StorageError(f"registry {self.root}: the bucket does not exist ({exc})") from exc
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith(("botocore", "aiobotocore")):
                raise
            if "Credential" in type(exc).__name__:
                raise StorageError(f"registry {self.root}: no usable credentials ({exc})") from exc
            raise StorageUnavailable(f"registry {self.root}: the storage did not answer ({exc})") from exc

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

    def _write_json(self, path: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, indent=2, sort_keys=True)
        if self.is_local:
            atomic_write(path, text)
            return
        with self._storage_errors():
            self.fs.pipe_file(path, text.encode())  # one PUT: an object is replaced whole


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an error s3fs raised (it keeps botocore's ``ClientError`` as the cause)."""
    response = getattr(exc.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None
