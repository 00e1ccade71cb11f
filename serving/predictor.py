"""The predictor: a ``kserve.Model`` that runs one registry version's forest on scaled features.

It loads a version folder (what KServe mounts from ``storageUri``), runs the ONNX graph with onnxruntime
(the joblib forest when there is no ONNX file) and answers V1 ``{"instances": [[...scaled...]]}`` with
``{"predictions": [label, ...]}`` and V2 / gRPC ``features`` FP32 ``[n, f]`` with the outputs ``label``
(BYTES), ``class_index`` (INT64) and ``probabilities`` (FP32 ``[n, classes]``) or a subset of them. An
explanation's outputs (:data:`~kfloop.explain.EXPLAIN_OUTPUTS`) and V1 ``:explain`` come from its
:class:`~kfloop.serving.explaining.ExplainWorkers`.

A V2 request may instead carry one tensor per model version, ``features@<version>``, each scaled with
that version's preprocessor (what the transformer sends, since replicas behind one address may serve
different versions during a rollout): the predictor uses its own version's tensor, and refuses a request
without one (HTTP 409 naming its version). A request pinned to a version (``/v2/models/leaf/versions/1/infer``,
gRPC ``model_version``) is answered only when that is the predictor's version; any other pin is a 404.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from kserve import InferOutput, InferRequest, InferResponse, Model

from kfloop.bundle import ModelBundle
from kfloop.errors import InjectedFailure, InputError, VersionMismatch
from kfloop.explain import DEFAULT_MAX_ROWS, EXPLAIN_OUTPUTS, ExplainOptions, Explanation
from kfloop.serving.explaining import ExplainWorkers
from kfloop.serving.explanations import explanation_outputs, explanation_parameters, requested_options
from kfloop.serving.protocol import (
    DEFAULT_MAX_BATCH,
    FEATURES_INPUT,
    INDEX_OUTPUT,
    LABEL_OUTPUT,
    PROBA_OUTPUT,
    VERSIONED_INPUT_PREFIX,
    InputSchema,
    pinned_version,
    version_not_served,
    versioned_input,
)


class ForestPredictor(Model):
    """Serves one model version; scaling is the transformer's job."""

    def __init__(self, name: str, version_dir: str, *, max_batch: int = DEFAULT_MAX_BATCH, threads: int = 1,
                 max_explain_rows: int = DEFAULT_MAX_ROWS) -> None:
        super().__init__(name)
        self.version_dir = version_dir
        self.max_batch = max_batch
        self.max_explain_rows = max_explain_rows
        self.explainer: ExplainWorkers | None = None
        self.threads = threads
        self.bundle: ModelBundle | None = None
        self.schema: InputSchema | None = None
        self.version = ""
        self.failure_rate = 0.0  # fault injection: share of requests answered with 503

    def load(self) -> bool:
        # The onnxruntime session is made here, not in __init__: sessions cannot be pickled.
        self.bundle = ModelBundle.load(self.version_dir, threads=self.threads)
        self.schema = InputSchema(self.bundle.preprocessor.feature_names, self.max_batch)
        self.version = self.bundle.version
        self.explainer = ExplainWorkers(self.name, self.version_dir, self.version, max_rows=self.max_explain_rows)
        self.ready = True
        return True

    def stop(self) -> None:
        """The model server's shutdown: the explain worker goes with the model."""
        if self.explainer is not None:
            self.explainer.close()
        super().stop()

    def served_versions(self) -> tuple[str, ...]:
        """The one version this predictor serves (:class:`~kfloop.serving.protocol.ServesVersions`)."""
        return (self.version,)

    def get_input_types(self) -> list[dict]:
        return [{"name": FEATURES_INPUT, "datatype": "FP32", "shape": [-1, self.schema.n_features]}]

    def get_output_types(self) -> list[dict]:
        classes = len(self.bundle.preprocessor.classes)
        return [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": INDEX_OUTPUT, "datatype": "INT64", "shape": [-1]},
            {"name": PROBA_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
        ]

    def install_fault_injection(self, app: FastAPI) -> None:
        """``PUT /kfloop/faults {"failure_rate": 0.5}`` (control port): answer that share of requests with HTTP 503."""
        from kfloop.serving.control import control_json

        async def set_faults(request: Request) -> dict[str, float]:
            rate = (await control_json(request)).get("failure_rate", 0.0)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise InputError(f"failure_rate must be a number between 0 and 1, got {rate!r}")
            self.failure_rate = float(rate)
            return {"failure_rate": self.failure_rate}

        app.add_api_route("/kfloop/faults", set_faults, methods=["PUT"])

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        pinned = pinned_version(payload)
        if pinned is not None and pinned != self.version:
            raise version_not_served(self.name, pinned, self.served_versions())
        if self.failure_rate and random.random() < self.failure_rate:
            raise InjectedFailure("injected failure: fault injection is on for this predictor")
        if isinstance(payload, InferRequest):
            rows = self._scaled_rows(payload).astype(np.float32)
            wanted = {o.name for o in payload.request_outputs} if payload.request_outputs else set()
            options, explanation = requested_options(payload, wanted), None
            if options is not None:
                assert self.explainer is not None
                explanation = await self.explainer.explain(rows, options)
            indices, proba = self.bundle.predict_scaled(rows)
            return self._v2_response(payload, indices, proba, explanation)
        indices, _ = self.bundle.predict_scaled(self._v1_rows(payload))
        return {"predictions": self.bundle.preprocessor.decode(indices).tolist()}

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """V1 ``:explain``: ``{"instances": [...scaled...], "method"?, "top_k"?, "classes"?}`` ->
        ``{"predictions": [...], "explanations": [...]}`` (one object per row, :meth:`Explanation.rows`)."""
        rows = self._v1_rows(payload)
        assert self.explainer is not None
        explanation = await self.explainer.explain(rows, ExplainOptions.parse(payload))
        indices, _ = self.bundle.predict_scaled(rows)
        return {"predictions": self.bundle.preprocessor.decode(indices).tolist(), "explanations": explanation.rows()}

    def _v1_rows(self, payload: Any) -> np.ndarray:
        if isinstance(payload, bytes):
            raise InputError("request body is not JSON: send Content-Type: application/json")
        return self.schema.rows_from_v1(payload).astype(np.float32)

    def _scaled_rows(self, request: InferRequest) -> np.ndarray:
        """The request's rows for this version: its ``features@<version>`` tensor when the
        request is version-tagged, else the one features tensor (or one tensor per feature)."""
        tagged = {i.name: i for i in request.inputs if i.name.startswith(VERSIONED_INPUT_PREFIX)}
        if not tagged:
            return self.schema.rows_from_v2(request.inputs)
        mine = tagged.get(versioned_input(self.version))
        if mine is None:
            versions = sorted(name.removeprefix(VERSIONED_INPUT_PREFIX) for name in tagged)
            raise VersionMismatch(f"this predictor serves version {self.version}; the request has features "
                                  f"scaled for version(s) {versions}", served_version=self.version)
        return self.schema.rows_from_v2([mine])

    def _v2_response(self, request: InferRequest, indices: np.ndarray, proba: np.ndarray,
                     explanation: Explanation | None = None) -> InferResponse:
        wanted = {o.name for o in request.request_outputs} if request.request_outputs else None
        known = (LABEL_OUTPUT, INDEX_OUTPUT, PROBA_OUTPUT, *EXPLAIN_OUTPUTS)
        unknown = sorted((wanted or set()) - set(known))
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; this model has {', '.join(known)}")
        outputs = []
        n = len(indices)
        if wanted is None or LABEL_OUTPUT in wanted:
            labels = self.bundle.preprocessor.decode(indices).tolist()
            outputs.append(InferOutput(LABEL_OUTPUT, [n], "BYTES", labels))
        if wanted is None or INDEX_OUTPUT in wanted:
            outputs.append(InferOutput(INDEX_OUTPUT, [n], "INT64", indices.tolist()))
        if wanted is None or PROBA_OUTPUT in wanted:
            outputs.append(InferOutput(PROBA_OUTPUT, list(proba.shape), "FP32", proba.ravel().tolist()))
        if explanation is not None:
            outputs += explanation_outputs(explanation.tensors(), wanted or ())
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.version,
            infer_outputs=outputs,
            from_grpc=request.from_grpc,
            parameters=None if explanation is None else explanation_parameters(explanation),
        )
