"""The registry's captures area: payload rows kept for the next training.

Owns one model's ``<registry>/<model>/captures/`` folder: :class:`CaptureArea` lists, reads and stores its
shards (captured ``.npz`` rows, :class:`CapturedRows`; labelled ``labelled*.csv`` rows) and enforces its
:class:`CaptureRetention`; :class:`PayloadCapture` buffers captured rows and writes them as shards,
journalling them first (:mod:`kfloop.capture_journal`), so a restart loses none. Training sets made of
base data and labelled shards: :mod:`kfloop.training_sets`.
:meth:`ModelRegistry.captures <kfloop.registry.ModelRegistry.captures>` hands out the area; the watch
(:mod:`kfloop.serving.watch`) captures and replays rows; :mod:`kfloop.labels` writes labelled shards;
:mod:`kfloop.policies.spec` builds the retention from the policy's ``captures`` section. Layout, journal,
retention order: docs/captures.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import fsspec
import numpy as np
from prometheus_client import Counter, Gauge

from kfloop.data import LabelledData, save_csv
from kfloop.durable import atomic_write, fsync_folder
from kfloop.errors import InputError, TemporaryError
from kfloop.capture_journal import CaptureJournal, JournalEntry, Row
from kfloop.retry import Backoff

__all__ = [
    "BASE_SHARD",
    "CAPTURES",
    "LABELLED_SHARDS",
    "CaptureArea",
    "CaptureRetention",
    "CapturedRows",
    "PayloadCapture",
    "RetentionSweep",
]

CAPTURES = "captures"
CAPTURED_SUFFIX = ".npz"
META_SUFFIX = ".meta.json"
LABELLED_SHARDS = "labelled*.csv"  # capture shards with a ``label`` column added
BASE_SHARD = "000-base.csv"
SWEEP_SLACK = 0.05  # a writer's sweep over max_bytes frees this share of it more: not one sweep per shard
SHARD_BACKOFF = Backoff((0.5, 1.0, 2.0, 4.0, 5.0))  # waits between attempts to write a shard that failed
STALE_SECONDS = 3600  # a temporary file or a shard's lone meta file this old is a crash's leftover

CAPTURED_ROWS = Counter("kfloop_captured_rows", "Rows written to capture shards.", ["model"])
BUFFERED_ROWS = Gauge("kfloop_capture_buffered_rows", "Captured rows waiting for their shard.", ["model"])
FLUSH_FAILURES = Counter("kfloop_capture_flush_failures", "Capture shards that could not be written (rows kept).", ["model"])
REMOVED_SHARDS = Counter("kfloop_capture_retention_removed_shards", "Shards the retention deleted, by kind.", ["model", "kind"])
REMOVED_BYTES = Counter("kfloop_capture_retention_removed_bytes", "Bytes the retention deleted, by kind.", ["model", "kind"])
STORED_BYTES = Gauge("kfloop_capture_stored_bytes", "Bytes of the captures area after the last retention sweep.", ["model"])
STORED_SHARDS = Gauge("kfloop_capture_stored_shards", "Shards of the captures area after the last retention sweep.", ["model"])

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureRetention:
    """How much of a captures area is kept: at most ``max_bytes`` and nothing older than ``max_age_days``
    (None: no limit). The policy's ``captures`` section (:class:`kfloop.policies.spec.CapturePolicy`) checks them."""

    max_bytes: int | None = None
    max_age_days: float | None = None


@dataclass(frozen=True)
class RetentionSweep:
    """What one :meth:`CaptureArea.enforce` removed and kept."""

    removed_shards: int = 0
    removed_bytes: int = 0
    kept_shards: int = 0
    kept_bytes: int = 0


@dataclass(frozen=True)
class _Stored:
    """One shard on disk: its files (a captured shard has its meta file), their bytes and age."""

    kind: str  # "captured" | "labelled"
    paths: tuple[Path, ...]
    size: int
    mtime: float


