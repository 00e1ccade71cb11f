"""The registry's captures area: payload rows kept for the next training, and training sets built from them.

Owns one model's ``<registry>/<model>/captures/`` folder: :class:`CaptureArea` lists, reads and stores its
shards (captured ``.npz`` rows, :class:`CapturedRows`; labelled ``labelled*.csv`` rows) and enforces its
:class:`CaptureRetention`; :class:`PayloadCapture` buffers captured rows, writes them as shards and
journals them first, so a restart loses none (:class:`JournaledRows`, :class:`JournalMark`);
:func:`assemble_training_set` and :func:`training_base` make base data plus labelled shards one training set.
:meth:`ModelRegistry.captures <kfloop.registry.ModelRegistry.captures>` hands out the area; the watch
(:mod:`kfloop.serving.watch`) captures, journals and replays rows; :mod:`kfloop.labels` writes labelled
shards; :mod:`kfloop.policies.retraining` builds training sets; :mod:`kfloop.policies.spec` builds the
retention from the policy's ``captures`` section. Layout, journal, retention order: docs/captures.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import fsspec
import numpy as np
import orjson
from prometheus_client import Counter, Gauge

from kfloop.data import LABEL_COLUMN, LabelledData, load_dataset, save_csv
from kfloop.durable import TornAppend, append_whole, atomic_write, fsync_folder
from kfloop.errors import InputError, TemporaryError
from kfloop.retry import Backoff

__all__ = [
    "BASE_SHARD",
    "CAPTURES",
    "LABELLED_SHARDS",
    "CaptureArea",
    "CaptureRetention",
    "CapturedRows",
    "JournalEntry",
    "JournalMark",
    "JournaledRows",
    "PayloadCapture",
    "RetentionSweep",
    "assemble_training_set",
    "training_base",
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


# One buffered row: the feature names it has, its id, when it came, the version serving, its values.
_Row = tuple[tuple[str, ...], str, str, str, np.ndarray]


@dataclass(frozen=True)
class JournaledRows:
    """One add as the journal replays it after a restart: row ids, rows (float64, as received), their
    features, the version serving then and when they were captured (epoch seconds)."""

    ids: tuple[str, ...]
    rows: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...]
    version: str
    captured_at: float


@dataclass(frozen=True)
class JournalMark:
    """A caller's mark on a journaled row (:meth:`PayloadCapture.mark`), as the journal replays it after a restart."""

    row_id: str
    label: str


JournalEntry = JournaledRows | JournalMark


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
        self._rows: list[_Row] = []
        self._last_flush = time.monotonic()
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()  # the buffer and the journal's current segment
        self._flush_lock = threading.Lock()  # one flush at a time: segments are marked in the order they were sealed
        self._swept_at = float("-inf")
        self._kept_bytes = 0
        self._journal = _Journal(Path(journal)) if journal is not None else None
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

    def _write(self, rows: list[_Row]) -> tuple[str, int]:
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


def _schema_groups(rows: list[_Row]) -> Iterator[list[_Row]]:
    """Runs of rows with the same feature names, in order."""
    start = 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or rows[index][0] != rows[start][0]:
            yield rows[start:index]
            start = index


