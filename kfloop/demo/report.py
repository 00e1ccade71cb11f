"""The demo's report: ``index.html`` and PNG charts drawn from a :class:`~kfloop.demo.DemoResult`.

Charts (matplotlib, Agg): request rate and replicas, failure rate, drift
p-values with the alarm, served model version and accuracy, the watch's
realised accuracy per version with the accuracy rule's threshold, latency
percentiles -- all over the demo's time axis with its phases shaded -- and a
page with the automation table (when each rule fired, what it did), the loop
timings, the headline counts and what each version relies on (its top features
by mean |attribution|).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from kfloop.demo.results import DemoResult, alarm_time
from kfloop.event_types import ACCURACY_EVENT

TITLES = {
    "requests.png": "Request rate and predictor replicas",
    "failures.png": "Predictor failure rate",
    "drift.png": "Drift test: smallest p-value per window",
    "model.png": "Served model version and accuracy",
    "accuracy.png": "Realised accuracy per version (labelled answers, as the watch measures it)",
    "latency.png": "Client latency percentiles",
}
BUCKET_SECONDS = 2.0
ACCURACY_BUCKET_SECONDS = 10.0
P_VALUE_FLOOR = 1e-40  # smaller p-values are drawn at the floor
PHASE_COLOURS = {"train": "#f2f2f2", "clean": "#e8f4ea", "load": "#fdebd0", "calm": "#e8f4ea", "fault": "#f9d6d5", "concept": "#fcf3cf",
                 "drift": "#e3e4fa"}


def write_report(result: DemoResult, folder: Path) -> Path:
    """Write ``folder/index.html`` and the charts; returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, chart in CHARTS.items():
        chart(result, folder / name)
    page = folder / "index.html"
    page.write_text(_page(result))
    return page


# --- charts ---------------------------------------------------------------------------------------


def _figure(result: DemoResult, title: str) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 3.6), dpi=100)
    axes.set_title(title)
    axes.set_xlabel("seconds since the demo started")
    phases = sorted(result.phases.items(), key=lambda item: item[1])
    for (phase, start), following in zip(phases, phases[1:] + [("end", result.finished)]):
        if phase in PHASE_COLOURS:
            axes.axvspan(start - result.started, following[1] - result.started, color=PHASE_COLOURS[phase], zorder=0)
            axes.text(start - result.started, 1.0, f" {phase}", transform=axes.get_xaxis_transform(), va="top", fontsize=8)
    return figure, axes


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _buckets(result: DemoResult, seconds: float = BUCKET_SECONDS) -> np.ndarray:
    end = max(result.finished - result.started, seconds)
    return np.arange(0.0, end + seconds, seconds)


def _bucket_share(times: np.ndarray, hits: list[bool], edges: np.ndarray) -> np.ndarray:
    """Per bucket, the share of the events at ``times`` that are hits (NaN where a bucket has none)."""
    total, _ = np.histogram(times, bins=edges)
    hit, _ = np.histogram(times[np.asarray(hits, dtype=bool)], bins=edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / total, np.nan)


def _sample_series(result: DemoResult, key: str) -> tuple[np.ndarray, np.ndarray]:
    times = np.array([s["time"] - result.started for s in result.samples])
    values = np.array([np.nan if s.get(key) is None else float(s[key]) for s in result.samples])
    return times, values


def _signal_series(result: DemoResult, signal: str) -> tuple[np.ndarray, np.ndarray, float]:
    rule = next(r for r in result.scaling_rules if r["signal"] == signal)
    times = np.array([d["time"] - result.started for d in result.decisions])
    values = np.array([np.nan if d["values"].get(rule["name"]) is None else d["values"][rule["name"]] for d in result.decisions])
    return times, values, rule["threshold"]


def _requests_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["requests.png"])
    edges = _buckets(result)
    sent = np.array([r.time - result.started for r in result.requests])
    counts, _ = np.histogram(sent, bins=edges)
    axes.step(edges[:-1], counts / BUCKET_SECONDS, where="post", label="client requests/s", color="tab:blue")
    if result.decisions:
        times, values, threshold = _signal_series(result, "request_rate")
        axes.plot(times, values, label="windowed rate (autoscaler's signal)", color="tab:orange")
        axes.axhline(threshold, color="tab:orange", linestyle=":", label=f"threshold {threshold:g} req/s per replica")
    axes.set_ylabel("requests/s")
    right = axes.twinx()
    times, replicas = _sample_series(result, "replicas")
    right.step(times, replicas, where="post", color="black", label="predictor replicas")
    right.set_ylabel("replicas")
    right.set_ylim(0, max(replicas.max() if replicas.size else 1, 1) + 1)
    _legend(axes, right)
    _save(figure, path)


