"""Ground truth: the answers a model gave, the labels that come for them later, and the realised accuracy.

Owns :class:`LabelBook`, one model's answers and labels in append-only logs in its folder:
:meth:`~LabelBook.answered` records what each row was answered (served and shadow versions),
:meth:`~LabelBook.add` keeps a batch of labels whole or refuses it whole (:class:`LabelIntake`),
:meth:`~LabelBook.join` writes labelled rows as labelled shards of the captures area
(:mod:`kfloop.captures`), and each version's realised accuracy and shadow agreement are gauges.
The watch (:mod:`kfloop.serving.watch`) owns a book, syncs and joins it and reads its accuracy;
:mod:`kfloop.serving.feedback` turns response events and label requests into ``answered`` and ``add``;
:mod:`kfloop.policies.rollout` queries the accuracy metrics by name (:data:`ACCURACY_METRIC`).
Row ids, refusals, durability and the join: docs/captures.md#labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from prometheus_client import Counter, Gauge

from kfloop.captures import CaptureArea
from kfloop.data import LabelledData
from kfloop.durable import append_whole, atomic_write
from kfloop.errors import ConflictError, InputError, NotFoundError, PayloadTooLarge, TemporaryError

__all__ = ["ACCURACY_LABELS_METRIC", "ACCURACY_METRIC", "LABEL_OUTCOMES", "STATUS_KEY", "Answer", "LabelBook", "LabelIntake",
           "TruthFigures"]

STATUS_KEY = "labels"  # where the watch's ``GET /status`` carries its TruthFigures

log = logging.getLogger(__name__)

LABEL_OUTCOMES = ("accepted", "duplicate", "unknown_id", "unknown_class", "conflict")
ACCURACY_METRIC, ACCURACY_LABELS_METRIC = "kfloop_realised_accuracy", "kfloop_realised_accuracy_labels"
LABELS = Counter("kfloop_labels", "Labels sent for served rows, by outcome.", ["model", "outcome"])
ACCURACY = Gauge(ACCURACY_METRIC, "Share of the last labelled answers of a version whose label matches its answer.",
                 ["model", "version"])
ACCURACY_LABELS = Gauge(ACCURACY_LABELS_METRIC, "Labelled answers behind kfloop_realised_accuracy.", ["model", "version"])
AGREEMENT = Gauge("kfloop_shadow_agreement", "Share of a shadow version's last answers to mirrored requests that equal "
                  "the served answers.", ["model", "version"])
MAX_LABELS_PER_REQUEST = 10_000
SHOWN_PROBLEMS = 20  # refused items named in one error message
ANSWERS_LOG, LABELS_LOG = "answers.log", "labels.log"


@dataclass(frozen=True)
class Answer:
    """What one row was answered: the version, its label, when (epoch seconds), and whether it was a shadow's
    (a mirrored copy of the request, whose answer no client saw)."""

    version: str
    predicted: str
    at: float
    shadow: bool = False


@dataclass
class _Label:
    label: str
    at: float
    joined: bool = False


@dataclass(frozen=True)
class LabelIntake:
    """How many labels of a batch were new (``accepted``) and how many were sent before (``duplicate``)."""

    accepted: int
    duplicate: int


@dataclass
class _Log:
    """An append-only JSON-lines file, each line appended whole."""

    path: Path
    fd: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self.fd).st_size

    def records(self) -> Iterator[dict]:
        """The whole lines written so far (a line torn by a crash is skipped, with a warning)."""
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("%s: line %d is not whole (a crash while it was written); skipped", self.path, number)
                    continue
                if isinstance(record, dict):
                    yield record

    def append(self, records: Sequence[dict]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        append_whole(self.fd, data, self.size)
        self.size += len(data)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class LabelBook:
    """One model's answers and labels (docs/captures.md, "Labels"); safe to share between threads."""

    def __init__(self, folder: Path, model: str, classes_of: Callable[[str], Sequence[str]], *,
                 accuracy_window: int = 200, max_answers: int = 200_000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.classes_of = classes_of
        self.accuracy_window = accuracy_window
        self.max_answers = max_answers
        self._lock = threading.RLock()
        self._answers: OrderedDict[str, dict[str, Answer]] = OrderedDict()  # row id -> version -> answer
        self._labels: dict[str, _Label] = {}
        self._outcomes: dict[str, deque[bool]] = {}
        self._agreements: dict[str, deque[bool]] = {}  # shadow version -> its answers equal to the served ones
        self._joining: dict[str, list[str]] = {}  # shard name -> row ids: logged, shard not yet written
        self._located: dict[str, Path] = {}  # row id -> the captured shard that holds it
        self._indexed: set[Path] = set()
        self._answers_log = _Log(self.folder / ANSWERS_LOG)
        self._labels_log = _Log(self.folder / LABELS_LOG)
        self._answers_written = 0
        self._recover()

    # --- answers ----------------------------------------------------------------------------

    def answered(self, ids: Sequence[str], version: str, predicted: Sequence[str], at: float | None = None, *,
                 shadow: bool = False) -> None:
        """Record that rows ``ids`` were answered ``predicted`` by ``version`` -- a ``shadow`` version's answer to a
        mirrored copy, or the one the client got -- (fsynced by :meth:`sync`)."""
        if len(ids) != len(predicted):
            raise InputError(f"{len(ids)} rows but {len(predicted)} answers")
        at = time.time() if at is None else at
        with self._lock:
            try:
                self._answers_log.append([{"ids": list(ids), "version": version, "predicted": list(predicted), "at": at,
                                           **({"shadow": True} if shadow else {})}])
            except OSError as exc:
                raise TemporaryError(f"answers of {self.model} cannot be written ({exc}); send them again") from None
            self._remember(ids, version, predicted, at, shadow)
            self._answers_written += len(ids)
            if self._answers_written > 2 * self.max_answers:
                self._compact_answers()

    def sync(self) -> None:
        """Make the recorded answers durable."""
        with self._lock:
            self._answers_log.sync()

    def _remember(self, ids: Sequence[str], version: str, predicted: Sequence[str], at: float, shadow: bool) -> None:
        for row_id, label in zip(ids, predicted):
            answers = self._answers.setdefault(row_id, {})
            first_of_version = version not in answers
            answers[version] = answer = Answer(version, str(label), at, shadow)
            self._answers.move_to_end(row_id)
            if first_of_version and row_id in self._labels:
                # A mirrored copy's answer often comes after the label for the served one: judged now.
                self._judge(answer, self._labels[row_id].label)
            served = _served(answers)
            if served is None:
                continue
            # A shadow's answer is compared with the served one, whichever of the two came first.
            for other in [answer] if shadow else [a for a in answers.values() if a.shadow]:
                agreed = self._agreements.setdefault(other.version, deque(maxlen=self.accuracy_window))
                agreed.append(other.predicted == served.predicted)
                AGREEMENT.labels(self.model, other.version).set(sum(agreed) / len(agreed))
        while len(self._answers) > self.max_answers:
            old, _ = self._answers.popitem(last=False)
            if self._labels.get(old, _Label("", 0.0, joined=True)).joined:
                self._labels.pop(old, None)
                self._located.pop(old, None)

    def _compact_answers(self) -> None:
        """Rewrite ``answers.log`` with the kept answers only (one record per version and time)."""
        groups: dict[tuple[str, float, bool], dict] = {}
        for row_id, answers in self._answers.items():
            for answer in answers.values():
                group = groups.setdefault((answer.version, answer.at, answer.shadow), {
                    "ids": [], "version": answer.version, "predicted": [], "at": answer.at,
                    **({"shadow": True} if answer.shadow else {})})
                group["ids"].append(row_id)
                group["predicted"].append(answer.predicted)
        self._answers_log.close()
        atomic_write(self.folder / ANSWERS_LOG, "".join(json.dumps(g, separators=(",", ":")) + "\n" for g in groups.values()))
        self._answers_log = _Log(self.folder / ANSWERS_LOG)
        self._answers_written = len(self._answers)

    # --- labels -----------------------------------------------------------------------------

    def add(self, items: Sequence[tuple[str, str]], at: float | None = None) -> LabelIntake:
        """Keep the labels ``(row id, label)`` of one batch -- all of them, durably, or none (docs/captures.md, "Labels")."""
        if len(items) > MAX_LABELS_PER_REQUEST:
            raise PayloadTooLarge(f"{len(items)} labels in one request; send at most {MAX_LABELS_PER_REQUEST}")
        at = time.time() if at is None else at
        with self._lock:
            new: dict[str, str] = {}
            duplicates = 0
            problems: dict[str, list[str]] = {"unknown_id": [], "unknown_class": [], "conflict": []}
            for given, label in items:
                row_id = self._row_id(given)
                if row_id is None:
                    problems["unknown_id"].append(f"{given!r}: no served row has this id (or it is older than the "
                                                  f"last {self.max_answers} answers)")
                    continue
                answer = _served(self._answers[row_id]) or next(iter(self._answers[row_id].values()))
                if label not in self.classes_of(answer.version):
                    problems["unknown_class"].append(f"{given!r}: {label!r} is not a class of version {answer.version}")
                    continue
                kept = self._labels[row_id].label if row_id in self._labels else new.get(row_id)
                if kept is None:
                    new[row_id] = label
                elif kept == label:
                    duplicates += 1
                else:
                    problems["conflict"].append(f"{given!r}: already labelled {kept!r}, not {label!r}")
            refused = {outcome: found for outcome, found in problems.items() if found}
            for outcome, found in refused.items():
                LABELS.labels(self.model, outcome).inc(len(found))
            if refused:
                raise _refusal(refused)
            if new:
                try:
                    self._labels_log.append([{"id": row_id, "label": label, "at": at} for row_id, label in new.items()])
                    self._labels_log.sync()
                except OSError as exc:  # nothing of the batch is kept in memory: its retry is taken as new
                    raise TemporaryError(f"labels of {self.model} cannot be written ({exc}); send them again") from None
                for row_id, label in new.items():
                    self._learn(row_id, label, at)
            LABELS.labels(self.model, "accepted").inc(len(new))
            LABELS.labels(self.model, "duplicate").inc(duplicates)
            return LabelIntake(len(new), duplicates)

    def _row_id(self, given: str) -> str | None:
        """The served row ``given`` names: a row id, or the inference id of a one-row request."""
        if given in self._answers:
            return given
        first = f"{given}:0"
        return first if first in self._answers and f"{given}:1" not in self._answers else None

    def _learn(self, row_id: str, label: str, at: float, joined: bool = False) -> None:
        self._labels[row_id] = _Label(label, at, joined)
        for answer in self._answers.get(row_id, {}).values():  # the served version's and any shadow's so far
            self._judge(answer, label)

    def _judge(self, answer: Answer, label: str) -> None:
        """Count ``answer`` right or wrong by ``label`` in its version's realised accuracy."""
        outcomes = self._outcomes.setdefault(answer.version, deque(maxlen=self.accuracy_window))
        outcomes.append(answer.predicted == label)
        ACCURACY.labels(self.model, answer.version).set(sum(outcomes) / len(outcomes))
        ACCURACY_LABELS.labels(self.model, answer.version).set(len(outcomes))

    @property
    def waiting(self) -> int:
        """Labels whose rows are not joined yet."""
        with self._lock:
            return sum(1 for label in self._labels.values() if not label.joined)

    def agreement(self) -> dict[str, dict[str, float]]:
        """Per shadow version: ``{"agreement": share, "answers": n}`` -- its last ``accuracy_window`` answers to
        mirrored requests that equal the served answers."""
        with self._lock:
            return {version: {"agreement": sum(a) / len(a), "answers": len(a)} for version, a in self._agreements.items() if a}

    def accuracy(self) -> dict[str, dict[str, float]]:
        """Per version: ``{"accuracy": share, "labels": n}`` over its last ``accuracy_window`` labelled answers."""
        with self._lock:
            return {version: {"accuracy": sum(o) / len(o), "labels": len(o)} for version, o in self._outcomes.items() if o}

    # --- join -------------------------------------------------------------------------------

    def join(self, area: CaptureArea) -> list[Path]:
        """Write the labelled rows whose captured shards exist as labelled shards; returns the shards written."""
        with self._lock:
            for shard in area.captured_shards():
                if shard not in self._indexed:
                    self._indexed.add(shard)
                    for row_id in CaptureArea.read(shard).ids:
                        if row_id in self._answers:
                            self._located[row_id] = shard
            logged = {i for ids in self._joining.values() for i in ids}  # a join logged before, not written yet
            waiting = [i for i, label in self._labels.items() if not label.joined and i in self._located and i not in logged]
            if waiting:
                name = "labelled-" + hashlib.sha256("\n".join(sorted(waiting)).encode()).hexdigest()[:16]
                self._labels_log.append([{"join": name, "ids": waiting}])
                self._labels_log.sync()
                self._joining[name] = waiting
            written = []
            for name, ids in list(self._joining.items()):
                path = self._write_shard(area, name, ids)
                if path is not None:
                    written.append(path)
                self._labels_log.append([{"joined": name}])
                self._labels_log.sync()
                del self._joining[name]
                for row_id in ids:
                    self._labels[row_id].joined = True
            return written

    def _write_shard(self, area: CaptureArea, name: str, ids: Sequence[str]) -> Path | None:
        """The rows ``ids`` as the labelled shard(s) ``name`` (one per captured shard), each with its ``.meta.json`` of
        what was served."""
        by_shard: dict[Path, list[str]] = {}
        for row_id in ids:
            if row_id in self._located:
                by_shard.setdefault(self._located[row_id], []).append(row_id)
            else:  # its captured shard went (retention) before the join: nothing left to join it with
                log.warning("labels of %s: row %s is no longer in the captures; its label is kept, its row is not joined",
                            self.model, row_id)
        written = None
        for number, (shard, wanted) in enumerate(sorted(by_shard.items())):
            rows = CaptureArea.read(shard)
            position = {row_id: i for i, row_id in enumerate(rows.ids)}
            part = LabelledData(rows.features[[position[i] for i in wanted]],
                                np.asarray([self._labels[i].label for i in wanted], dtype=str),
                                rows.feature_names, "captures", ids=np.asarray(wanted))
            served = {i: _described(self._answers[i], self._labels[i].at) for i in wanted if i in self._answers}
            path = area.add_labelled(part, name=name if number == 0 else f"{name}-{number}", meta={"rows": served})
            written = written or path
        return written

    # --- restart ----------------------------------------------------------------------------

    def _recover(self) -> None:
        for record in self._answers_log.records():
            ids, predicted = record.get("ids"), record.get("predicted")
            if isinstance(ids, list) and isinstance(predicted, list) and len(ids) == len(predicted):
                self._remember([str(i) for i in ids], str(record.get("version")), [str(p) for p in predicted],
                               float(record.get("at", 0.0)), bool(record.get("shadow", False)))
                self._answers_written += len(ids)
        joined: set[str] = set()
        for record in self._labels_log.records():
            if "join" in record:
                self._joining[str(record["join"])] = [str(i) for i in record.get("ids", [])]
            elif "joined" in record:
                for row_id in self._joining.pop(str(record["joined"]), []):
                    joined.add(row_id)
            elif "id" in record and "label" in record:
                self._learn(str(record["id"]), str(record["label"]), float(record.get("at", 0.0)))
        for row_id in joined:
            if row_id in self._labels:
                self._labels[row_id].joined = True

    def close(self) -> None:
        with self._lock:
            self._answers_log.close()
            self._labels_log.close()

    def figures(self) -> "TruthFigures":
        """What the labels say now: counts, realised accuracy per version, shadows' agreement."""
        with self._lock:
            return TruthFigures(answers=len(self._answers), labels=len(self._labels), waiting_to_join=self.waiting,
                                accuracy=self.accuracy(), agreement=self.agreement())


@dataclass(frozen=True)
class TruthFigures:
    """What the labels say, as the watch publishes it (``GET /status`` under :data:`STATUS_KEY`) and the rollout,
    ``kfloop status`` and the demo read it -- the one definition of that contract.

    ``accuracy``: per version, ``{"accuracy": share, "labels": n}`` over its last labelled answers; ``agreement``:
    per shadow version, ``{"agreement": share, "answers": n}`` with production's answers to the same requests.
    """

    answers: int = 0
    labels: int = 0
    waiting_to_join: int = 0
    accuracy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    agreement: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"answers": self.answers, "labels": self.labels, "waiting_to_join": self.waiting_to_join,
                "accuracy": {v: dict(f) for v, f in self.accuracy.items()},
                "agreement": {v: dict(f) for v, f in self.agreement.items()}}

    @classmethod
    def from_status(cls, status: Mapping[str, object]) -> "TruthFigures":
        """The figures in a watch's ``/status`` answer (none known when it has none); an :class:`InputError`
        when they are not of this shape."""
        try:
            data = status.get(STATUS_KEY) or {}
            accuracy = {str(v): {"accuracy": float(f["accuracy"]), "labels": int(f["labels"])}
                        for v, f in dict(data.get("accuracy") or {}).items()}
            agreement = {str(v): {"agreement": float(f["agreement"]), "answers": int(f["answers"])}
                         for v, f in dict(data.get("agreement") or {}).items()}
            return cls(int(data.get("answers", 0)), int(data.get("labels", 0)), int(data.get("waiting_to_join", 0)),
                       accuracy, agreement)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the watch's status carries no readable {STATUS_KEY!r} figures: {exc!r}") from None

    def realised_accuracy(self, version: str) -> tuple[float, int] | None:
        """``version``'s realised accuracy and how many labelled answers it is over (None: none labelled)."""
        found = self.accuracy.get(version)
        return None if not found else (float(found["accuracy"]), int(found["labels"]))

    def agreement_of(self, version: str) -> tuple[float, int] | None:
        """A shadow ``version``'s agreement with production and over how many answers (None: none yet)."""
        found = self.agreement.get(version)
        return None if not found else (float(found["agreement"]), int(found["answers"]))


