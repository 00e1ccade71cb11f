"""Reading Prometheus' text exposition format: the one scraper kfloop's own readers share.

The embedded scaling source, the local canary judgement and ``kfloop status``
read counters and gauges straight from servers' ``/metrics`` pages (where a
cluster would ask Prometheus); :func:`samples` and :func:`sum_samples` are how.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["samples", "sum_samples"]


def samples(text: str, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` whose labels include ``labels``."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                yield sample.labels, sample.value


def sum_samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples :func:`samples` yields (0 when there are none)."""
    return sum(value for _, value in samples(text, name, **labels))
