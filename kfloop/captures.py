"""The registry's captures area: payload rows kept for the next training, and training sets built from them.

Layout, under ``<registry>/<model>/captures/`` (:meth:`ModelRegistry.captures
<kfloop.registry.ModelRegistry.captures>` hands out a :class:`CaptureArea`)::

    <YYYYMMDD>/<time>-<uuid>.npz         rows the watch captured (:class:`CapturedRows`)
    <YYYYMMDD>/<time>-<uuid>.npz.meta.json   model versions, capture times, rows
    **/labelled*.csv                     labelled shards: id,label,<features>

The id of a captured row is its payload event's ``ce-id`` and the row's
position in it. Captured rows are kept as NumPy arrays (float64, exactly as
received): writing them costs microseconds a row, where CSV text costs the
watch's whole budget (about 150 us a row for 192 features) at the rates it
must keep up with. Labelled rows -- captured rows with their labels
(:meth:`CaptureArea.read` then :meth:`CaptureArea.add_labelled`) -- are CSV
shards that the data loader reads, and training data. Every shard is written
whole under a temporary name and renamed, so a reader never sees half of one.

A *training set* is the base data plus the labelled shards, as one folder of
shards in one schema (:func:`assemble_training_set`): the base written as
``000-base.csv`` (whatever its format) and the shards beside it. A version
trained on such a folder names it as its data source, and its
``000-base.csv`` is the next run's base (:func:`training_base`), so shards
are never added twice.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np
from prometheus_client import Counter

from kfloop.data import LABEL_COLUMN, LabelledData, load_dataset, save_csv
from kfloop.durable import atomic_write

__all__ = [
    "BASE_SHARD",
    "CAPTURES",
    "LABELLED_SHARDS",
    "CaptureArea",
    "CapturedRows",
    "PayloadCapture",
    "assemble_training_set",
    "training_base",
]

CAPTURES = "captures"
CAPTURED_SUFFIX = ".npz"
LABELLED_SHARDS = "labelled*.csv"  # capture shards with a ``label`` column added
BASE_SHARD = "000-base.csv"

CAPTURED_ROWS = Counter("kfloop_captured_rows", "Rows written to capture shards.", ["model"])


class CaptureArea:
    """One model's captures folder (``uri``); ``is_local`` when it is a path on this machine."""

    def __init__(self, uri: str, model: str, *, is_local: bool) -> None:
        self.uri = uri.rstrip("/")
        self.model = model
        self.is_local = is_local

    def writer(self, feature_names: Sequence[str], *, flush_rows: int = 500, flush_seconds: float = 30.0) -> "PayloadCapture":
        """A buffer that writes captured rows as shards of this area."""
        return PayloadCapture(self, feature_names, flush_rows=flush_rows, flush_seconds=flush_seconds)

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

    def add_labelled(self, data: LabelledData, *, folder: str = "labelled") -> Path:
        """Store labelled rows as a new labelled shard (local areas); returns its path."""
        target = Path(self.uri) / folder / f"labelled-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        save_csv(data, buffer)
        atomic_write(target, buffer.getvalue())
        return target


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
    Safe to share between threads."""

    def __init__(self, area: CaptureArea, feature_names: Sequence[str], *, flush_rows: int = 500, flush_seconds: float = 30.0) -> None:
        self.area = area
        self.model = area.model
        self.feature_names = list(feature_names)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._rows: list[tuple[str, str, str, np.ndarray]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def add(self, ids: Sequence[str], rows: np.ndarray, version: str) -> bool:
        """Buffer rows; returns whether a shard is due (then call :meth:`flush`)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._rows.extend((row_id, stamp, version, row) for row_id, row in zip(ids, rows))
        return self.due()

    def due(self) -> bool:
        """Whether ``flush_rows`` rows are buffered or ``flush_seconds`` passed with rows waiting."""
        buffered = len(self._rows)
        return buffered >= self.flush_rows or (buffered > 0 and time.monotonic() - self._last_flush >= self.flush_seconds)

    def flush(self) -> str | None:
        """Write buffered rows as one shard; returns its URI (None when empty)."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._rows:
                return None
            rows, self._rows = self._rows, []
        arrays = io.BytesIO()
        np.savez(arrays, ids=np.array([row_id for row_id, _, _, _ in rows]), features=np.vstack([r for _, _, _, r in rows]),
                 feature_names=np.array(self.feature_names), versions=np.array([v for _, _, v, _ in rows]),
                 captured_at=np.array([t for _, t, _, _ in rows]))
        meta = {
            "model": self.model,
            "model_versions": sorted({version for _, _, version, _ in rows}),
            "first_captured_at": rows[0][1],
            "last_captured_at": rows[-1][1],
            "rows": len(rows),
        }
        now = datetime.now(timezone.utc)
        name = f"{self.area.uri}/{now:%Y%m%d}/{now:%H%M%S%f}-{uuid.uuid4().hex[:8]}{CAPTURED_SUFFIX}"
        if self.area.is_local:
            atomic_write(name + ".meta.json", json.dumps(meta))
            atomic_write(name, arrays.getvalue())
        else:
            fs, path = fsspec.core.url_to_fs(name)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path + ".meta.json", "w") as handle:
                json.dump(meta, handle)
            with fs.open(path + ".tmp", "wb") as handle:
                handle.write(arrays.getvalue())
            fs.mv(path + ".tmp", path)
        CAPTURED_ROWS.labels(self.model).inc(len(rows))
        return name


def training_base(source: str, target: str | None) -> tuple[str, str | None]:
    """The base data of a version trained on ``source`` (label column ``target``): a folder that
    :func:`assemble_training_set` wrote stands for its ``000-base.csv`` alone."""
    if (Path(source) / BASE_SHARD).is_file():
        return str(Path(source) / BASE_SHARD), LABEL_COLUMN
    return source, target


def assemble_training_set(base: str, target: str | None, shards: Sequence[Path], folder: Path) -> tuple[str, str]:
    """Write ``base`` (any format :func:`~kfloop.data.load_dataset` reads) and ``shards`` into
    ``folder`` as one set of ``id,label,<features>`` shards; returns its URI and label column.

    The folder is emptied first, so a run restarted after a crash starts from a clean folder.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_csv(load_dataset(base, target=target), str(folder / BASE_SHARD), id_prefix="base-")
    for index, shard in enumerate(shards, start=1):
        shutil.copyfile(shard, folder / f"{index:03d}-{shard.name}")
    return str(folder), LABEL_COLUMN