class CaptureArea:
    """One model's captures folder (``uri``); ``is_local`` when it is a path on this machine."""

    def __init__(self, uri: str, model: str, *, is_local: bool) -> None:
        self.uri = uri.rstrip("/")
        self.model = model
        self.is_local = is_local

    def writer(self, feature_names: Sequence[str], *, flush_rows: int = 500, flush_seconds: float = 30.0,
               journal: Path | None = None, retention: CaptureRetention | None = None) -> "PayloadCapture":
        """A buffer that writes captured rows as shards of this area (see :class:`PayloadCapture`)."""
        return PayloadCapture(self, feature_names, flush_rows=flush_rows, flush_seconds=flush_seconds,
                              journal=journal, retention=retention)

    def captured_shards(self) -> list[Path]:
        """Every shard of captured rows, oldest first (a remote area has none that a local run can read)."""
        if not self.is_local or not Path(self.uri).exists():
            return []
        return sorted(Path(self.uri).rglob(f"*{CAPTURED_SUFFIX}"))

    @staticmethod
    def read(shard: Path) -> "CapturedRows":
        """The rows of one captured shard."""
        with np.load(shard, allow_pickle=False) as arrays:
            return CapturedRows(tuple(arrays["ids"].tolist()), arrays["features"], tuple(arrays["feature_names"].tolist()),
                                tuple(arrays["versions"].tolist()), tuple(arrays["captured_at"].tolist()))

    def labelled_shards(self) -> list[Path]:
        """Every labelled shard, in name order (a remote area has none that a local run can read)."""
        if not self.is_local or not Path(self.uri).exists():
            return []
        return sorted(Path(self.uri).rglob(LABELLED_SHARDS))

    def add_labelled(self, data: LabelledData, *, folder: str = "labelled", name: str | None = None,
                     meta: Mapping[str, Any] | None = None) -> Path:
        """Store labelled rows as a labelled shard (local areas); returns its path.

        Its header is ``data``'s own features: those of the version its rows were captured for. ``name``
        (``labelled-...``; default: from the time) replaces a shard of that name whole; ``meta`` is written
        first, beside it, as ``<shard>.meta.json``, and goes with it when retention removes it.
        """
        stem = name or f"labelled-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
        target = Path(self.uri) / folder / f"{stem}.csv"
        if not target.match(LABELLED_SHARDS):
            raise InputError(f"a labelled shard's name must match {LABELLED_SHARDS}, not {target.name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            atomic_write(target.with_name(target.name + META_SUFFIX), json.dumps(meta))
        buffer = io.StringIO()
        save_csv(data, buffer)
        atomic_write(target, buffer.getvalue())
        return target

    # --- retention ---------------------------------------------------------------------------

    def enforce(self, retention: CaptureRetention, *, now: float | None = None, slack: float = 0.0) -> RetentionSweep:
        """Delete what ``retention`` does not keep (docs/captures.md gives the order); a local area only.

        Over ``max_bytes``, shards go until the area holds at most ``(1 - slack) * max_bytes``, so that a
        writer that sweeps whenever the area is over its budget does not sweep after every shard.
        """
        root = Path(self.uri)
        if not self.is_local or not root.is_dir():
            return RetentionSweep()
        now = time.time() if now is None else now
        stored = self._stored(now)
        doomed: list[_Stored] = []
        if retention.max_age_days is not None:
            cutoff = now - retention.max_age_days * 86400
            doomed = [shard for shard in stored if shard.mtime < cutoff]
        kept = [shard for shard in stored if shard not in doomed]
        if retention.max_bytes is not None and sum(shard.size for shard in kept) > retention.max_bytes:
            total, target = sum(shard.size for shard in kept), retention.max_bytes * (1 - slack)
            for shard in sorted(kept, key=lambda s: (s.kind != "captured", s.mtime)):  # captured first, oldest first
                if total <= target:
                    break
                doomed.append(shard)
                total -= shard.size
            kept = [shard for shard in kept if shard not in doomed]
        removed_bytes = 0
        for shard in doomed:
            for path in shard.paths:
                path.unlink(missing_ok=True)
            REMOVED_SHARDS.labels(self.model, shard.kind).inc()
            REMOVED_BYTES.labels(self.model, shard.kind).inc(shard.size)
            removed_bytes += shard.size
        if doomed:
            for folder in sorted({path.parent for shard in doomed for path in shard.paths}, reverse=True):
                if folder != root and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            fsync_folder(root)
            log.info("captures of %s: retention removed %d shards (%d bytes); %d shards (%d bytes) kept",
                     self.model, len(doomed), removed_bytes, len(kept), sum(s.size for s in kept))
        sweep = RetentionSweep(len(doomed), removed_bytes, len(kept), sum(shard.size for shard in kept))
        STORED_BYTES.labels(self.model).set(sweep.kept_bytes)
        STORED_SHARDS.labels(self.model).set(sweep.kept_shards)
        return sweep

    def _stored(self, now: float) -> list[_Stored]:
        """Every shard of the area; a crash's leftovers (temporary files, a meta file without its shard)
        older than :data:`STALE_SECONDS` are deleted on the way."""
        found: list[_Stored] = []
        for path in Path(self.uri).rglob("*"):
            try:
                if not path.is_file():
                    continue
                info = path.stat()
                name = path.name
                if name.endswith(CAPTURED_SUFFIX):
                    meta = path.with_name(name + META_SUFFIX)
                    size = info.st_size + (meta.stat().st_size if meta.exists() else 0)
                    found.append(_Stored("captured", (path, meta), size, info.st_mtime))
                elif path.match(LABELLED_SHARDS):
                    meta = path.with_name(name + META_SUFFIX)
                    size = info.st_size + (meta.stat().st_size if meta.exists() else 0)
                    found.append(_Stored("labelled", (path, meta), size, info.st_mtime))
                elif now - info.st_mtime > STALE_SECONDS and (
                        (name.startswith(".") and ".tmp-" in name)
                        or (name.endswith(META_SUFFIX) and not path.with_name(name[: -len(META_SUFFIX)]).exists())):
                    path.unlink(missing_ok=True)
            except FileNotFoundError:  # removed meanwhile (a writer's rename, another sweep)
                continue
        return found


@dataclass(frozen=True)
class CapturedRows:
    """The rows of one captured shard: their ids, features (float64), the versions serving and when."""

    ids: tuple[str, ...]
    features: np.ndarray
    feature_names: tuple[str, ...]
    versions: tuple[str, ...]
    captured_at: tuple[str, ...]

    def labelled(self, labels: Sequence[str], source: str = "captures") -> LabelledData:
        """These rows with their ``labels`` (one per row): what :meth:`CaptureArea.add_labelled` stores."""
        return LabelledData(self.features, np.asarray(labels, dtype=str), self.feature_names, source, ids=np.asarray(self.ids))


class PayloadCapture:
    """Buffers rows; a shard is due every ``flush_rows`` rows or ``flush_seconds`` seconds, and
    :meth:`flush` writes it (the caller decides where: the watch writes on its worker thread).
    With a ``journal`` folder every add is journaled first (docs/captures.md). Safe to share between threads.

    ``max_buffered_rows`` (default 20 shards' worth) bounds the buffer while shards cannot be written;
    ``retention`` is enforced after flushes, at most every ``retention_seconds`` (docs/captures.md).
    """

    def __init__(self, area: CaptureArea, feature_names: Sequence[str], *, flush_rows: int = 500, flush_seconds: float = 30.0,
                 journal: Path | None = None, max_buffered_rows: int | None = None,
                 retention: CaptureRetention | None = None, retention_seconds: float = 60.0) -> None:
        self.area = area
        self.model = area.model
        self.feature_names = tuple(feature_names)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_buffered_rows = max_buffered_rows or 20 * flush_rows
        self.retention = retention
        self.retention_seconds = retention_seconds
        self.last_error: str | None = None
        self._rows: list[Row] = []
        self._last_flush = time.monotonic()
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()  # the buffer and the journal's current segment
        self._flush_lock = threading.Lock()  # one flush at a time: segments are marked in the order they were sealed
        self._swept_at = float("-inf")
        self._kept_bytes = 0
        self._journal = CaptureJournal(Path(journal)) if journal is not None else None
        self._buffered_gauge = BUFFERED_ROWS.labels(self.model)
        self.recovered_tags: list[str] = []
        self._recovered: list[JournalEntry] = []
        if self._journal is not None:
            self._rows, self.recovered_tags, self._recovered = self._journal.recover()
            if self._rows:
                log.warning("captures of %s: %d rows journaled before a restart are buffered again", self.model, len(self._rows))
        self._buffered_gauge.set(len(self._rows))

    def follow(self, feature_names: Sequence[str]) -> None:
        """Rows added from now on have these features (the serving version changed)."""
        with self._lock:
            self.feature_names = tuple(feature_names)

    def add(self, ids: Sequence[str], rows: np.ndarray, version: str, *, tag: str | None = None) -> bool:
        """Journal (with ``tag``) and buffer rows; returns whether a shard is due (then call :meth:`flush`).

        A :class:`~kfloop.errors.TemporaryError` when the rows cannot be kept (journal not writable, buffer
        full because shards cannot be written): then nothing was buffered.
        """
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            if len(self._rows) >= self.max_buffered_rows:
                raise TemporaryError(f"captures of {self.model}: {len(self._rows)} rows wait for a shard that cannot be "
                                     f"written ({self.last_error or 'none written yet'}); try again later")
            names = self.feature_names
            if rows.shape[1] != len(names):  # never let a row of another schema into a shard
                raise InputError(f"captures of {self.model}: rows have {rows.shape[1]} features, the schema {len(names)}")
            if self._journal is not None:
                try:
                    self._journal.append(names, ids, rows, version, stamp, tag)
                except OSError as exc:
                    raise TemporaryError(f"captures of {self.model}: rows cannot be journaled in {self._journal.folder} "
                                         f"({exc.strerror or exc}); try again later") from exc
            self._rows.extend((names, row_id, stamp, version, row) for row_id, row in zip(ids, rows))
            buffered = len(self._rows)
        self._buffered_gauge.set(buffered)
        return self.due()

    def mark(self, row_id: str, label: str) -> None:
        """Journal a mark on the row ``row_id`` (added before), for :meth:`take_recovered` after a restart;
        a no-op without a journal. An ``OSError`` when it cannot be written (nothing else changes then)."""
        if self._journal is not None:
            with self._lock:
                self._journal.mark(row_id, label)

    def take_recovered(self) -> list[JournalEntry]:
        """Every add and mark the journal held when this capture started, in the order they were journaled --
        the adds of written segments still on disk too (their rows are not buffered again); handed over once."""
        recovered, self._recovered = self._recovered, []
        return recovered

    def due(self) -> bool:
        """Whether ``flush_rows`` rows are buffered or ``flush_seconds`` passed with rows waiting
        (after a failed flush: not before its back-off has passed)."""
        buffered = len(self._rows)
        now = time.monotonic()
        if buffered == 0 or now < self._retry_at:
            return False
        return buffered >= self.flush_rows or now - self._last_flush >= self.flush_seconds

    @property
    def buffered(self) -> int:
        return len(self._rows)

    def sync(self) -> None:
        """Make every journaled add durable (fsync); a no-op without a journal."""
        if self._journal is not None:
            with self._lock:
                handle = self._journal.duplicate()
            if handle is not None:
                try:
                    os.fsync(handle)
                finally:
                    os.close(handle)

    def flush(self) -> str | None:
        """Write buffered rows as shards (one per feature schema); returns the last one's URI (None when empty).

        On failure the rows stay buffered (and journaled), the next attempt waits a back-off, and the
        error is raised.
        """
        with self._flush_lock:
            with self._lock:
                self._last_flush = time.monotonic()
                if not self._rows:
                    return None
                rows, self._rows = self._rows, []
                sealed = self._journal.seal() if self._journal is not None else []
            written, done, size = None, 0, 0
            try:
                for group in _schema_groups(rows):
                    written, group_size = self._write(group)
                    done += len(group)
                    size += group_size
            except BaseException as exc:
                with self._lock:
                    self._rows[:0] = rows[done:]  # back in front: order kept, nothing lost
                    buffered = len(self._rows)
                if self._journal is not None:  # they wait in the journal now: make it durable
                    try:
                        self._journal.sync_sealed()
                    except OSError:
                        log.exception("captures of %s: journal fsync failed", self.model)
                self._failures += 1
                self._retry_at = time.monotonic() + SHARD_BACKOFF.delay(self._failures)
                self.last_error = f"{type(exc).__name__}: {exc}"
                FLUSH_FAILURES.labels(self.model).inc()
                self._buffered_gauge.set(buffered)
                if done:  # rows already written stay out of the buffer; their journal goes with the next flush
                    log.warning("captures of %s: %d of %d rows written before the failure", self.model, done, len(rows))
                raise
            self._failures, self._retry_at, self.last_error = 0, 0.0, None
            if self._journal is not None:
                self._journal.mark_written(sealed)  # the shard is durable: no need to fsync their journal
            self._buffered_gauge.set(len(self._rows))
            self._sweep(size)
        return written

    def release(self, *, keep_rows: int = 0) -> None:
        """Delete the journal of rows already in shards: call once their tags are durable elsewhere.
        The newest segments holding the last ``keep_rows`` rows are kept, for :meth:`take_recovered`."""
        if self._journal is not None:
            with self._lock:  # the current segment's rows count too
                doomed = self._journal.releasable(keep_rows)
            for segment in doomed:  # outside the lock: adds do not wait for the unlinks
                segment.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the journal (buffered rows stay in it for the next start)."""
        if self._journal is not None:
            with self._lock:
                self._journal.close()

    def _write(self, rows: list[Row]) -> tuple[str, int]:
        arrays = io.BytesIO()
        np.savez(arrays, ids=np.array([row_id for _, row_id, _, _, _ in rows]), features=np.vstack([r for *_, r in rows]),
                 feature_names=np.array(rows[0][0]), versions=np.array([v for _, _, _, v, _ in rows]),
                 captured_at=np.array([t for _, _, t, _, _ in rows]))
        meta = {
            "model": self.model,
            "model_versions": sorted({version for _, _, _, version, _ in rows}),
            "first_captured_at": rows[0][2],
            "last_captured_at": rows[-1][2],
            "rows": len(rows),
        }
        now = datetime.now(timezone.utc)
        name = f"{self.area.uri}/{now:%Y%m%d}/{now:%H%M%S%f}-{uuid.uuid4().hex[:8]}{CAPTURED_SUFFIX}"
        if self.area.is_local:
            atomic_write(name + META_SUFFIX, json.dumps(meta))
            atomic_write(name, arrays.getvalue())
        else:
            fs, path = fsspec.core.url_to_fs(name)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path + META_SUFFIX, "w") as handle:
                json.dump(meta, handle)
            with fs.open(path + ".tmp", "wb") as handle:
                handle.write(arrays.getvalue())
            fs.mv(path + ".tmp", path)
        CAPTURED_ROWS.labels(self.model).inc(len(rows))
        return name, arrays.getbuffer().nbytes

    def _sweep(self, written_bytes: int) -> None:
        """Enforce the retention when it is due: every ``retention_seconds``, or sooner when the bytes
        written since the last sweep would break ``max_bytes``. A failed sweep is logged, not raised."""
        if self.retention is None or not self.area.is_local:
            return
        self._kept_bytes += written_bytes
        over = self.retention.max_bytes is not None and self._kept_bytes > self.retention.max_bytes
        if not over and time.monotonic() - self._swept_at < self.retention_seconds:
            return
        self._swept_at = time.monotonic()
        try:
            self._kept_bytes = self.area.enforce(self.retention, slack=SWEEP_SLACK).kept_bytes
        except OSError:
            log.exception("captures of %s: retention sweep failed; trying again after the next shard", self.model)


def _schema_groups(rows: list[Row]) -> Iterator[list[Row]]:
    """Runs of rows with the same feature names, in order."""
    start = 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or rows[index][0] != rows[start][0]:
            yield rows[start:index]
            start = index
