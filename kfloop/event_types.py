"""The CloudEvent types kfloop sends and receives: one name for each, shared by servers, policies and manifests."""

from __future__ import annotations

__all__ = ["ACCURACY_EVENT", "ALARM_EVENTS", "ATTRIBUTION_EVENT", "DRIFT_EVENT", "LABEL_EVENT", "OUTLIER_EVENT", "REQUEST_EVENT", "RESPONSE_EVENT"]

REQUEST_EVENT = "org.kubeflow.serving.inference.request"  # KServe's payload logger: an inference request
RESPONSE_EVENT = "org.kubeflow.serving.inference.response"  # ... and its answer
DRIFT_EVENT = "io.kfloop.drift.detected"  # the watch: the window's features drifted
OUTLIER_EVENT = "io.kfloop.outlier.detected"  # the watch: too many outliers in the window
ACCURACY_EVENT = "io.kfloop.accuracy.low"  # the watch: the serving version's realised accuracy fell below the policy's
ATTRIBUTION_EVENT = "io.kfloop.attribution.drift"  # the watch: the features the answers rest on moved (nDCG)
ALARM_EVENTS = (DRIFT_EVENT, OUTLIER_EVENT, ACCURACY_EVENT, ATTRIBUTION_EVENT)
LABEL_EVENT = "io.kfloop.label"  # a client: the true labels of served rows ([{"id": ..., "label": ...}, ...])
