"""Labelled tabular data: one loader for every supported source, and its validation.

``load_dataset(uri)`` decides the format from what the URI holds:

* ``builtin:digits`` (the default, also ``builtin:iris`` / ``builtin:wine``):
  a data set scikit-learn ships, so nothing is downloaded;
* a Kaggle *leaf-classification* CSV (``id,species,margin1..texture64``);
* the UCI *One-hundred plant species leaves* files ``*data_Mar_64.txt``,
  ``*data_Sha_64.txt``, ``*data_Tex_64.txt`` in a folder or a ``.zip``;
* any CSV with a label column named by ``target``;
* a folder of CSV shards of one of the CSV formats (new labelled data arrives
  as new shards), concatenated in name order.

URIs are local paths or anything fsspec opens (``s3://``, ``gs://``,
``http(s)://``). Every problem raises :class:`~kfloop.errors.DataError` naming
the file, and where it applies the row (1-based line number in the file,
header = line 1) and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, TextIO

import numpy as np

from kfloop.errors import DataError

if TYPE_CHECKING:
    import fsspec
    import pandas as pd

BUILTIN_PREFIX = "builtin:"
DEFAULT_DATA_URI = "builtin:digits"
BUILTIN_DATASETS = ("digits", "iris", "wine")
KAGGLE_TARGET = "species"
ID_COLUMN = "id"
LABEL_COLUMN = "label"  # the label column of the CSV shards kfloop writes (labelled captures, retraining sets)
UCI_PARTS = (("margin", "data_Mar_64.txt"), ("shape", "data_Sha_64.txt"), ("texture", "data_Tex_64.txt"))
UCI_FEATURES_PER_PART = 64


@dataclass(frozen=True)
class LabelledData:
    """Feature matrix, string labels and their provenance."""

    features: np.ndarray  # float64, shape (rows, features)
    labels: np.ndarray  # str, shape (rows,)
    feature_names: tuple[str, ...]
    source: str
    ids: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    def fingerprint(self) -> str:
        """sha256 over features, labels and feature names: equal data, equal fingerprint."""
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.feature_names).encode())
        digest.update(np.ascontiguousarray(self.features, dtype=np.float64).tobytes())
        digest.update("\x1f".join(self.labels.tolist()).encode())
        return digest.hexdigest()


def load_dataset(uri: str | None = None, *, target: str | None = None) -> LabelledData:
    """Load and validate labelled data from ``uri`` (see the module docstring for formats)."""
    uri = uri or DEFAULT_DATA_URI
    if uri.startswith(BUILTIN_PREFIX):
        return _load_builtin(uri[len(BUILTIN_PREFIX):])
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise DataError("no such file or folder", source=uri)
    if fs.isdir(path):
        names = [PurePosixPath(p).name for p in fs.ls(path, detail=False)]
        if _uci_files(names):
            return _load_uci_folder(fs, path, uri, names)
        return _load_shards(fs, path, uri, target)
    if path.lower().endswith(".zip"):
        return _load_uci_zip(fs, path, uri)
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    return _parse_csv(raw, uri, target)


def check_class_counts(data: LabelledData, minimum: int) -> None:
    """Refuse data in which some class has fewer than ``minimum`` rows (stratified split + CV)."""
    labels, counts = np.unique(data.labels, return_counts=True)
    if len(labels) < 2:
        raise DataError(f"need at least 2 classes, found {len(labels)}", source=data.source)
    too_few = [(str(label), int(count)) for label, count in zip(labels, counts) if count < minimum]
    if too_few:
        shown = ", ".join(f"{label!r} ({count})" for label, count in too_few[:5])
        more = f" and {len(too_few) - 5} more" if len(too_few) > 5 else ""
        raise DataError(
            f"classes with too few rows for a stratified holdout and cross-validation "
            f"(need >= {minimum} each): {shown}{more}",
            source=data.source,
            column=None,
        )


def save_csv(data: LabelledData, path: str | TextIO, *, id_prefix: str = "") -> None:
    """Write ``data`` as a CSV shard ``id,label,<features>`` (to a file path or an open text
    handle) that :func:`load_dataset` reads back with ``target="label"``; rows without ids get
    ``<id_prefix><row>``."""
    if not isinstance(path, str):
        _write_csv(data, path, id_prefix)
        return
    with open(path, "w", newline="") as handle:
        _write_csv(data, handle, id_prefix)


def _write_csv(data: LabelledData, handle: TextIO, id_prefix: str) -> None:
    ids = data.ids if data.ids is not None else [f"{id_prefix}{index}" for index in range(data.rows)]
    writer = csv.writer(handle)
    writer.writerow([ID_COLUMN, LABEL_COLUMN, *data.feature_names])
    for row_id, label, row in zip(ids, data.labels, data.features):
        writer.writerow([row_id, label, *(repr(float(value)) for value in row)])


# --- formats ----------------------------------------------------------------------------------


def _load_builtin(name: str) -> LabelledData:
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "iris": datasets.load_iris, "wine": datasets.load_wine}
    if name not in loaders:
        raise DataError(
            f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}",
            source=BUILTIN_PREFIX + name,
        )
    bunch = loaders[name]()
    names = [str(n) for n in bunch.feature_names]
    labels = np.asarray([str(bunch.target_names[t]) for t in bunch.target], dtype=str)
    return LabelledData(
        features=np.asarray(bunch.data, dtype=np.float64),
        labels=labels,
        feature_names=tuple(names),
        source=BUILTIN_PREFIX + name,
    )


def load_feature_rows(uri: str, feature_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The columns ``feature_names`` of a CSV, labelled or not (other columns are left), and its ``id`` column
    if it has one: rows to explain or score. A :class:`DataError` names the file, and the row and column."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise DataError("no such file", source=uri)
    frame = _read_frame(fs.cat_file(path), uri)
    missing = [name for name in feature_names if name not in frame.columns]
    if missing:
        raise DataError(f"lacks {len(missing)} of the model's feature columns", source=uri, column=missing[0])
    features = np.column_stack([_numeric_column(frame[name], uri, name) for name in feature_names])
    return features, frame[ID_COLUMN].to_numpy(dtype=str) if ID_COLUMN in frame.columns else None


def _read_frame(raw: bytes, source: str) -> "pd.DataFrame":
    """A CSV file's cells as text (a :class:`DataError` for an empty or unreadable file)."""
    import pandas as pd

    if not raw.strip():
        raise DataError("file is empty", source=source)
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"not a readable CSV file ({str(exc).splitlines()[0]})", source=source) from None
    if frame.empty:
        raise DataError("has a header but no data rows", source=source)
    return frame