def _failures_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["failures.png"])
    if result.decisions:
        times, values, threshold = _signal_series(result, "failure_rate")
        axes.plot(times, values, label="predictor 5xx share (autoscaler's signal)", color="tab:red")
        axes.axhline(threshold, color="tab:red", linestyle=":", label=f"threshold {threshold:.0%}")
    edges = _buckets(result)
    sent = np.array([r.time - result.started for r in result.requests])
    failed = _bucket_share(sent, [r.status != 200 for r in result.requests], edges)
    axes.step(edges[:-1], failed, where="post", color="tab:gray", label="failed client requests (share)")
    axes.set_ylim(-0.05, 1.1)
    axes.set_ylabel("share")
    _legend(axes)
    _save(figure, path)


def _drift_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["drift.png"])
    times, values = _sample_series(result, "min_p_value")
    axes.semilogy(times, np.clip(values, P_VALUE_FLOOR, 1.0), color="tab:purple",
                  label=f"smallest per-feature p-value (floor {P_VALUE_FLOOR:.0e})")
    axes.set_ylim(P_VALUE_FLOOR / 10, 10.0)
    window_alarms = [a for a in result.alarms if a["type"] != ACCURACY_EVENT]
    for alarm in window_alarms:
        axes.axvline(alarm_time(alarm) - result.started, color="tab:red", label=f"alarm: {alarm['type']}")
    if window_alarms:
        axes.axhline(window_alarms[0]["drift_threshold"], color="tab:gray", linestyle=":", label="drift threshold (FDR)")
    axes.set_ylabel("p-value")
    _legend(axes)
    _save(figure, path)


def _model_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["model.png"])
    answered = [r for r in result.requests if r.status == 200 and r.version is not None and r.correct is not None]
    times = np.array([r.time - result.started for r in answered])
    versions = np.array([int(r.version) for r in answered]) if answered else np.array([])
    axes.scatter(times, versions, s=4, color="tab:green", label="version that answered")
    axes.set_ylabel("model version")
    if versions.size:
        axes.set_yticks(sorted(set(versions.tolist())))
    right = axes.twinx()
    edges = _buckets(result, ACCURACY_BUCKET_SECONDS)
    accuracy = _bucket_share(times, [bool(r.correct) for r in answered], edges)
    right.step(edges[:-1], accuracy, where="post", color="tab:blue", label=f"accuracy ({ACCURACY_BUCKET_SECONDS:g} s buckets)")
    right.set_ylim(0, 1.05)
    right.set_ylabel("accuracy")
    _legend(axes, right)
    _save(figure, path)


def _accuracy_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["accuracy.png"])
    versions = sorted({v for sample in result.samples for v in sample.get("realised_accuracy", {})}, key=int)
    for version in versions:
        points = [(s["time"] - result.started, s["realised_accuracy"][version]) for s in result.samples
                  if version in s.get("realised_accuracy", {})]
        axes.step([t for t, _ in points], [a for _, a in points], where="post", label=f"version {version}")
    if result.accuracy_below is not None:
        axes.axhline(result.accuracy_below, color="tab:gray", linestyle=":", label=f"accuracy rule: below {result.accuracy_below:g}")
    for alarm in (a for a in result.alarms if a["type"] == ACCURACY_EVENT):
        axes.axvline(alarm_time(alarm) - result.started, color="tab:red", label=f"accuracy alarm (version {alarm['version']})")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("realised accuracy")
    _legend(axes)
    _save(figure, path)


def _latency_chart(result: DemoResult, path: Path) -> None:
    figure, axes = _figure(result, TITLES["latency.png"])
    edges = _buckets(result, 5.0)
    answered = [r for r in result.requests if r.status == 200]
    times = np.array([r.time - result.started for r in answered])
    latency = np.array([r.latency * 1000 for r in answered])
    index = np.digitize(times, edges) - 1
    for quantile, colour in ((50, "tab:green"), (95, "tab:orange"), (99, "tab:red")):
        series = [np.percentile(latency[index == i], quantile) if np.any(index == i) else np.nan for i in range(len(edges) - 1)]
        axes.step(edges[:-1], series, where="post", color=colour, label=f"p{quantile}")
    axes.set_ylabel("ms")
    axes.set_yscale("log")
    _legend(axes)
    _save(figure, path)


def _legend(*axes: Any) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    axes[0].legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.85)


