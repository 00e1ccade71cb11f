"""Drift and outlier detection: one ``WindowDetector`` contract with a SciPy backend (``detectors``) and
an opt-in alibi-detect one (``alibi``, Business Source License 1.1), and their calibration (``calibration``)."""

__all__: list[str] = []