def _parse_csv(raw: bytes, source: str, target: str | None) -> LabelledData:
    frame = _read_frame(raw, source)
    if target is None:
        if KAGGLE_TARGET in frame.columns and ID_COLUMN in frame.columns:
            target = KAGGLE_TARGET
        else:
            raise DataError(
                "cannot tell which column is the label: pass --target COLUMN "
                f"(columns: {', '.join(frame.columns[:8])}{'...' if len(frame.columns) > 8 else ''})",
                source=source,
            )
    if target not in frame.columns:
        raise DataError("target column is missing", source=source, column=target)
    ids = frame[ID_COLUMN].to_numpy(dtype=str) if ID_COLUMN in frame.columns else None
    if ids is not None:
        _check_unique_ids(ids, source)
    labels = frame[target].str.strip()
    blank = np.flatnonzero(labels.to_numpy() == "")
    if blank.size:
        raise DataError("missing label", source=source, row=int(blank[0]) + 2, column=target)
    feature_names = [c for c in frame.columns if c not in (target, ID_COLUMN)]
    if not feature_names:
        raise DataError("no feature columns besides the label and id", source=source)
    try:  # one vectorised pass when every value is a number (kfloop's own shards, most files) ...
        features = frame[feature_names].to_numpy(dtype=np.float64)
    except ValueError:
        features = np.empty(0)
    if features.shape != (len(frame), len(feature_names)) or not np.isfinite(features).all():
        features = np.empty((len(frame), len(feature_names)), dtype=np.float64)
        for j, column in enumerate(feature_names):  # ... else column by column, to name the first bad value
            features[:, j] = _numeric_column(frame[column], source, column)
    return LabelledData(
        features=features,
        labels=labels.to_numpy(dtype=str),
        feature_names=tuple(feature_names),
        source=source,
        ids=ids,
    )


