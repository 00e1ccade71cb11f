"""The fitted preprocessor a model version ships with: feature scaling and label coding.

Training fits it on the training split; the transformer of the same version
applies it to every request. It is pickled with joblib into the registry, so it
stays a small, import-stable class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Preprocessor:
    """Standard scaling per feature and the mapping between class indices and names."""

    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, feature_names: tuple[str, ...]) -> "Preprocessor":
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(features)
        return cls(
            feature_names=tuple(feature_names),
            classes=tuple(sorted(set(labels.tolist()))),
            mean=scaler.mean_.astype(np.float64),
            scale=scaler.scale_.astype(np.float64),
        )

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Scaled float32 features, the model's input."""
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """Class names -> indices into ``classes``."""
        lookup = {name: index for index, name in enumerate(self.classes)}
        return np.fromiter((lookup[str(label)] for label in labels), dtype=np.int64, count=len(labels))

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> class names."""
        return np.asarray(self.classes, dtype=object)[np.asarray(indices, dtype=np.int64)].astype(str)
