"""The drift and outlier service behind ``kfloop watch``: payload CloudEvents in, alarms out.

:class:`WatchService` owns one model's watch: it takes KServe's payload request events once per
delivery, captures their rows for the next training, tests a sliding window of them against the
serving version's reference (:mod:`kfloop.drift.detectors`), judges realised accuracy on labels
(:mod:`kfloop.serving.feedback`), follows the registry's production pointer and stores drift,
outlier and accuracy alarms in its :class:`~kfloop.serving.outbox.Outbox`. Its app and process are
:mod:`kfloop.serving.watch_app`, its alarms' contents :mod:`kfloop.serving.alarms`, its dead-letter port
:mod:`kfloop.serving.dead_letters`; ``kfloop watch`` (:mod:`kfloop.cli.watch`) builds the
:class:`WatchConfig`. Replies, durability, restarts and dead letters: ``docs/watch.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
from prometheus_client import Counter, Gauge

from kfloop.bundle import REFERENCE
from kfloop.capture_journal import JournalEntry, JournalMark, JournaledRows
from kfloop.captures import CaptureRetention
from kfloop.errors import InputError, KfloopError, TemporaryError
from kfloop.event_types import LABEL_EVENT, REQUEST_EVENT, RESPONSE_EVENT
from kfloop.labels import STATUS_KEY, LabelBook, LabelIntake
from kfloop.registry import ModelRegistry
from kfloop.drift.attribution import AttributionBaseline
from kfloop.drift.backends import make_detector
from kfloop.drift.detectors import (
    DetectorConfig, WindowAlarm, WindowDetector, WindowMonitor, WindowResult, WindowSnapshot,
)
from kfloop.serving.attributions import AttributionCheck
from kfloop.serving.alarms import AccuracyRule, AlarmQueue, PendingAlarm, accuracy_alarm, window_alarm
from kfloop.serving.deliveries import DeliveryMemory
from kfloop.credentials import TokenFile
from kfloop.serving.events import Delivery, EventReply
from kfloop.serving.feedback import Feedback
from kfloop.serving.outbox import Outbox
from kfloop.serving.protocol import DEFAULT_MAX_BATCH, InputSchema
from kfloop.policies.spec import AccuracyPolicy, CapturePolicy, ExplainPolicy

SEEN_DELIVERIES = 100_000
MAX_UNWRITTEN_DELIVERIES = 10_000  # delivery keys waiting for a file that cannot be written: then events are refused
FLUSH_SECONDS = 0.2  # how often delivery keys are written, the capture journal fsynced, due shards queued
CAPTURE_JOURNAL = "capture-journal"  # under the state folder
RELEASE_SECONDS = 1.0  # the journal of rows in shards is deleted at most this often (it costs an fsync)
ALARM_ROWS_WAIT_SECONDS = 2.0  # an alarm waits this long at most for the rows of labels it stands on
JOIN_SECONDS = 5.0  # labels waiting for their rows are joined with the captured shards at most this often
TESTED, ALARMED = "tested", "alarmed"  # the capture journal's marks on the last row of a tested window

EVENTS = Counter("kfloop_watch_events", "CloudEvents received, by outcome.", ["model", "outcome"])
ROWS = Counter("kfloop_watch_rows_scored", "Rows added to the drift window.", ["model"])
WINDOWS = Counter("kfloop_watch_windows_tested", "Windows tested.", ["model"])
MIN_P = Gauge("kfloop_watch_min_p_value", "Smallest per-feature KS p-value of the last window.", ["model", "version"])
DRIFTED = Gauge("kfloop_watch_drifted_features", "Features drifted in the last window (0 = no drift).", ["model", "version"])
DRIFT = Gauge("kfloop_watch_drift", "1 if the last window showed drift.", ["model", "version"])
OUTLIERS = Gauge("kfloop_watch_outliers", "Rows above the outlier threshold in the last window.", ["model", "version"])
OUTLIER_ALARM = Gauge("kfloop_watch_outlier_alarm", "1 if the last window had too many outliers.", ["model", "version"])
TEST_FAILURES = Counter("kfloop_watch_window_test_failures", "Window tests that raised an error (the rows stay in the "
                        "window for the next test).", ["model"])

log = logging.getLogger(__name__)


@dataclass
class WatchConfig:
    """What the service watches and where alarms go."""

    registry_uri: str
    model: str
    sink_url: str
    state_dir: Path
    window: int = 100
    stride: int | None = None  # rows between tests; default window // 4
    stride_seconds: float = 1.0  # and at least this long between tests (at high rates)
    max_batch: int = DEFAULT_MAX_BATCH  # rows one event may carry: the model's batch limit
    backend: str = "scipy"
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    capture: bool = True
    capture_flush_rows: int = 500
    capture_retention: CaptureRetention | None = field(default_factory=lambda: CapturePolicy().retention())  # the policy's captures
    follow_seconds: float = 5.0
    source: str = "kfloop/watch"
    sink_token_file: Path | None = None  # the bearer token alarms carry (local: HOME/token; cluster: a projected SA token)
    accuracy: AccuracyPolicy = field(default_factory=AccuracyPolicy)  # the policy's accuracy rule (N labels, below X)
    explain: ExplainPolicy = field(default_factory=ExplainPolicy)  # attribution drift (drift_rows, drift_threshold)

    def __post_init__(self) -> None:
        if self.window < 10:
            raise InputError(f"window must be at least 10 rows, got {self.window}")
        self.stride = self.stride or max(1, self.window // 4)


@dataclass
class _Watched:
    """The serving version and what was fitted for it."""

    version: str
    schema: InputSchema
    detector: WindowDetector
    attribution: AttributionBaseline | None = None


class WatchService:
    """The state of one model's watch: version, window, dedup memory, outbox."""

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.registry = ModelRegistry(config.registry_uri)
        self.outbox = Outbox(Path(config.state_dir) / "outbox", config.sink_url,
                             credentials=TokenFile(config.sink_token_file) if config.sink_token_file else None)
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfloop-watch")  # tests, writes, alarms
        self._counted = {outcome: EVENTS.labels(config.model, outcome) for outcome in ("accepted", "duplicate")}
        self._rows_scored = ROWS.labels(config.model)
        self._capture_flush_queued = False
        self._released_at = float("-inf")
        self._joined_at = float("-inf")
        self._failing: dict[str, str] = {}  # what the flush timer could not do, by part (logged once per error)
        self.deliveries = DeliveryMemory(Path(config.state_dir), limit=SEEN_DELIVERIES)
        self.alarms = AlarmQueue(self.outbox, config.model, lambda alarm: self._mark(alarm.through, ALARMED))
        self._last_row: str | None = None  # the journaled id of the last row in the window
        self.attributions = AttributionCheck(config.model, config.source, config.explain, config.detector.alpha, config.window)
        self.watched = self._load(self.registry.resolve(config.model))
        self.monitor = WindowMonitor(self.watched.detector, config.window, config.stride, stride_seconds=config.stride_seconds)
        self.capture = (
            self.registry.captures(config.model).writer(
                self.watched.schema.feature_names, flush_rows=config.capture_flush_rows,
                journal=Path(config.state_dir) / CAPTURE_JOURNAL, retention=config.capture_retention)
            if config.capture else None
        )
        self._classes: dict[str, frozenset[str]] = {}
        self.labels = LabelBook(Path(config.state_dir) / "labels", config.model, self._classes_of,
                                accuracy_window=config.accuracy.labels)
        self.feedback = Feedback(self.labels, lambda: self.watched.version)
        self.accuracy_rule = AccuracyRule(config.accuracy)
        if self.capture is not None:
            for tag in self.capture.recovered_tags:  # deliveries whose rows were journaled before a restart
                self.deliveries.remember(tag)
            self._replay(self.capture.take_recovered())
        self.judge_accuracy()  # labels kept before a restart: a low figure raises its alarm again

    def _classes_of(self, version: str) -> frozenset[str]:
        """The classes of ``version`` (a label must be one of the answering version's)."""
        if version not in self._classes:
            self._classes[version] = frozenset(str(c) for c in self.registry.metadata(self.config.model, version)["classes"])
        return self._classes[version]

    def _load(self, version: str) -> _Watched:
        with self.registry.local_version(self.config.model, version) as folder:
            with np.load(folder / REFERENCE, allow_pickle=False) as loaded:
                arrays = {name: loaded[name] for name in loaded.files}
            attribution = self.attributions.fit(folder, version, arrays)
        reference, names = arrays["features"], tuple(arrays["feature_names"].tolist())
        detector = make_detector(self.config.backend, self.config.detector).fit(reference)
        log.info("watching %s version %s (%d reference rows, %s backend)", self.config.model, version, len(reference), self.config.backend)
        return _Watched(version, InputSchema(names, self.config.max_batch), detector, attribution)

    def follow_production(self) -> bool:
        """Switch to the production version if it moved; returns whether it did."""
        production = self.registry.production_version(self.config.model)
        if production is None or production == self.watched.version:
            return False
        watched = self._load(production)
        with self._lock:
            self.watched = watched
            self.monitor = WindowMonitor(watched.detector, self.config.window, self.config.stride, stride_seconds=self.config.stride_seconds)
            if self.capture is not None:
                self.capture.follow(watched.schema.feature_names)  # new shards carry the new version's features
        return True

    # --- events ------------------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> EventReply:
        """One payload event: 202 accepted (a redelivery too), 204 ignored, an :class:`InputError` (400),
        or a :class:`TemporaryError` (503) when it cannot be kept -- then nothing of it was.

        A redelivery (same id, same body) is taken once; two requests that share
        an id are two requests, and the second one's rows get ids of their own.
        An event that makes windows due is answered once they are tested and their alarms are in the
        outbox (the reply waits for the worker's job, :attr:`EventReply.wait`); when the outbox could not
        store an alarm, 503 -- the event's rows are kept, so its retry is a duplicate, answered 202 once
        the alarm is stored (503 until then, like every event).
        """
        model, event = self.config.model, delivery.event
        event_type = event["type"]
        if event_type == RESPONSE_EVENT:  # the answers, for the labels that come later
            if not self.feedback.answered(delivery):
                EVENTS.labels(model, "ignored").inc()
                return EventReply.ignored('the answer carries no "label" output')
            EVENTS.labels(model, "answers").inc()
            return EventReply(202)
        if event_type == LABEL_EVENT:
            return self.label_event(delivery)
        if event_type != REQUEST_EVENT:
            EVENTS.labels(model, "ignored").inc()
            return EventReply.ignored(f"event type {event_type!r} is not watched (only {REQUEST_EVENT}, "
                                      f"{RESPONSE_EVENT} and {LABEL_EVENT})")
        key = delivery.key
        if key in self.deliveries:
            self._check_alarms()  # it may be the retry of the event whose alarm is not stored yet
            self._counted["duplicate"].inc()
            return EventReply(202)
        watched = self.watched
        rows = self._rows(event.get_data(), delivery.content_type, watched.schema)
        now = time.time()
        tests: list[Callable[[], None]] = []
        with self._lock:
            if watched is not self.watched:  # the version changed meanwhile (rare): read the rows with its schema
                rows = self._rows(event.get_data(), delivery.content_type, self.watched.schema)
            self._check_alarms()
            self._check_intake()
            if not self.deliveries.remember(key):  # a concurrent delivery of the same event won
                self._counted["duplicate"].inc()
                return EventReply(202)
            ids: list[str] | None = None
            flush = False
            if self.capture is not None:
                prefix = self._capture_prefix(str(event["id"]), key)
                ids = [f"{prefix}:{i}" for i in range(len(rows))]
                try:  # journaled before anything else changes: a failure leaves the event untaken
                    due = self.capture.add(ids, rows, self.watched.version, tag=key)
                except TemporaryError:
                    self.deliveries.forget(key)
                    raise
                flush = due and not self._capture_flush_queued
                self._capture_flush_queued |= flush  # one queued flush takes every row buffered until it runs
            self._counted["accepted"].inc()
            self._rows_scored.inc(len(rows))
            stride = self.monitor.stride
            for start in range(0, len(rows), stride):  # a big batch is tested stride by stride
                end = min(start + stride, len(rows))
                self.monitor.append(rows[start:end], now)
                snapshot = self.monitor.take(now)
                if snapshot is not None:
                    tests.append(self._tester(self.monitor, snapshot, None if ids is None else ids[end - 1]))
            if ids is not None:
                self._last_row = ids[-1]
            # Submitted under the lock, so the worker tests windows in the order they were taken.
            tested = self._worker.submit(self._test_for_reply, tests) if tests else None
            if flush:  # after the tests: the reply does not wait for the shard
                self._background(self._flush_capture)
        return EventReply(202, wait=tested)

    def _test_for_reply(self, tests: list[Callable[[], None]]) -> None:
        """The worker's job for an event that made windows due: test them and store their alarms; then a
        :class:`TemporaryError` if an alarm is not in the outbox (the event's reply is 503)."""
        for test in tests:
            test()
        self._check_alarms("this event's rows are kept: its retry is taken once the alarm is stored")

    def _check_alarms(self, then: str = "events are refused until it is") -> None:
        """Refuse (503) while an alarm the outbox could not store waits in memory."""
        self.alarms.check(then)

    def _check_intake(self) -> None:
        """Refuse (503) while the delivery keys of what the watch takes cannot be written (caller holds the lock)."""
        if self.deliveries.unwritten >= MAX_UNWRITTEN_DELIVERIES:
            raise TemporaryError(f"{self.deliveries.unwritten} delivery keys of {self.config.model} wait for "
                                 f"{self.deliveries.path} ({self._failing.get('deliveries', 'unknown error')}); try again later")

    def _flush_capture(self, *, release: bool = False) -> None:
        """Write the buffered rows as shards; then (at most every :data:`RELEASE_SECONDS`, or when ``release``)
        the journal of rows in shards goes, once their keys are in the delivery memory's file, which a restart
        reads instead."""
        with self._lock:
            self._capture_flush_queued = False
        if self.capture is None:
            return
        try:
            self.capture.flush()
        except Exception as exc:  # OSError, or a remote store's own error: the rows stay buffered and journaled
            self._failed("shards", f"{type(exc).__name__}: {exc}")
            return
        self._recovered("shards")
        if release or time.monotonic() - self._released_at >= RELEASE_SECONDS:
            self._released_at = time.monotonic()
            self._attempt("deliveries", self._release_journal)

    def _release_journal(self) -> None:
        assert self.capture is not None
        self._flush_deliveries()
        self.deliveries.sync()
        # The rows of the window and of the stride since its last test stay journaled, for a restart's replay.
        self.capture.release(keep_rows=self.config.window + (self.config.stride or 0))

    def _flush_deliveries(self) -> None:
        # Under the service's lock: a key remembered and then forgotten (its rows could not be journaled)
        # never reaches the file in between.
        with self._lock:
            self.deliveries.flush()

    def _background(self, work: Callable[[], object]) -> None:
        """Run ``work`` on the service's one worker thread, in order, off the request path."""
        self._worker.submit(self._logged, work)

    @staticmethod
    def _logged(work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:  # a failed test or write must not stop the worker; the next one comes
            log.exception("background work of the watch failed")

    def _tester(self, monitor: WindowMonitor, snapshot: WindowSnapshot, last_row: str | None) -> Callable[[], None]:
        """The test of ``snapshot``, whose last row is the journaled row ``last_row`` (None: not captured).

        Once the window is judged, its last row is marked in the capture journal -- ``alarmed`` when its
        alarm is stored, ``tested`` when it raised none (not while an earlier alarm waits in memory: a
        restart must test again what that alarm came from) -- so a restart does not test it again.
        A detector that raises is logged and counted: the event stays taken (its rows are captured and
        in the window, and the next stride tests them; a retry would be a duplicate, and would not help).
        """
        def test() -> None:
            try:
                result = monitor.detector.test(snapshot.rows)  # the scoring, outside the lock
            except Exception:
                TEST_FAILURES.labels(self.config.model).inc()
                log.exception("the window of %s (rows %d-%d) could not be tested; its rows stay in the window",
                              self.config.model, snapshot.row_numbers[0], snapshot.row_numbers[-1])
                return
            with self._lock:
                if monitor is not self.monitor:
                    return  # the version changed meanwhile: that window is gone
                alarms = monitor.record(snapshot, result)
                version, attribution = self.watched.version, self.watched.attribution
            self._export(result, version)
            for alarm in alarms:
                self._raise(alarm, version, last_row)
            self._test_attributions(attribution, snapshot.rows, version)
            if not alarms and not len(self.alarms):
                self._mark(last_row, TESTED)
        return test

    def _test_attributions(self, baseline: AttributionBaseline | None, rows: np.ndarray, version: str) -> None:
        """Attribution drift on the tested window (a failure is logged; the next window is tested again)."""
        try:
            alarm = self.attributions.test(baseline, rows, version)
        except Exception:
            log.exception("the attribution test of %s v%s failed; the next window is tested again", self.config.model, version)
            return
        if alarm is not None:
            self._store(alarm)

    def _mark(self, row_id: str | None, label: str) -> None:
        """Journal that the window ending at ``row_id`` was judged; if that fails, a restart tests it again."""
        capture = self.capture
        if capture is not None and row_id is not None:
            self._attempt("marks", lambda: capture.mark(row_id, label))

    def _replay(self, entries: list[JournalEntry]) -> None:
        """Put the journaled rows of the serving version back into the window, in order, as the window had them
        before the restart (a ``tested`` mark is where a test took the window, an ``alarmed`` one where it started
        afresh), and test it now if a test is due: the window an event completed just before a crash.

        Rows after the last ``tested`` or ``alarmed`` mark count as untested, so only a window whose mark was
        not written (the watch stopped between its test and its mark, or its alarm was not stored) is tested
        twice: an alarm it raised then comes again with a new id (the trigger coalesces it with the first one's
        run or cooldown).
        """
        version, names = self.watched.version, self.watched.schema.feature_names
        start = 0
        for index, entry in enumerate(entries):  # the window started afresh at each version change
            if isinstance(entry, JournaledRows) and (entry.version != version or entry.feature_names != names):
                start = index + 1
        entries = entries[start:]
        marks: dict[str, list[str]] = {}
        for entry in entries:
            if isinstance(entry, JournalMark):
                marks.setdefault(entry.row_id, []).append(entry.label)
        monitor, replayed = self.monitor, 0
        for entry in entries:
            if not isinstance(entry, JournaledRows):
                continue
            cut = 0
            for index, row_id in enumerate(entry.ids):
                for label in marks.get(row_id, ()):
                    monitor.append(entry.rows[cut:index + 1], entry.captured_at)
                    cut = index + 1
                    if label == ALARMED:
                        monitor.reset()
                    else:
                        monitor.take(entry.captured_at, timer=True)  # taken then: its rows count as tested
            monitor.append(entry.rows[cut:], entry.captured_at)
            self._last_row = entry.ids[-1]
            replayed += len(entry.ids)
        if not replayed:
            return
        snapshot = monitor.take(time.time(), timer=True)
        log.info("%d journaled rows of %s v%s replayed: %d in the window%s", replayed, self.config.model, version,
                 len(monitor), ", which was due and is tested now" if snapshot is not None else "")
        if snapshot is not None:
            self._tester(monitor, snapshot, self._last_row)()

    def _capture_prefix(self, event_id: str, key: str) -> str:
        """The event's id -- with its body's digest appended when another request already used the id,
        before or since a restart -- so that captured row ids stay unique."""
        if self.deliveries.deliveries_of(event_id) <= 1:
            return event_id
        return f"{event_id}~{key.rsplit(' ', 1)[-1][:12]}"

    def refused(self, error: KfloopError, event_type: str | None) -> None:
        EVENTS.labels(self.config.model, "invalid" if error.status < 500 else "refused").inc()

    def health(self) -> dict[str, str]:
        return {"status": "ok", "version": self.watched.version}

    def _rows(self, data: Any, content_type: str, schema: InputSchema) -> np.ndarray:
        if isinstance(data, (bytes, bytearray)):
            if "json" not in content_type and content_type:
                raise InputError(f"payload of content type {content_type!r} is not supported: send JSON (V1 or V2)")
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"payload is not JSON: {exc}") from None
        return schema.rows_from_body(data)

    def test_due(self) -> None:
        """Test rows that arrived faster than one test per ``stride_seconds`` (the timer's call)."""
        with self._lock:
            snapshot, monitor, last_row = self.monitor.take(time.time(), timer=True), self.monitor, self._last_row
            if snapshot is not None:  # on the worker, like every test: alarms in order
                self._background(self._tester(monitor, snapshot, last_row))

    def flush(self) -> None:
        """The timer's call: write the delivery memory, fsync the capture journal, queue a due shard and
        the alarms the outbox did not take yet. A failure is logged once (and its end), and tried next time."""
        self._attempt("deliveries", self._flush_deliveries)
        self._attempt("answers", self.labels.sync)
        if self.capture is not None:
            self._attempt("journal", self.capture.sync)
            with self._lock:
                queue = self.capture.due() and not self._capture_flush_queued
                self._capture_flush_queued |= queue
            if queue:
                self._background(self._flush_capture)
        if time.monotonic() - self._joined_at >= JOIN_SECONDS and self.labels.waiting:  # waiting walks every label
            self._joined_at = time.monotonic()
            self._background(lambda: self._attempt("labels", self._join))
        if self.alarms.claim_retry():
            self._background(self.alarms.store)

    def _join(self) -> None:
        self.labels.join(self.registry.captures(self.config.model))

    def join_labels_for_retraining(self) -> None:
        """The step every alarm waits for before it is stored: write the buffered rows and join the labels that
        wait for them into labelled shards of the captures area, so the retraining the alarm starts reads every
        label kept so far. The payload logger sends a request's and its answer's events apart, and the answer's
        can come first: a label whose row is not captured yet is waited for, up to
        :data:`ALARM_ROWS_WAIT_SECONDS`. Runs on the worker thread."""
        if self.capture is None:
            return
        deadline = time.monotonic() + ALARM_ROWS_WAIT_SECONDS
        while self.labels.waiting:
            self._flush_capture()
            self._attempt("labels", self._join)
            if not self.labels.waiting or time.monotonic() > deadline:
                return
            time.sleep(FLUSH_SECONDS)

    def _attempt(self, part: str, work: Callable[[], object]) -> None:
        try:
            work()
        except OSError as exc:
            self._failed(part, f"{type(exc).__name__}: {exc}")
            return
        self._recovered(part)

    def _failed(self, part: str, error: str) -> None:
        if self._failing.get(part) != error:
            log.error("watch of %s: %s failed: %s; trying again", self.config.model, part, error)
        self._failing[part] = error

    def _recovered(self, part: str) -> None:
        if self._failing.pop(part, None) is not None:
            log.warning("watch of %s: %s working again", self.config.model, part)

    def _export(self, result: WindowResult, version: str) -> None:
        model = self.config.model
        WINDOWS.labels(model).inc()
        MIN_P.labels(model, version).set(result.min_p_value)
        DRIFTED.labels(model, version).set(len(result.drifted_features))
        DRIFT.labels(model, version).set(int(result.drift))
        OUTLIERS.labels(model, version).set(result.outliers)
        OUTLIER_ALARM.labels(model, version).set(int(result.outlier_alarm))

    def _raise(self, alarm: WindowAlarm, version: str, through: str | None) -> None:
        """Store the alarm in the outbox (after any stored before it); if the outbox cannot take it, keep it."""
        result, model = alarm.result, self.config.model
        pending = window_alarm(alarm, model=model, version=version, source=self.config.source, backend=self.config.backend,
                               correction=self.config.detector.correction,
                               feature_names=self.watched.schema.feature_names, through=through)
        log.warning("%s alarm for %s v%s: %d drifted features, min p %.2e, %d outliers",
                    alarm.kind, model, version, len(result.drifted_features), result.min_p_value, result.outliers)
        self._store(pending)

    def label_event(self, delivery: Delivery) -> EventReply:
        """An ``io.kfloop.label`` event (on the payload port, or through the Broker on the dead-letter port): 202 with
        what was kept in ``x-kfloop-labels``, or the refusal's 4xx (404 unknown ids: a Knative Trigger retries it)."""
        intake = self.take_labels(delivery.event.get_data())
        EVENTS.labels(self.config.model, "labels").inc()
        return EventReply(202, {"x-kfloop-labels": f"accepted={intake.accepted}; duplicate={intake.duplicate}"})

    def take_labels(self, body: Any) -> LabelIntake:
        """Keep a batch of labels (:meth:`Feedback.labels`), then judge the accuracy rule on what they changed."""
        intake = self.feedback.labels(body)
        if intake.accepted:
            self.judge_accuracy()
        return intake

    def judge_accuracy(self) -> None:
        """The policy's accuracy rule on the serving version (:class:`AccuracyRule`): a fall raises
        ``io.kfloop.accuracy.low`` once, stored by the worker (the labels' request has its answer already)."""
        version = self.watched.version
        figure = self.labels.accuracy().get(version)
        if not self.accuracy_rule.falls(version, figure):
            return
        assert figure is not None
        model, rule = self.config.model, self.config.accuracy
        log.warning("accuracy alarm for %s v%s: %.3f over the last %d labelled answers (below %g)",
                    model, version, figure["accuracy"], figure["labels"], rule.below)
        alarm = accuracy_alarm(model=model, version=version, source=self.config.source, figure=figure, rule=rule)
        self._background(lambda: self._store(alarm))

    def _store(self, alarm: PendingAlarm) -> None:
        """Store ``alarm`` once the labels behind it are joined for the retraining it starts."""
        self.join_labels_for_retraining()
        self.alarms.add(alarm)

    def close(self) -> None:
        """Finish the worker's work and write every buffer (on shutdown); rows that cannot be written stay
        journaled for the next start."""
        self._worker.shutdown(wait=True)
        self.alarms.close()
        if self.capture is not None:
            self._flush_capture(release=True)  # rows it cannot write stay journaled (and it logs why)
            self.capture.close()
        try:
            self.deliveries.close()
        except OSError:  # keys of journaled rows come back from the journal; the others may count twice
            log.exception("watch of %s: the delivery memory could not be written on shutdown", self.config.model)
        self.labels.close()

    def status(self) -> dict[str, Any]:
        result = self.monitor.last_result
        return {
            "model": self.config.model,
            "version": self.watched.version,
            "backend": self.config.backend,
            "window": self.config.window,
            "stride": self.config.stride,
            "rows_in_window": len(self.monitor),
            "windows_tested": self.monitor.windows_tested,
            "last_window": None if result is None else {
                "min_p_value": result.min_p_value, "drifted_features": len(result.drifted_features),
                "outliers": result.outliers, "drift": result.drift, "outlier_alarm": result.outlier_alarm,
            },
            "last_alarm": self.alarms.recent[-1] if self.alarms.recent else None,
            "recent_alarms": list(self.alarms.recent),
            "outbox": len(self.outbox.pending()),
            "unstored_alarms": len(self.alarms),
            "capture": None if self.capture is None else {
                "buffered_rows": self.capture.buffered, "last_error": self.capture.last_error,
            },
            "failing": {**self._failing, **({"alarms": self.alarms.error} if self.alarms.error else {})},
            STATUS_KEY: self.labels.figures().to_json(),
        }
