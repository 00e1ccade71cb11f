"""The detector backends by name, and the one place that picks one: :func:`make_detector`.

``scipy`` (:class:`~kfloop.drift.detectors.ScipyDetector`, the default) needs nothing beyond SciPy and
scikit-learn; ``alibi`` (:class:`~kfloop.drift.alibi.AlibiDetector`) needs the ``kfloop[alibi]`` extra --
alibi-detect is BSL 1.1, production use needs a licence from Seldon -- so it is imported only when asked
for. Called by the watch service (``serving/watch.py``), ``kfloop watch`` and the drift benchmark. Kept
apart from ``detectors`` so that the contract does not import its own plug-in (no import loop).
"""

from __future__ import annotations

from typing import Literal

from kfloop.drift.detectors import DetectorConfig, ScipyDetector, WindowDetector
from kfloop.errors import InputError

__all__ = ["BACKENDS", "Backend", "make_detector"]

Backend = Literal["scipy", "alibi"]
BACKENDS: tuple[str, ...] = ("scipy", "alibi")


def make_detector(backend: str, config: DetectorConfig) -> WindowDetector:
    """A detector of the named backend (``alibi`` needs the ``kfloop[alibi]`` extra)."""
    if backend == "scipy":
        return ScipyDetector(config)
    if backend == "alibi":
        from kfloop.drift.alibi import AlibiDetector

        return AlibiDetector(config)
    raise InputError(f"unknown detector backend {backend!r}; choose one of {', '.join(BACKENDS)}")
