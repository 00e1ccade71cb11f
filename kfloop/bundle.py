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
    """Serialise a fitted forest to ONNX: input ``features`` float32 [n, f], outputs ``label`` int64 [n] and
    ``probabilities`` float32 [n, classes] -- one ``ai.onnx.ml`` TreeEnsembleClassifier, the graph skl2onnx
    makes, written straight from the trees' arrays (vectorised, where skl2onnx converts node by node) and
    sparse: a leaf lists only the classes it gives a share to, so a forest of pure leaves is as many times
    smaller as it has classes.

    scikit-learn compares float32 features with float64 thresholds; each threshold becomes the largest float32
    not above it, so ``x <= threshold`` decides the same for every float32 ``x``. Callers still check the graph
    against the forest (:func:`onnx_agreement`).
    """
    import onnx
    from onnx import TensorProto, helper

    nodes: dict[str, list[np.ndarray]] = {name: [] for name in (
        "treeids", "nodeids", "featureids", "values", "leaf", "true", "false")}
    leaves: dict[str, list[np.ndarray]] = {name: [] for name in ("treeids", "nodeids", "ids", "weights")}
    for tree_id, estimator in enumerate(forest.estimators_):
        tree = estimator.tree_
        count = tree.node_count
        leaf = tree.children_left == -1
        nodes["treeids"].append(np.full(count, tree_id))
        nodes["nodeids"].append(np.arange(count))
        nodes["featureids"].append(np.where(leaf, 0, tree.feature))
        nodes["values"].append(np.where(leaf, 0.0, _float32_not_above(tree.threshold)))
        nodes["leaf"].append(leaf)
        nodes["true"].append(np.where(leaf, 0, tree.children_left))
        nodes["false"].append(np.where(leaf, 0, tree.children_right))
        shares = tree.value[:, 0, :] / tree.value[:, 0, :].sum(axis=1, keepdims=True)
        leaf_ids, class_ids = np.nonzero(shares * leaf[:, None])
        leaves["treeids"].append(np.full(len(leaf_ids), tree_id))
        leaves["nodeids"].append(leaf_ids)
        leaves["ids"].append(class_ids)
        leaves["weights"].append(shares[leaf_ids, class_ids] / len(forest.estimators_))
    node = {name: np.concatenate(parts) for name, parts in nodes.items()}
    leaf = {name: np.concatenate(parts) for name, parts in leaves.items()}
    classes = len(forest.classes_)
    ensemble = helper.make_node(
        "TreeEnsembleClassifier", ["features"], ["label", "probabilities"], domain="ai.onnx.ml",
        nodes_treeids=node["treeids"].tolist(), nodes_nodeids=node["nodeids"].tolist(),
        nodes_featureids=node["featureids"].tolist(), nodes_values=node["values"].astype(np.float32).tolist(),
        nodes_modes=np.where(node["leaf"], "LEAF", "BRANCH_LEQ").tolist(),
        nodes_truenodeids=node["true"].tolist(), nodes_falsenodeids=node["false"].tolist(),
        nodes_missing_value_tracks_true=[0] * len(node["treeids"]),
        class_treeids=leaf["treeids"].tolist(), class_nodeids=leaf["nodeids"].tolist(),
        class_ids=leaf["ids"].tolist(), class_weights=leaf["weights"].astype(np.float32).tolist(),
        classlabels_int64s=[int(label) for label in forest.classes_], post_transform="NONE",
    )
    graph = helper.make_graph(
        [ensemble], "random_forest",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", 1)],
                              producer_name="kfloop")
    model.ir_version = 8  # what onnxruntime >= 1.14 reads for opset 15
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _float32_not_above(thresholds: np.ndarray) -> np.ndarray:
    """Each float64 threshold as the largest float32 that is not above it."""
    rounded = thresholds.astype(np.float32)
    return np.where(rounded > thresholds, np.nextafter(rounded, np.float32(-np.inf)), rounded)


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
