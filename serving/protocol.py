"""Inference payloads <-> feature matrices, for the KServe V1 and V2 / Open Inference protocols.

:class:`InputSchema` turns a request into a float64 ``[rows, features]``
matrix or raises :class:`~kfloop.errors.InputError` saying what was wrong and
what is expected. It accepts:

* V1 ``{"instances": [[...], ...]}`` (rows as lists in feature order) or
  ``{"instances": [{"margin1": ..., ...}, ...]}`` (rows keyed by feature name);
* V2 one FP32/FP64 tensor ``[n, features]`` (any input name), or one tensor per
  feature named by the feature, each ``[n]`` or ``[n, 1]``.

The same parser reads the payloads that KServe's logger (or kfloop's) sends as
CloudEvents, so the drift service sees exactly what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from kfloop.errors import InputError

FEATURES_INPUT = "features"
LABEL_OUTPUT = "label"
INDEX_OUTPUT = "class_index"
PROBA_OUTPUT = "probabilities"
FLOAT_DATATYPES = {"FP32": np.float32, "FP64": np.float64}
DEFAULT_MAX_BATCH = 1024


@dataclass(frozen=True)
class InputSchema:
    """The features a model expects and the largest batch it accepts."""

    feature_names: tuple[str, ...]
    max_batch: int = DEFAULT_MAX_BATCH

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def _expected(self) -> str:
        names = self.feature_names
        span = f"{names[0]}..{names[-1]}" if len(names) > 2 else ", ".join(names)
        return f"{self.n_features} numbers per row ({span})"

    def rows_from_v1(self, payload: Any) -> np.ndarray:
        """Rows of a V1 ``{"instances": [...]}`` body."""
        if not isinstance(payload, dict) or "instances" not in payload:
            raise InputError('expected a JSON object {"instances": [[...], ...]} with one row per instance')
        instances = payload["instances"]
        if not isinstance(instances, list):
            raise InputError(f'"instances" must be a list of rows, got {type(instances).__name__}')
        self._check_batch(len(instances))
        if isinstance(instances[0], dict):
            return self._finite(np.vstack([self._keyed_row(i, row) for i, row in enumerate(instances)]))
        try:
            rows = np.asarray(instances, dtype=np.float64)
        except (TypeError, ValueError):
            rows = None
        if rows is None or rows.ndim != 2 or rows.shape[1] != self.n_features:
            self._explain_bad_rows(instances)
        return self._finite(rows)

    def rows_from_v2(self, inputs: list[Any]) -> np.ndarray:
        """Rows of V2 inputs (``InferInput`` objects or their REST dicts)."""
        tensors = [_as_tensor(item) for item in inputs]
        if not tensors:
            raise InputError(f'"inputs" is empty: send one FP32 tensor [n, {self.n_features}] or one tensor per feature')
        if len(tensors) == 1 and tensors[0][0] not in self.feature_names:
            name, datatype, shape, array = tensors[0]
            self._check_datatype(name, datatype)
            if len(shape) != 2 or shape[1] != self.n_features:
                raise InputError(f"input {name!r} has shape {shape}; expected [n, {self.n_features}]: {self._expected()}")
            self._check_batch(shape[0])
            return self._finite(array().astype(np.float64, copy=False))
        by_name = {t[0]: t for t in tensors}
        self._check_names(by_name, ("unknown", "missing"), "feature input(s)", f"one tensor per feature of {self._expected()}")
        columns = []
        rows = None
        for feature in self.feature_names:
            name, datatype, shape, array = by_name[feature]
            self._check_datatype(name, datatype)
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                raise InputError(f"input {name!r} has shape {shape}; expected [n] or [n, 1]")
            if rows is not None and shape[0] != rows:
                raise InputError(f"input {name!r} has {shape[0]} rows, other features have {rows}")
            rows = shape[0]
            columns.append(array().reshape(-1).astype(np.float64, copy=False))
        self._check_batch(rows or 0)
        return self._finite(np.column_stack(columns))

    def _check_names(self, given: Iterable[str], openings: tuple[str, str], what: str, expected: str) -> None:
        """Refuse names that are not features, then features that are not named; ``openings`` start the two messages."""
        names = set(given)
        unknown = sorted(names - set(self.feature_names))
        if unknown:
            raise InputError(f"{openings[0]} {what} {unknown[:5]}; expected {expected}")
        missing = [n for n in self.feature_names if n not in names]
        if missing:
            raise InputError(f"{openings[1]} {what} {missing[:5]}{'...' if len(missing) > 5 else ''}")

    def _check_batch(self, rows: int) -> None:
        if rows == 0:
            raise InputError("empty batch: send at least one row")
        if rows > self.max_batch:
            raise InputError(f"batch of {rows} rows is over the limit of {self.max_batch} rows per request")

    @staticmethod
    def _check_datatype(name: str, datatype: str) -> None:
        if datatype not in FLOAT_DATATYPES:
            raise InputError(f"input {name!r} has datatype {datatype}; expected FP32 or FP64")

    def _keyed_row(self, index: int, row: Any) -> np.ndarray:
        if not isinstance(row, dict):
            raise InputError(f"instance {index} is a {type(row).__name__}; mix of objects and lists is not allowed")
        self._check_names(row, (f"instance {index} has unknown", f"instance {index} is missing"), "feature(s)", self._expected())
        values = [row[n] for n in self.feature_names]
        bad = next((n for n, v in zip(self.feature_names, values) if not _is_number(v)), None)
        if bad is not None:
            raise InputError(f"instance {index}, feature {bad!r}: expected a number, got {row[bad]!r}")
        return np.asarray(values, dtype=np.float64)

    def _explain_bad_rows(self, instances: list[Any]) -> None:
        for index, row in enumerate(instances):
            if not isinstance(row, list):
                raise InputError(f"instance {index} is a {type(row).__name__}; expected a list of {self._expected()}")
            if len(row) != self.n_features:
                raise InputError(f"instance {index} has {len(row)} values; expected {self._expected()}")
            for position, value in enumerate(row):
                if not _is_number(value):
                    raise InputError(
                        f"instance {index}, feature {self.feature_names[position]!r}: expected a number, got {value!r}"
                    )
        raise InputError(f"instances must be rows of {self._expected()}")

    def _finite(self, rows: np.ndarray) -> np.ndarray:
        finite = np.isfinite(rows)
        if not finite.all():
            row, column = (int(v) for v in np.argwhere(~finite)[0])
            raise InputError(
                f"row {row}, feature {self.feature_names[column]!r}: {rows[row, column]} is not a finite number"
            )
        return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tensor(item: Any) -> tuple[str, str, list[int], Any]:
    """(name, datatype, shape, lazy numpy array) of an ``InferInput`` or a REST input dict."""
    if isinstance(item, dict):
        try:
            name, datatype, shape, data = item["name"], item["datatype"], list(item["shape"]), item["data"]
        except KeyError as missing:
            raise InputError(f"every input needs name, shape, datatype and data; {missing} is missing") from None

        def array() -> np.ndarray:
            return _to_array(name, data, datatype, shape)

        return str(name), str(datatype), shape, array
    name, datatype, shape = item.name, item.datatype, list(item.shape)

    def as_numpy() -> np.ndarray:
        if getattr(item, "_raw_data", None) is None and item.data is not None and not isinstance(item.data, np.ndarray):
            return _to_array(name, item.data, datatype, shape)
        try:
            return item.as_numpy()
        except ValueError:
            raise InputError(f"input {name!r}: its binary data does not fit shape {shape} as {datatype}") from None

    return name, datatype, shape, as_numpy


def _to_array(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=FLOAT_DATATYPES.get(datatype, np.float64))
    except (TypeError, ValueError):
        raise InputError(f"input {name!r}: data must be numbers ({datatype})") from None
    try:
        return array.reshape(shape)
    except ValueError:
        raise InputError(f"input {name!r}: shape {shape} does not match its {array.size} values") from None


VERSIONED_INPUT_PREFIX = f"{FEATURES_INPUT}@"


def versioned_input(version: str) -> str:
    """The name of the input tensor that holds features scaled for model ``version``."""
    return VERSIONED_INPUT_PREFIX + version
