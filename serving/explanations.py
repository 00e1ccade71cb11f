"""Explanations on the wire: what a V2 request asks and what its answer carries, the same at every hop.

A V2 request (REST or gRPC) that names any of :data:`~kfloop.explain.EXPLAIN_OUTPUTS` in ``outputs`` is an
explanation; ``parameters`` may carry ``method``, ``top_k`` and ``classes`` (:func:`requested_options`).
The answer carries ``attributions`` FP64 with ``attribution_features`` and ``explained_class`` BYTES (asked
for or not: they say what the numbers are), ``base_values`` FP64 when asked, and the parameters
``explanation_method`` and ``approximate`` (:func:`explanation_outputs`, :func:`explanation_parameters`).
The predictor writes them; the transformer asks its predictor for all of them and reads them back
(:func:`read_tensors`) to answer V1 ``:explain`` or pass them on.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from kserve import InferOutput, InferRequest
from kserve.protocol.infer_type import to_http_parameters

from kfloop.errors import UpstreamError
from kfloop.explain import ATTRIBUTIONS, BASE_VALUES, EXPLAIN_OUTPUTS, EXPLAINED_CLASS, FEATURES, ExplainOptions, Explanation

__all__ = ["explanation_outputs", "explanation_parameters", "read_tensors", "requested_options"]

_DATATYPES = {ATTRIBUTIONS: "FP64", FEATURES: "BYTES", BASE_VALUES: "FP64", EXPLAINED_CLASS: "BYTES"}


def requested_options(request: InferRequest, wanted: Iterable[str]) -> ExplainOptions | None:
    """The explanation ``request`` asks for (None: it asks for none of the explanation's outputs)."""
    if not set(wanted) & set(EXPLAIN_OUTPUTS):
        return None
    parameters = to_http_parameters(request.parameters) if request.parameters else {}
    return ExplainOptions.parse(parameters)


def _sent(wanted: Iterable[str]) -> list[str]:
    names = set(wanted)
    if ATTRIBUTIONS in names:
        names |= {FEATURES, EXPLAINED_CLASS}
    return [name for name in EXPLAIN_OUTPUTS if name in names]


def explanation_outputs(tensors: dict[str, np.ndarray], wanted: Iterable[str]) -> list[InferOutput]:
    """The V2 outputs of an explanation's ``tensors`` (:meth:`Explanation.tensors`) that ``wanted`` asks for."""
    outputs = []
    for name in _sent(wanted):
        values = np.asarray(tensors[name])
        if _DATATYPES[name] == "BYTES":
            data: list[Any] = [str(value) for value in values.ravel()]
        else:
            data = values.astype(np.float64).ravel().tolist()
        outputs.append(InferOutput(name, list(values.shape), _DATATYPES[name], data))
    return outputs


def explanation_parameters(explanation: Explanation) -> dict[str, Any]:
    return {"explanation_method": explanation.method, "approximate": explanation.approximate}


def read_tensors(outputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """An explanation's tensors from a predictor's V2 REST answer (an :class:`UpstreamError` if one is missing:
    the predictor's fault, not the client's)."""
    found = {output.get("name"): output for output in outputs if output.get("name") in EXPLAIN_OUTPUTS}
    missing = [name for name in EXPLAIN_OUTPUTS if name not in found]
    if missing:
        raise UpstreamError(f"the predictor's answer lacks the explanation's outputs {missing}")
    return {name: np.asarray(output["data"], dtype=object if _DATATYPES[name] == "BYTES" else np.float64)
            .reshape(output["shape"]) for name, output in found.items()}