def _numeric_column(values: "pd.Series", source: str, column: str) -> np.ndarray:
    import pandas as pd

    stripped = values.str.strip()
    numbers = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        index = int(bad[0])
        text = stripped.iloc[index]
        if text == "" or text.lower() in ("nan", "na", "null", "none"):
            reason = "missing value (NaN): every feature needs a number"
        elif math.isnan(numbers[index]):
            reason = f"non-numeric value {text!r}: features must be numbers"
        else:
            reason = f"infinite value {text!r}: features must be finite"
        raise DataError(reason, source=source, row=index + 2, column=column)
    return numbers


def _check_unique_ids(ids: np.ndarray, source: str) -> None:
    seen: dict[str, int] = {}
    for index, value in enumerate(ids.tolist()):
        if value in seen:
            raise DataError(
                f"duplicate id {value!r} (first seen on row {seen[value] + 2})",
                source=source,
                row=index + 2,
                column=ID_COLUMN,
            )
        seen[value] = index


def _load_shards(fs: "fsspec.AbstractFileSystem", path: str, uri: str, target: str | None) -> LabelledData:
    shard_paths = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(".csv"))
    if not shard_paths:
        raise DataError(
            "folder holds no CSV shards and no UCI files (*data_Mar_64.txt, *data_Sha_64.txt, *data_Tex_64.txt)",
            source=uri,
        )
    shards = []
    for shard_path in shard_paths:
        name = f"{uri.rstrip('/')}/{PurePosixPath(shard_path).name}"
        with fs.open(shard_path, "rb") as handle:
            shards.append(_parse_csv(handle.read(), name, target))
    return concat(shards, source=uri)


