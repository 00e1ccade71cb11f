"""A model version's files and how to run them: export to ONNX, and load for prediction.

A bundle directory (a registry version, or what KServe mounts from
``storageUri``) holds ``model.joblib``, ``model.onnx`` (optional),
``preprocessor.joblib``, ``reference.npz`` and ``metadata.json``.
:class:`ModelBundle` runs the ONNX graph with onnxruntime when present and the
joblib forest otherwise; both take scaled float32 features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kfloop.errors import RegistryError
from kfloop.preprocessing import Preprocessor

MODEL_JOBLIB = "model.joblib"
MODEL_ONNX = "model.onnx"
PREPROCESSOR = "preprocessor.joblib"
REFERENCE = "reference.npz"
METADATA = "metadata.json"
ONNX_OPSET = 15


def export_onnx(forest: Any, n_features: int) -> bytes:
    """Serialise a fitted forest to ONNX: input ``features`` float32 [n, f], outputs label and probabilities."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        forest,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
    )
    return onx.SerializeToString()


def onnx_session(model_bytes: bytes | str, threads: int = 1) -> Any:
    """An onnxruntime session limited to ``threads`` intra-op threads (servers scale by replicas)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_agreement(model_bytes: bytes, forest: Any, scaled_features: np.ndarray) -> float:
    """Share of rows on which the ONNX graph and the sklearn forest predict the same class."""
    session = onnx_session(model_bytes)
    onnx_labels = session.run(None, {"features": scaled_features.astype(np.float32)})[0]
    return float(np.mean(np.asarray(onnx_labels) == forest.predict(scaled_features)))


@dataclass
class ModelBundle:
    """A loaded model version: preprocessor, metadata and a predict function over scaled features."""

    path: str
    preprocessor: Preprocessor
    metadata: dict[str, Any]
    runtime: str  # "onnx" or "joblib"
    _session: Any = None
    _forest: Any = None

    @classmethod
    def load(cls, path: str | Path, *, prefer_onnx: bool = True, threads: int = 1) -> "ModelBundle":
        import joblib

        root = Path(path)
        if not (root / PREPROCESSOR).exists():
            raise RegistryError(f"{root}: not a model version (no {PREPROCESSOR})")
        metadata = json.loads((root / METADATA).read_text()) if (root / METADATA).exists() else {}
        preprocessor = joblib.load(root / PREPROCESSOR)
        if prefer_onnx and (root / MODEL_ONNX).exists():
            session = onnx_session(str(root / MODEL_ONNX), threads)
            return cls(str(root), preprocessor, metadata, "onnx", _session=session)
        if not (root / MODEL_JOBLIB).exists():
            raise RegistryError(f"{root}: no {MODEL_ONNX} or {MODEL_JOBLIB}")
        return cls(str(root), preprocessor, metadata, "joblib", _forest=joblib.load(root / MODEL_JOBLIB))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", Path(self.path).name))

    def predict_scaled(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices [n] and probabilities float32 [n, classes] for scaled features."""
        if self._session is not None:
            indices, proba = self._session.run(None, {"features": np.asarray(scaled, dtype=np.float32)})
            return np.asarray(indices, dtype=np.int64), np.asarray(proba, dtype=np.float32)
        proba = np.zeros((len(scaled), len(self.preprocessor.classes)), dtype=np.float32)
        proba[:, self._forest.classes_] = self._forest.predict_proba(scaled)
        return np.argmax(proba, axis=1).astype(np.int64), proba

    def predict(self, raw_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class names [n] and probabilities for raw features (preprocessing included)."""
        indices, proba = self.predict_scaled(self.preprocessor.transform(raw_features))
        return self.preprocessor.decode(indices), proba
