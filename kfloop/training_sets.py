"""Training sets: base data plus labelled capture shards, made one set of ``id,label,<features>`` shards.

:func:`assemble_training_set` writes the set (truth correction: the newest label of a row wins, and a labelled
row with exactly a base row's features relabels it); :func:`training_base` finds the base of a version trained
on such a set. Called by the retraining worker (:mod:`kfloop.policies.retraining`) before it starts a run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from kfloop.captures import BASE_SHARD, META_SUFFIX
from kfloop.data import LABEL_COLUMN, LabelledData, load_dataset, save_csv

__all__ = ["assemble_training_set", "training_base"]

log = logging.getLogger(__name__)


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