CHARTS = {
    "requests.png": _requests_chart,
    "failures.png": _failures_chart,
    "drift.png": _drift_chart,
    "model.png": _model_chart,
    "accuracy.png": _accuracy_chart,
    "latency.png": _latency_chart,
}


# --- page -----------------------------------------------------------------------------------------


def _page(result: DemoResult) -> str:
    summary = result.summary()
    first = result.first_firings()
    table_rows = []
    for row in result.rows:
        firing = first.get(row.key)
        when = "-" if firing is None else f"{firing.time - result.started:.1f} s"
        outcome = "did not fire" if firing is None else firing.outcome
        table_rows.append(f"<tr><td>{_e(row.stage)}</td><td>{_e(row.event)}</td><td>{_e(row.action)}</td>"
                          f"<td>{when}</td><td>{_e(outcome)}</td></tr>")
    timeline = "".join(f"<tr><td>{f.time - result.started:.1f} s</td><td>{_e(f.rule)}</td><td>{_e(f.action)}</td>"
                       f"<td>{_e(f.outcome)}</td></tr>" for f in result.timeline)
    timings = "".join(f"<tr><td>{_e(name)}</td><td>{'-' if value is None else f'{value:.1f} s'}</td></tr>"
                      for name, value in result.timings.items())
    charts = "".join(f'<h2>{_e(title)}</h2><img src="{name}" alt="{_e(title)}">' for name, title in TITLES.items())
    importance = _importance(result) + _moved(result)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kfloop demo: {_e(result.model)}</title>
<style>body{{font-family:sans-serif;max-width:1060px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
th{{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>kfloop demo: {_e(result.model)}</h1>
<p>Data {_e(result.data)}; speed x{result.speed:g} (windows, periods and cooldowns divided by it);
{summary['duration_s']:.0f} s; {summary['requests']} client requests, <b>{summary['failed_client_requests']} failed</b>
({summary['injected_failures']} more answered 503 while failures were injected on purpose).</p>
<h2>The automation table</h2>
<table><tr><th>stage</th><th>event</th><th>action</th><th>first fired</th><th>outcome</th></tr>{''.join(table_rows)}</table>
<h2>Loop timings</h2><table>{timings}</table>
<h2>Every firing</h2><table><tr><th>time</th><th>rule</th><th>action</th><th>outcome</th></tr>{timeline}</table>
{charts}
{importance}
</body></html>
"""


def _moved(result: DemoResult) -> str:
    """For each drift or outlier alarm: which features' attribution shares the drift phase's rows moved most."""
    rows = []
    for alarm in result.alarms:
        moved = result.moved.get(alarm["id"])
        if moved is None:
            continue
        features = ", ".join(f"{_e(name)} {before:.3f} &rarr; {after:.3f}" for name, before, after in moved["moved"])
        rows.append(f"<tr><td>{alarm_time(alarm) - result.started:.1f} s</td><td>{_e(alarm.get('version'))}</td>"
                    f"<td>{moved['ndcg']:.3f}</td><td>{features}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Drift and outlier alarms: which features' attributions moved</h2><p>The drift phase's rows against the holdout "
            "rows, in the version each alarm named: nDCG@20 of their feature ranking (1 = unchanged), and the "
            "features whose share of the mean |attribution| moved most (holdout share &rarr; drifted share).</p>"
            f"<table><tr><th>alarm</th><th>version</th><th>nDCG</th><th>moved most</th></tr>{''.join(rows)}</table>")


def _importance(result: DemoResult) -> str:
    """Each version's top features by mean |attribution| on the holdout rows, side by side."""
    if not result.importance:
        return "<h2>What each version relies on</h2><p>No attributions: install kfloop[explain] (shap).</p>"
    versions = sorted(result.importance, key=int)
    depth = max(len(ranked) for ranked in result.importance.values())
    head = "".join(f"<th>version {_e(v)}</th>" for v in versions)
    rows = []
    for rank in range(depth):
        cells = "".join(
            f"<td>{_e(result.importance[v][rank][0])} {result.importance[v][rank][1]:.4f}</td>"
            if rank < len(result.importance[v]) else "<td></td>" for v in versions)
        rows.append(f"<tr><td>{rank + 1}</td>{cells}</tr>")
    return ("<h2>What each version relies on</h2><p>Top features by mean |attribution| to the predicted class "
            "on the holdout rows (approximate attributions, labelled so: they rank features as the exact ones do).</p>"
            f"<table><tr><th>rank</th>{head}</tr>{''.join(rows)}</table>")


def _e(text: Any) -> str:
    return html.escape(str(text))
