"""The servers: things that answer requests or events.

``predictor`` and ``transformer`` (KServe models, started through
``entrypoints`` and ``server``), ``watch`` (drift and outliers) and ``trigger``
(alarms -> retraining), with what they share: the request ``protocol``, the
CloudEvent app base (``events``), payload events (``payloads``), the alarm
``outbox`` and request ``metrics``. Submodules are imported on use: kserve
parses argv when it is imported (see :mod:`kfloop.serving.entrypoints`).
"""

__all__: list[str] = []