def concat(parts: list[LabelledData], *, source: str) -> LabelledData:
    """Stack data sets of one schema (same feature names); ids, if any, stay unique."""
    first = parts[0]
    for part in parts[1:]:
        if part.feature_names != first.feature_names:
            missing = [n for n in first.feature_names if n not in part.feature_names]
            extra = [n for n in part.feature_names if n not in first.feature_names]
            detail = f"missing {missing[:5]}, extra {extra[:5]}" if missing or extra else "same names, other order"
            raise DataError(
                f"shard schema differs from {first.source}: {detail}", source=part.source
            )
        if (part.ids is None) != (first.ids is None):
            raise DataError(f"shard schema differs from {first.source}: only one has an 'id' column", source=part.source)
    ids = None
    if first.ids is not None:
        ids = np.concatenate([p.ids for p in parts])
        seen: dict[str, str] = {}
        for part in parts:
            for index, value in enumerate(part.ids.tolist()):
                if value in seen:
                    raise DataError(
                        f"duplicate id {value!r} (also in {seen[value]})",
                        source=part.source,
                        row=index + 2,
                        column=ID_COLUMN,
                    )
                seen[value] = part.source
    return LabelledData(
        features=np.vstack([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        feature_names=first.feature_names,
        source=source,
        ids=ids,
        notes=tuple(note for p in parts for note in p.notes),
    )


def _uci_files(names: list[str]) -> dict[str, str] | None:
    found = {}
    for part, suffix in UCI_PARTS:
        matches = [n for n in names if n.endswith(suffix)]
        if len(matches) > 1:
            raise DataError(f"several files end in {suffix}: {matches}")
        if matches:
            found[part] = matches[0]
    if not found:
        return None
    if len(found) < len(UCI_PARTS):
        missing = [suffix for part, suffix in UCI_PARTS if part not in found]
        raise DataError(f"UCI one-hundred-plant data is incomplete: missing {', '.join(missing)}")
    return found


def _load_uci_folder(fs: "fsspec.AbstractFileSystem", path: str, uri: str, names: list[str]) -> LabelledData:
    files = _uci_files(names)
    assert files is not None
    texts = {}
    for part, name in files.items():
        with fs.open(f"{path.rstrip('/')}/{name}", "rb") as handle:
            texts[part] = (f"{uri.rstrip('/')}/{name}", handle.read())
    return _join_uci(texts, uri)


def _load_uci_zip(fs: "fsspec.AbstractFileSystem", path: str, uri: str) -> LabelledData:
    with fs.open(path, "rb") as handle:
        try:
            archive = zipfile.ZipFile(io.BytesIO(handle.read()))
        except zipfile.BadZipFile:
            raise DataError("not a readable zip file", source=uri) from None
    with archive:
        members = {PurePosixPath(n).name: n for n in archive.namelist() if not n.endswith("/")}
        try:
            files = _uci_files(list(members))
        except DataError as exc:
            raise DataError(exc.reason, source=uri) from None
        if files is None:
            raise DataError("zip holds no UCI one-hundred-plant files (*data_Mar_64.txt ...)", source=uri)
        texts = {part: (f"{uri}!{name}", archive.read(members[name])) for part, name in files.items()}
    return _join_uci(texts, uri)


def _join_uci(texts: dict[str, tuple[str, bytes]], uri: str) -> LabelledData:
    """Join the three UCI files per sample.

    Samples are matched on (species, position of the row within its species),
    the files' own order. A species whose files disagree on its sample count
    cannot be aligned row by row, so it is dropped whole and reported in
    ``notes`` (in the published data: 'Acer Campestre', 16 margin and shape
    rows but 15 texture rows -- the species Kaggle's version also leaves out).
    Species names are written as in the Kaggle version (spaces -> '_').
    """
    parts: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    counts: dict[str, dict[str, int]] = {}
    for part, (name, raw) in texts.items():
        rows, per_species = {}, {}
        for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split(",")
            if len(fields) != UCI_FEATURES_PER_PART + 1:
                raise DataError(
                    f"expected a species name and {UCI_FEATURES_PER_PART} numbers, found {len(fields)} fields",
                    source=name,
                    row=line_no,
                )
            species = fields[0].strip().replace(" ", "_")
            try:
                values = np.array([float(v) for v in fields[1:]], dtype=np.float64)
            except ValueError:
                bad = next(i for i, v in enumerate(fields[1:], start=1) if not _is_float(v))
                raise DataError(
                    f"non-numeric value {fields[bad]!r}", source=name, row=line_no, column=f"{part}{bad}"
                ) from None
            if not np.isfinite(values).all():
                bad = int(np.flatnonzero(~np.isfinite(values))[0]) + 1
                raise DataError("NaN or infinite value", source=name, row=line_no, column=f"{part}{bad}")
            ordinal = per_species.get(species, 0)
            per_species[species] = ordinal + 1
            rows[(species, ordinal)] = values
        if not rows:
            raise DataError("file is empty", source=name)
        parts[part] = rows
        counts[part] = per_species
    species_all = sorted(set().union(*(c.keys() for c in counts.values())))
    kept, dropped = [], []
    for species in species_all:
        sizes = {part: counts[part].get(species, 0) for part in counts}
        (kept if len(set(sizes.values())) == 1 else dropped).append((species, sizes))
    features, labels = [], []
    for species, sizes in kept:
        for ordinal in range(next(iter(sizes.values()))):
            features.append(np.concatenate([parts[p][(species, ordinal)] for p, _ in UCI_PARTS]))
            labels.append(species)
    notes = tuple(
        f"dropped species {species!r}: sample counts differ between files ({sizes}), rows cannot be aligned"
        for species, sizes in dropped
    )
    names = [f"{part}{i}" for part, _ in UCI_PARTS for i in range(1, UCI_FEATURES_PER_PART + 1)]
    return LabelledData(
        features=np.vstack(features),
        labels=np.asarray(labels, dtype=str),
        feature_names=tuple(names),
        source=uri,
        notes=notes,
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
