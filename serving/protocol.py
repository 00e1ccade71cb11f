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

A V2 request may be pinned to one model version (the Open Inference
Protocol's ``/v2/models/{m}/versions/{v}/...`` routes, gRPC ``model_version``):
:func:`pinned_version` reads the pin, a model that serves versions says which
(:class:`ServesVersions`), and :func:`version_not_served` is the one 404 for
a pin it cannot honour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from kfloop.errors import InputError, NotFoundError

FEATURES_INPUT = "features"
LABEL_OUTPUT = "label"
INDEX_OUTPUT = "class_index"
PROBA_OUTPUT = "probabilities"
REQUEST_ID_HEADER = "x-request-id"  # on an answer: the inference id its rows were captured under (what labels name)
FLOAT_DATATYPES = {"FP32": np.float32, "FP64": np.float64}
DEFAULT_MAX_BATCH = 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the predictor's ONNX input is float32


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

    def rows_from_body(self, body: Any) -> np.ndarray:
        """Rows of a parsed V1 or V2 REST request body (what a payload event carries)."""
        if isinstance(body, dict) and "instances" in body:
            return self.rows_from_v1(body)
        if isinstance(body, dict) and "inputs" in body:
            if not isinstance(body["inputs"], list):
                raise InputError('"inputs" must be a list of tensors')
            return self.rows_from_v2(body["inputs"])
        raise InputError('payload is neither V1 {"instances": [...]} nor V2 {"inputs": [...]}')

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
        """The rows, if every value is a finite number the model's float32 input can hold."""
        finite = np.isfinite(rows) & (np.abs(rows) <= FLOAT32_MAX)
        if not finite.all():
            row, column = (int(v) for v in np.argwhere(~finite)[0])
            value = rows[row, column]
            reason = "is not a finite number" if not np.isfinite(value) else f"is out of the float32 range (|x| <= {FLOAT32_MAX:.4g})"
            raise InputError(f"row {row}, feature {self.feature_names[column]!r}: {value} {reason}")
        return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tensor(item: Any) -> tuple[str, str, list[int], Any]:
    """(name, datatype, shape, lazy numpy array) of an ``InferInput`` or a REST input dict."""
    if isinstance(item, dict):
        try:
            name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]
        except KeyError as missing:
            raise InputError(f"every input needs name, shape, datatype and data; {missing} is missing") from None
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InputError(f"input name and datatype must be strings, got {name!r} and {datatype!r}")
        shape = _checked_shape(name, shape)

        def array() -> np.ndarray:
            return _to_array(name, data, datatype, shape)

        return name, datatype, shape, array
    if not hasattr(item, "datatype") or not hasattr(item, "shape"):
        raise InputError(f"every input must be an object with name, shape, datatype and data, got {type(item).__name__}")
    name, datatype, shape = str(item.name), str(item.datatype), _checked_shape(str(item.name), item.shape)

    def as_numpy() -> np.ndarray:
        if getattr(item, "_raw_data", None) is None and item.data is not None and not isinstance(item.data, np.ndarray):
            return _to_array(name, item.data, datatype, shape)
        try:
            return item.as_numpy()
        except ValueError:
            raise InputError(f"input {name!r}: its binary data does not fit shape {shape} as {datatype}") from None

    return name, datatype, shape, as_numpy


def _checked_shape(name: str, shape: Any) -> list[int]:
    """A tensor's shape as given: a list of whole numbers >= 0 (no -1: every row is counted as sent)."""
    if not isinstance(shape, (list, tuple)) or not shape:
        raise InputError(f"input {name!r}: shape must be a non-empty list of whole numbers, got {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"input {name!r}: shape {list(shape)!r} must hold whole numbers >= 0 (no -1)")
    return [int(d) for d in shape]


def _to_array(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise InputError(f"input {name!r}: data must be a list of numbers ({datatype}), got {type(data).__name__}")
    try:
        with np.errstate(over="ignore"):  # an FP32 value out of range becomes inf, refused by the finite check
            array = np.asarray(data, dtype=FLOAT_DATATYPES.get(datatype, np.float64))
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"input {name!r}: data must be numbers ({datatype})") from None
    try:
        return array.reshape(shape)
    except ValueError:
        raise InputError(f"input {name!r}: shape {shape} does not match its {array.size} values") from None


ENCODINGS = ("v1", "v2-fp32", "v2-fp64", "v2-per-feature-fp32")


def request_body(rows: np.ndarray, encoding: str, feature_names: tuple[str, ...]) -> dict[str, Any]:
    """The REST body a client sends for ``rows`` in one of :data:`ENCODINGS`: V1 rows (float64), one V2
    tensor as FP32 or FP64, or one FP32 V2 tensor per feature -- as KServe's clients build them."""
    if encoding == "v1":
        return {"instances": rows.tolist()}
    if encoding in ("v2-fp32", "v2-fp64"):
        datatype = "FP32" if encoding == "v2-fp32" else "FP64"
        data = rows.astype(FLOAT_DATATYPES[datatype]).ravel().tolist()
        return {"inputs": [{"name": FEATURES_INPUT, "datatype": datatype, "shape": list(rows.shape), "data": data}]}
    if encoding == "v2-per-feature-fp32":
        return {"inputs": [{"name": name, "datatype": "FP32", "shape": [len(rows)], "data": rows[:, j].astype(np.float32).tolist()}
                           for j, name in enumerate(feature_names)]}
    raise InputError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


VERSIONED_INPUT_PREFIX = f"{FEATURES_INPUT}@"


def versioned_input(version: str) -> str:
    """The name of the input tensor that holds features scaled for model ``version``."""
    return VERSIONED_INPUT_PREFIX + version


@runtime_checkable
class ServesVersions(Protocol):
    """A model that can say which of its versions a request may pin (the OIP ``versions`` of its metadata)."""

    def served_versions(self) -> tuple[str, ...]:
        """Every version a request pinned to it is answered by, in version order."""
        raise NotImplementedError


def pinned_version(payload: Any) -> str | None:
    """The version a V2 request is pinned to, or None.

    The pin travels in kserve's own field, ``InferRequest.model_version``:
    gRPC ``ModelInfer`` fills it from the request (``""`` when unset), and the
    versioned REST route (:mod:`kfloop.serving.server`) sets it from the URL.
    So one field carries it to ``preprocess``/``predict`` on both protocols,
    with no header a client could also send. V1 requests cannot be pinned.
    """
    return getattr(payload, "model_version", None) or None


def version_not_served(model: str, version: str, served: Iterable[str]) -> NotFoundError:
    """The answer to a request pinned to a version this server does not serve: 404, whatever the version
    looks like. A version that is not digits is a well-formed name (OIP versions are strings) of a version
    that does not exist here -- the same 404 as version 3 of a model with two -- not a malformed request."""
    shown = version if len(version) <= 64 else version[:64] + "..."
    return NotFoundError(f"model {model!r} has no version {shown!r} here; versions served: {', '.join(served) or 'none'}")