def _refusal(refused: dict[str, list[str]]) -> InputError | ConflictError | NotFoundError:
    """One error for a refused batch: the first kind of problem decides the status; the message names them all."""
    shown = [p for found in refused.values() for p in found]
    message = (f"{len(shown)} label(s) refused, none kept: " + "; ".join(shown[:SHOWN_PROBLEMS])
               + (f"; and {len(shown) - SHOWN_PROBLEMS} more" if len(shown) > SHOWN_PROBLEMS else ""))
    if "unknown_class" in refused:
        return InputError(message)
    if "conflict" in refused:
        return ConflictError(message)
    return NotFoundError(message)


def _served(answers: Mapping[str, Answer]) -> Answer | None:
    """The answer the client got (None: only shadows' answers are known yet)."""
    return next((a for a in answers.values() if not a.shadow), None)


def _described(answers: Mapping[str, Answer], labelled_at: float) -> dict[str, object]:
    """A joined row's ``.meta.json`` entry: the served answer, any shadows' answers, both times."""
    served = _served(answers)
    entry: dict[str, object] = {"labelled_at": labelled_at}
    if served is not None:
        entry.update(version=served.version, answered=served.predicted, answered_at=served.at)
    shadows = {a.version: a.predicted for a in answers.values() if a.shadow}
    if shadows:
        entry["shadow_answers"] = shadows
    return entry