class _Journal:
    """The write-ahead journal of one :class:`PayloadCapture`: segments ``<seq>.wal`` / ``<seq>.written``.

    A record is ``<u32 length><u32 crc32><kind><body>``: kind ``S`` the feature names of the rows after it
    (JSON), kind ``R`` one add (``<u32 header length><JSON ids, version, stamp, tag><float64 rows>``), kind
    ``M`` a mark (``<JSON row, label>``). Reading a segment stops at its first torn or corrupt record.
    Not thread-safe: the capture's locks guard it.
    """

    HEADER = struct.Struct("<II")
    WAL, WRITTEN = ".wal", ".written"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None  # the current segment
        self._path: Path | None = None
        self._sequence = 0  # the current segment's number
        self._size = 0
        self._names: tuple[str, ...] | None = None  # the schema last recorded in the current segment
        self._pending: list[Path] = []  # sealed segments whose rows are not in a shard yet
        self._unsynced: list[int] = []  # sealed segments' descriptors, fsynced and closed by sync_sealed
        self._counts: dict[int, int] = {}  # rows in each segment, by sequence number (what release keeps)
        self._next = 1 + max((int(p.stem) for p in self._segments()), default=0)

    def _segments(self) -> list[Path]:
        return sorted((p for p in self.folder.iterdir() if p.suffix in (self.WAL, self.WRITTEN) and p.stem.isdigit()),
                      key=lambda p: int(p.stem))

    def recover(self) -> tuple[list[_Row], list[str], list[JournalEntry]]:
        """Rows of every ``.wal`` segment (they become pending), the tags of every segment, and every
        segment's adds and marks in order."""
        rows: list[_Row] = []
        tags: list[str] = []
        entries: list[JournalEntry] = []
        for segment in self._segments():
            written = segment.suffix == self.WRITTEN
            count = 0
            for names, header, values in self._records(segment):
                if values is None:
                    entries.append(JournalMark(str(header["row"]), str(header["label"])))
                    continue
                if header.get("tag"):
                    tags.append(header["tag"])
                count += len(values)
                entries.append(JournaledRows(tuple(header["ids"]), values, names, header["version"],
                                             datetime.fromisoformat(header["at"]).timestamp()))
                if not written:
                    rows.extend((names, row_id, header["at"], header["version"], row) for row_id, row in zip(header["ids"], values))
            self._counts[int(segment.stem)] = count
            if not written:
                self._pending.append(segment)
        return rows, tags, entries

    def _records(self, segment: Path) -> Iterator[tuple[tuple[str, ...], dict, np.ndarray | None]]:
        """The segment's adds (names, header, rows) and marks (names, header, None), up to a torn record."""
        data = segment.read_bytes()
        offset, names = 0, None
        while offset + self.HEADER.size <= len(data):
            length, crc = self.HEADER.unpack_from(data, offset)
            body = data[offset + self.HEADER.size: offset + self.HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc or not body:
                log.warning("capture journal %s: torn or corrupt record at byte %d; the rest of the segment is skipped", segment, offset)
                return
            offset += self.HEADER.size + length
            if body[:1] == b"S":
                names = tuple(orjson.loads(body[1:]))
            elif body[:1] == b"R" and names is not None:
                (size,) = struct.unpack_from("<I", body, 1)
                header = orjson.loads(body[5:5 + size])
                values = np.frombuffer(body[5 + size:], dtype=np.float64).reshape(len(header["ids"]), len(names))
                yield names, header, values
            elif body[:1] == b"M":
                yield names or (), orjson.loads(body[1:]), None
            else:
                log.warning("capture journal %s: unknown record at byte %d; the rest of the segment is skipped", segment, offset)
                return

    def append(self, names: tuple[str, ...], ids: Sequence[str], rows: np.ndarray, version: str, stamp: str,
               tag: str | None) -> None:
        """Append one add in one write; on failure the segment is cut back to where it was, and the error raised."""
        self._open()
        header = orjson.dumps({"ids": list(ids), "version": version, "at": stamp, "tag": tag})
        body = b"R" + struct.pack("<I", len(header)) + header + np.ascontiguousarray(rows, dtype=np.float64).tobytes()
        record = self.HEADER.pack(len(body), zlib.crc32(body)) + body
        if names is not self._names and names != self._names:
            schema = b"S" + orjson.dumps(list(names))
            record = self.HEADER.pack(len(schema), zlib.crc32(schema)) + schema + record
        self._write(record)
        self._names = names
        self._counts[self._sequence] = self._counts.get(self._sequence, 0) + len(ids)

    def mark(self, row_id: str, label: str) -> None:
        """Append a mark on a row, like an add (one write, cut back on failure)."""
        self._open()
        body = b"M" + orjson.dumps({"row": row_id, "label": label})
        self._write(self.HEADER.pack(len(body), zlib.crc32(body)) + body)

    def _open(self) -> None:
        """Start a new current segment if there is none."""
        if self._fd is None:
            self._sequence = self._next
            self._path = self.folder / f"{self._sequence:012d}{self.WAL}"
            self._next += 1
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size, self._names = 0, None
            self._pending.append(self._path)

    def _write(self, record: bytes) -> None:
        assert self._fd is not None
        try:
            append_whole(self._fd, record, self._size)  # no torn record left behind for the next add
        except TornAppend:
            self._abandon()  # cannot cut it back: later adds go to a new segment
            raise
        self._size += len(record)

    def _abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._path = None, None

    def duplicate(self) -> int | None:
        """A descriptor of the current segment (for an fsync outside the capture's lock)."""
        return os.dup(self._fd) if self._fd is not None else None

    def seal(self) -> list[Path]:
        """End the current segment; returns every pending segment (their rows are the buffer's)."""
        if self._fd is not None:
            self._unsynced.append(self._fd)
            self._fd, self._path = None, None
        return list(self._pending)

    def sync_sealed(self) -> None:
        """fsync and close the sealed segments' descriptors (when their rows must wait in them)."""
        while self._unsynced:
            handle = self._unsynced.pop()
            try:
                os.fsync(handle)
            finally:
                os.close(handle)

    def mark_written(self, segments: list[Path]) -> None:
        """Their rows are in shards now: keep only their tags (until :meth:`release`)."""
        while self._unsynced:
            os.close(self._unsynced.pop())
        for segment in segments:
            try:
                os.replace(segment, segment.with_suffix(self.WRITTEN))
            except FileNotFoundError:
                pass
            except OSError:
                log.exception("capture journal %s: cannot mark as written; a restart before the next flush "
                              "writes its rows again", segment)
                continue
            self._pending.remove(segment)
        fsync_folder(self.folder)

    def releasable(self, keep_rows: int = 0) -> list[Path]:
        """The written segments the caller may delete now: all but the newest that the last ``keep_rows`` rows are in."""
        doomed: list[Path] = []
        newer = 0  # rows in the segments after this one
        for segment in reversed(self._segments()):
            sequence = int(segment.stem)
            if segment.suffix == self.WRITTEN and newer >= keep_rows:
                doomed.append(segment)
                self._counts.pop(sequence, None)
            else:
                newer += self._counts.get(sequence, 0)
        return doomed

    def close(self) -> None:
        self.sync_sealed()
        if self._fd is not None:
            os.fsync(self._fd)
        self._abandon()


def training_base(source: str, target: str | None) -> tuple[str, str | None]:
    """The base data of a version trained on ``source`` (label column ``target``): a folder that
    :func:`assemble_training_set` wrote stands for its ``000-base.csv`` alone."""
    if (Path(source) / BASE_SHARD).is_file():
        return str(Path(source) / BASE_SHARD), LABEL_COLUMN
    return source, target


def assemble_training_set(base: str, target: str | None, shards: Sequence[Path], folder: Path) -> tuple[str, str]:
    """Write ``base`` (any format :func:`~kfloop.data.load_dataset` reads) and ``shards`` into
    ``folder`` as one set of ``id,label,<features>`` shards; returns its URI and label column.

    The base's features are the set's: a shard with them in another order or among others is
    written with the base's columns; a shard that lacks some is left out, with a warning (it
    was labelled for a version with other features). The folder is emptied first, so a run
    restarted after a crash starts from a clean folder.

    Truth correction: the newest label of a row wins -- by when it was labelled (a joined
    shard's ``.meta.json`` has each row's ``labelled_at``; other shards count as labelled when
    they were written). A labelled row whose features are exactly a base row's relabels that
    base row (the field's truth has changed, or corrected a mistake), and of a row labelled
    several times only the newest label is kept; such rows are not written again. So the set
    never teaches one row two classes, and the next run's base (this set's ``000-base.csv``)
    carries the correction on.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = load_dataset(base, target=target)
    aligned = [(shard, rows) for shard in shards if (rows := _aligned(shard, data.feature_names)) is not None]
    newest: dict[bytes, tuple[float, int, int, str]] = {}  # features -> (labelled at, shard, row, label): the newest
    keys = []
    for number, (shard, rows) in enumerate(aligned):
        keys.append(_row_keys(rows.features))
        for row, (key, at, label) in enumerate(zip(keys[-1], _labelled_times(shard, rows), rows.labels.tolist())):
            if key not in newest or (at, number, row) >= newest[key][:3]:
                newest[key] = (at, number, row, str(label))
    base_keys = _row_keys(data.features)
    labels = np.array([newest[key][3] if key in newest else label for key, label in zip(base_keys, data.labels.tolist())],
                      dtype=str)
    relabelled = int(np.sum(labels != data.labels))
    save_csv(LabelledData(data.features, labels, data.feature_names, data.source, ids=data.ids), str(folder / BASE_SHARD),
             id_prefix="base-")
    in_base, written, superseded = set(base_keys), 0, 0
    for number, ((shard, rows), shard_keys) in enumerate(zip(aligned, keys)):
        keep = np.array([key not in in_base and newest[key][1:3] == (number, row) for row, key in enumerate(shard_keys)],
                        dtype=bool)
        superseded += int((~keep).sum())
        if keep.any():
            written += 1
            ids = None if rows.ids is None else rows.ids[keep]
            save_csv(LabelledData(rows.features[keep], rows.labels[keep], data.feature_names, rows.source, ids=ids),
                     str(folder / f"{written:03d}-{shard.name}"))
    if relabelled or superseded:
        log.info("training set %s: %d base rows relabelled and %d labelled rows superseded by a newer label of the same "
                 "features", folder, relabelled, superseded)
    return str(folder), LABEL_COLUMN


def _aligned(shard: Path, feature_names: Sequence[str]) -> LabelledData | None:
    """A labelled shard's rows in ``feature_names``' columns; None (with a warning) if it lacks some."""
    rows = load_dataset(str(shard), target=LABEL_COLUMN)
    if not set(feature_names) <= set(rows.feature_names):
        missing = [feature for feature in feature_names if feature not in rows.feature_names]
        log.warning("labelled shard %s lacks %d of the base's features (%s...); left out of the training set",
                    shard, len(missing), ", ".join(missing[:3]))
        return None
    columns = [rows.feature_names.index(feature) for feature in feature_names]
    return LabelledData(np.ascontiguousarray(rows.features[:, columns]), rows.labels, tuple(feature_names), rows.source,
                        ids=rows.ids)


def _labelled_times(shard: Path, rows: LabelledData) -> list[float]:
    """When each row of a labelled shard was labelled: its ``.meta.json``'s ``labelled_at``, else the shard's write time."""
    written = shard.stat().st_mtime
    try:
        described = json.loads(shard.with_name(shard.name + META_SUFFIX).read_text()).get("rows", {})
    except (OSError, ValueError, AttributeError):
        described = {}
    ids = rows.ids if rows.ids is not None else [None] * rows.rows
    times = []
    for row_id in ids:
        entry = described.get(str(row_id)) if isinstance(described, dict) else None
        at = entry.get("labelled_at") if isinstance(entry, dict) else None
        times.append(float(at) if isinstance(at, (int, float)) else written)
    return times


def _row_keys(features: np.ndarray) -> list[bytes]:
    """Each row's exact float64 bytes: equal features, equal key (CSV shards keep every digit)."""
    return [row.tobytes() for row in np.ascontiguousarray(features, dtype=np.float64)]
