"""Chaos: the drift scenario on a real local loop while faults are injected at random moments (issue 14's table).

Usage: python benchmarks/chaos.py [--rounds 5] [--seed 0] [--rate 10] [--keep] [--json PATH]
(builtin:digits; about 20 minutes on 2 cores with --rounds 5, about 6 with --rounds 1. Run as root: the
watch's state folder is a small tmpfs, for the full-disk fault -- without one that row is skipped. Exit
status 1 when a target is missed)

The loop runs under a temporary home on free loopback ports, every part its own process, as ``kfloop up``
assembles it -- except that this script is the supervisor that starts a killed watch, trigger or runtime
again (as a pod's restart policy would):

* the local runtime: ``kfloop serve --replicas 2 --logger-url <watch>`` -- the process owning the serving
  stack (ServingRuntime and its admin API); its predictors and transformer die with it, and it restarts
  a predictor or the transformer that dies;
* ``kfloop watch``, its ``--state-dir`` (``HOME/watch/digits``: outbox, capture journal, delivery memory) on a
  32 MiB tmpfs, its ``--sink`` a small HTTP proxy in this script that forwards each alarm to the trigger
  and records it (id, raise time, answer); it can refuse one alarm with 400, or be down;
* ``kfloop trigger`` with ``--admin-url`` of the runtime: retraining under kfp.local and canary rollouts.

Scenario: the demo's drift phase, wave after wave. In wave k the clients (``--rate`` V2 requests/s, one
holdout row each) send rows shifted k times by ``kfloop.demo.traffic.shift``, and a labelled shard of the
same training rows shifted k times replaces wave k-1's (in place, atomically), so every retraining beats
production -- same rows, same split, and production has not seen this wave -- and rolls out through a canary
(a fast policy: one candidate, canary 30 % for 8 s). A wave ends when a run is promoted (or rejected: it
trained on the wave production already has).

Faults, one phase each in a random order after a warm-up (until the first promotion), ``--rounds``
injections each at a random moment (2-10 s apart); kills alternate between the middle of a canary (a run
in step ``canary`` on the trigger's ``/status``) and a random moment -- for the trigger, a random moment
while a run trains, and (4th kill) 0.3-1 s after a run's version is registered, as its promotion gate starts
(restarted at once: the gate's task outlives the trigger):

* SIGKILL of the watch, of the trigger (the process alone: a kfp.local task it started runs on), each
  started again 0-2 s later; of the transformer, of a predictor (a canary replica when mid-canary; the
  runtime restarts both); of the runtime (started again once its children are gone);
* sink outage: the proxy stops listening and the trigger is stopped (SIGTERM, its pipeline tasks with
  it), for 10-30 s;
* sink 400: the proxy refuses the next alarm for good (400, every time it comes back); the rest pass;
* corrupt outbox file: garbage (binary, cut JSON, a list, missing keys, empty) written into the outbox
  folder under a name that sorts first;
* full disk: the tmpfs is filled for 5-20 s.

Table, one row per phase (events attributed by time to the phase they happened in):

* alarms lost: alarms the watch raised (ids from its outbox, the proxy, dead-letter; plus alarms its log
  shows raised but that never got an id on disk) that the trigger never took (its answer through the proxy,
  and its state file's ``seen``), less those refused on purpose that sit in dead-letter;
* duplicate runs: more than one run for one alarm id, and retrainings of a run beyond the first that were
  not caused by a kill while it trained (kfp.local: that pipeline lived in the killed process);
* rollouts left inconsistent: each time a run ends, the runtime's traffic (admin ``/status``) against the
  registry's production pointer (the new or the old version at 100 %, the pointer on it), and runs that
  end ``failed_inconsistent`` and are never repaired; once more after the loop has settled;
* failed client requests, and how many fell while the transformer itself was down (from its kill, or the
  runtime's, until it answers ready again).

Last, the loop settles: the run under way ends, client traffic stops (a canary started after that is
rolled back for want of answers), the outbox empties and no run is left; then the end state is checked.
With ``--keep`` the home stays (logs, registry, the trigger's state, a copy of the watch's tmpfs).

Targets: 0 / 0 / 0, and failed requests only while the transformer is down.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kfloop.credentials import local_token
from kfloop.data import LabelledData, load_dataset, save_csv
from kfloop.demo.traffic import RequestRecord, Traffic, shift
from kfloop.durable import atomic_write
from kfloop.local.stack import LocalStack, StackPorts
from kfloop.local.supervisor import free_port
from kfloop.policies.retraining import FINISHED_OUTCOMES
from kfloop.policies.spec import Policy
from kfloop.prometheus_text import sum_samples
from kfloop.registry import ModelRegistry
from kfloop.training import holdout_split

MODEL = "digits"
TMPFS_SIZE = "32m"
WATCH_WINDOW = 60  # rows per tested window: at 10 req/s an alarm every ~6 s while the traffic drifts
WATCH_ALPHA = 0.001  # as the demo: clean traffic must not raise alarms
LABELLED_ROWS = 600  # training rows shifted and labelled per wave (the same rows every wave)
GAP_SECONDS = (2.0, 10.0)  # between injections
OUTAGE_SECONDS = (10.0, 30.0)
FULL_DISK_SECONDS = (5.0, 20.0)
RESTART_DELAY = (0.0, 2.0)  # before this script starts a killed watch, trigger or runtime again
STEP_WAIT = 150.0  # longest wait for a run in step canary (or training) before such a kill goes ahead anyway
SETTLE_SECONDS = 300.0
GARBAGE = (b"\x00\xff\xfe not an event \x00", b'{"id": "chaos-cut", "type": "io.kfloop.drift.detected", "sou',
           b"[1, 2, 3]", b'{"id": "chaos-no-keys"}', b"")
GARBAGE_STAMP = "00000000T000000000000"  # sorts before every real outbox file
ALARM_LINE = re.compile(rb"^(drift|outlier) alarm for ", re.MULTILINE)
KILLS = ("watch", "trigger", "transformer", "predictor", "runtime")
FAULTS = (*(f"SIGKILL {target}" for target in KILLS), "sink outage", "sink 400", "corrupt outbox file", "full disk")
WARM_UP, SETTLE = "no fault (warm-up)", "settle"


# --- processes ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Child side of Popen: SIGTERM when this script dies, so nothing it started outlives it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (read from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 0.0) -> None:
    """Wait up to ``timeout`` for group ``pgid`` to end, then SIGKILL what is left of it, by PID."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Child:
    """A process this script starts, in a process group of its own (its PID), killed and stopped by PID.

    Spawned from the main thread only: PR_SET_PDEATHSIG fires when the forking thread ends.
    """

    def __init__(self, name: str, argv: list[str], ready_url: str, log_path: Path) -> None:
        self.name, self.argv, self.ready_url, self.log_path = name, argv, ready_url, log_path
        self.process: subprocess.Popen | None = None
        self.groups: list[int] = []  # every group it led: a killed trigger's pipeline tasks stay in the old one

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        self.groups.append(self.process.pid)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode if self.process else 'never started'}); "
                                   f"see {self.log_path}")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the process itself (not its group)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``; then whatever is left in its groups."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pgid in self.groups:
            kill_group(pgid, timeout=5.0)


# --- the alarm proxy -------------------------------------------------------------------------------


class AlarmProxy:
    """The watch's sink: forwards each alarm to the trigger and records its id, raise time and answer.

    ``refuse(n)`` makes it refuse the next ``n`` new alarms with 400, each for good (every redelivery too);
    ``stop()`` closes its port (the watch then finds no sink), ``start()`` opens it again.
    """

    def __init__(self, port: int, upstream: str) -> None:
        self.port, self.upstream = port, upstream
        self.lock = threading.Lock()
        self.raised: dict[str, float] = {}  # alarm id -> raise time (its ce-time: when the outbox stored it)
        self.posts: Counter[str] = Counter()  # alarm id -> POSTs from the watch
        self.taken: set[str] = set()  # answered 2xx by the trigger
        self.refused: set[str] = set()
        self.outcomes: Counter[str] = Counter()
        self._to_refuse = 0
        self._client = httpx.Client(timeout=30.0)
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def refuse(self, count: int) -> None:
        with self.lock:
            self._to_refuse = count

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        threading.Thread(target=self._server.serve_forever, name="chaos-proxy", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.stop()
        self._client.close()

    def _forward(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        event_id = headers.get("ce-id", "")
        with self.lock:
            self.posts[event_id] += 1
            if "ce-time" in headers and event_id not in self.raised:
                try:
                    self.raised[event_id] = datetime.fromisoformat(headers["ce-time"]).timestamp()
                except ValueError:
                    self.raised[event_id] = time.time()
            if event_id in self.refused or (self._to_refuse > 0 and event_id not in self.taken):
                if event_id not in self.refused:
                    self.refused.add(event_id)
                    self._to_refuse -= 1
                self.outcomes["refused (400)"] += 1
                return 400, {"content-type": "application/json"}, b'{"error": "refused on purpose by the chaos proxy"}'
        forwarded = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection", "transfer-encoding")}
        try:
            answer = self._client.post(self.upstream, headers=forwarded, content=body)
        except httpx.HTTPError as exc:
            with self.lock:
                self.outcomes["trigger unreachable (502)"] += 1
            return 502, {"content-type": "application/json"}, json.dumps({"error": f"trigger unreachable: {exc}"}).encode()
        with self.lock:
            if 200 <= answer.status_code < 300:
                self.taken.add(event_id)
            self.outcomes[answer.headers.get("x-kfloop-outcome") or str(answer.status_code)] += 1
        kept = {k: v for k, v in answer.headers.items() if k in ("content-type", "x-kfloop-outcome", "retry-after")}
        return answer.status_code, kept, answer.content

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, headers, content = proxy._forward({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


# --- the loop under test ---------------------------------------------------------------------------


def chaos_policy() -> Policy:
    """A fast policy: one candidate, no cooldown, a short canary."""
    return Policy.model_validate({
        "model": MODEL,
        "training": {"search_space": {"n_estimators": [20], "max_features": ["sqrt"], "min_samples_leaf": [1]},
                     "parallelism": 1, "cv_folds": 2, "holdout_fraction": 0.25, "seed": 7},
        "retraining": {"cooldown_seconds": 0, "max_runs_per_day": 100_000},
        "rollout": {"canary_percent": 30, "observe_seconds": 8, "min_canary_answers": 10, "max_observe_seconds": 30,
                    "rollback_failure_rate": 0.05},
    })


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    admin: int
    watch: int
    trigger: int
    proxy: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(6)))


class Loop:
    """The processes of the loop under ``home``, the proxy and the watch's tmpfs."""

    def __init__(self, home: Path, ports: Ports, console: Console) -> None:
        self.home, self.ports, self.console = home, ports, console
        self.registry_uri = str(home / "registry")
        self.registry = ModelRegistry(self.registry_uri)
        self.policy_path = chaos_policy().save(home / "policy.yaml")
        self.state_dir = home / "watch" / MODEL
        self.outbox = self.state_dir / "outbox"
        self.trigger_state = home / "trigger" / MODEL / "trigger-state.json"
        self.logs = home / "logs"
        self.admin = f"http://127.0.0.1:{ports.admin}"
        self.trigger_url = f"http://127.0.0.1:{ports.trigger}"
        self.watch_url = f"http://127.0.0.1:{ports.watch}"
        self.ready_url = f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/ready"
        self.infer_url = f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/infer"
        local_token(home)  # created before the services that share it start (this script only reads: GETs are open)
        self.proxy = AlarmProxy(ports.proxy, self.trigger_url + "/")
        self.mounted = False
        kfloop = [sys.executable, "-m", "kfloop"]
        common = ["--registry", self.registry_uri, "--model", MODEL, "--home", str(home), "--policy", str(self.policy_path)]
        self.runtime = Child("runtime", kfloop + ["serve", *common, "--replicas", "2", "--http-port", str(ports.http),
                                                  "--grpc-port", str(ports.grpc), "--admin-port", str(ports.admin),
                                                  "--logger-url", self.watch_url + "/"],
                             self.admin + "/status", self.logs / "runtime.log")
        self.watch = Child("watch", kfloop + ["watch", *common, "--sink", self.proxy.url, "--http-port", str(ports.watch),
                                              "--state-dir", str(self.state_dir), "--window", str(WATCH_WINDOW),
                                              "--alpha", str(WATCH_ALPHA)],
                           self.watch_url + "/healthz", self.logs / "watch.log")
        self.trigger = Child("trigger", kfloop + ["trigger", *common, "--admin-url", self.admin, "--http-port", str(ports.trigger)],
                             self.trigger_url + "/healthz", self.logs / "trigger.log")

    def train_first_version(self) -> None:
        LocalStack(chaos_policy(), self.policy_path, self.home, self.registry_uri,
                   ports=StackPorts(*(free_port() for _ in range(5)))).ensure_model()

    def mount_tmpfs(self) -> bool:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(self.state_dir)],
                              check=False, capture_output=True, text=True)
        self.mounted = done.returncode == 0
        if not self.mounted:
            self.console.print(f"[yellow]no tmpfs for the watch's state ({done.stderr.strip()}): the full-disk row is skipped")
        return self.mounted

    def start(self) -> None:
        self.proxy.start()
        for child in (self.trigger, self.watch, self.runtime):
            child.spawn()
        for child in (self.trigger, self.watch, self.runtime):
            child.wait_ready(180.0)
        self.wait_transformer(60.0)

    def wait_transformer(self, timeout: float) -> float:
        """Until the transformer answers ready; returns when it did (epoch seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.ready_url, timeout=1.0).status_code == 200:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the transformer was not ready after {timeout:.0f} s; see {self.logs}")

    def serving(self) -> dict[str, Any]:
        return httpx.get(self.admin + "/status", timeout=10.0).json()

    def stop(self, *, keep: bool = False) -> None:
        """Stop every process, close the proxy, unmount the tmpfs (with ``keep``, its files are copied out first)."""
        for child in (self.runtime, self.watch, self.trigger):
            try:
                child.stop()
            except (OSError, subprocess.SubprocessError) as exc:  # go on stopping the others
                self.console.print(f"[red]stopping {child.name}: {escape(str(exc))}[/]")
        self.proxy.close()
        if self.mounted:
            if keep:
                shutil.copytree(self.state_dir, self.home / "watch-state", dirs_exist_ok=True)
            if subprocess.run(["umount", str(self.state_dir)], check=False, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.state_dir)], check=False, capture_output=True)
            self.mounted = False


# --- the drift scenario ----------------------------------------------------------------------------


class Waves:
    """Wave after wave of drift: traffic and a labelled shard, both shifted ``k`` times."""

    def __init__(self, loop: Loop, traffic: Traffic, rate: float, seed: int) -> None:
        policy = chaos_policy().training
        data = load_dataset("builtin:digits")
        train, holdout = holdout_split(data, holdout_fraction=policy.holdout_fraction, seed=policy.seed)
        chosen = np.sort(np.random.default_rng(seed).choice(len(train), size=LABELLED_ROWS, replace=False))
        self.reference = data.features[train]
        self.labelled_rows, self.labelled_labels = data.features[train][chosen], data.labels[train][chosen]
        self.holdout_rows, self.holdout_labels = data.features[holdout], data.labels[holdout]
        self.feature_names = data.feature_names
        self.captures = loop.registry.captures(MODEL)
        self.traffic, self.rate = traffic, rate
        self.wave = 0
        self.stopped = False  # the scenario is over: a late promotion changes nothing
        self.shard: Path | None = None
        self.lock = threading.Lock()
        self.started: dict[int, float] = {}

    def shifted(self, rows: np.ndarray, times: int) -> np.ndarray:
        for _ in range(times):
            rows = shift(rows, self.reference)
        return rows

    def advance(self) -> int:
        """The next wave. Its shard replaces the last one in place, atomically: a run that is assembling its
        training set meanwhile reads one wave or the other, never a shard that vanished after it was listed."""
        with self.lock:
            if self.stopped:
                return self.wave
            self.wave += 1
            ids = np.array([f"wave{self.wave}-{i}" for i in range(len(self.labelled_rows))])
            shard = LabelledData(self.shifted(self.labelled_rows, self.wave), self.labelled_labels, self.feature_names,
                                 "chaos", ids=ids)
            if self.shard is None:
                self.shard = self.captures.add_labelled(shard)
            else:
                text = io.StringIO()
                save_csv(shard, text)
                atomic_write(self.shard, text.getvalue())
            self.traffic.set(self.rate, self.shifted(self.holdout_rows, self.wave), self.holdout_labels)
            self.started[self.wave] = time.time()
            return self.wave


# --- observation -----------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float
    end: float = float("inf")
    log_start: int = 0
    log_end: int | None = None
    injections: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Observer:
    """Polls the trigger's runs and the outbox folder; checks consistency each time a run ends."""

    def __init__(self, loop: Loop, phase: Callable[[], str], on_promoted: Callable[[dict[str, Any]], None]) -> None:
        self.loop, self.phase, self.on_promoted = loop, phase, on_promoted
        self.lock = threading.Lock()
        self.runs: dict[str, dict[str, Any]] = {}
        self.running: dict[str, Any] | None = None
        self.polled = 0.0  # when the trigger last answered
        self.outbox_seen: dict[str, float] = {}  # alarm id -> stamp of its outbox file
        self.outbox_size = 0
        self.max_outbox = 0
        self.checks: list[dict[str, Any]] = []
        self._finished: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.25):
            tick += 1
            try:
                self.scan_outbox()
                if tick % 2 == 0:
                    self.poll_trigger()
            except Exception as exc:  # an observation that fails must not end the observing
                self.loop.console.print(f"[red]observer: {escape(f'{type(exc).__name__}: {exc}')}[/]")

    def scan_outbox(self) -> None:
        pending = alarm_files(self.loop.outbox)
        with self.lock:
            for event_id, stamp in pending.items():
                self.outbox_seen.setdefault(event_id, stamp)
            self.outbox_size = len(pending)
            self.max_outbox = max(self.max_outbox, len(pending))

    def poll_trigger(self) -> None:
        try:
            status = httpx.get(self.loop.trigger_url + "/status", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return
        finished = []
        with self.lock:
            self.polled = time.time()
            self.running = None
            for run in [*status["runs"], *status["pending"]]:
                self.runs[run["id"]] = run
                if run.get("outcome") == "running":
                    self.running = run
                if run.get("outcome") in FINISHED_OUTCOMES and run["id"] not in self._finished:
                    self._finished.add(run["id"])
                    finished.append(run)
        for run in finished:
            check = self.consistency(f"run {run['id']} ended {run['outcome']}")
            with self.lock:
                self.checks.append({**check, "run": run["id"], "outcome": run["outcome"], "phase": self.phase()})
            if check["state"] == "inconsistent":
                text = f"inconsistent after run {run['id']} ({run['outcome']}): {check['detail']}"
                self.loop.console.print(f"[red]{escape(text)}[/]")
            if run["outcome"] in ("promoted", "rejected"):
                self.on_promoted(run)

    def consistency(self, when: str, *, settled: bool = False) -> dict[str, Any]:
        """The runtime's traffic against the production pointer (``unknown`` if it cannot be judged now)."""
        deadline = time.monotonic() + 40.0  # a killed runtime takes ~20 s to serve again
        while True:
            try:
                traffic = {s["version"]: float(s["weight"]) for s in self.loop.serving()["traffic"]}
                break
            except (httpx.HTTPError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    return {"state": "unknown", "time": time.time(), "detail": f"{when}: the runtime's admin API did not answer"}
                time.sleep(0.5)
        pointer = self.loop.registry.production_version(MODEL)
        now = time.time()
        with self.lock:
            running = self.running
        if not settled and running is not None and (running.get("step") not in (None, "training")
                                                    or now - float(running.get("started", now)) > 12):
            # the next run's gate may have moved the pointer already: not a rollout's end state
            return {"state": "unknown", "time": now, "detail": f"{when}: the next run is under way"}
        consistent = traffic == {pointer: 100.0}
        return {"state": "consistent" if consistent else "inconsistent", "time": now,
                "detail": f"{when}: traffic {traffic}, production pointer {pointer}"}


def alarm_files(folder: Path) -> dict[str, float]:
    """Alarm id -> stamp (epoch seconds) of each event file in an outbox folder (``<UTC stamp>-<id>.json``)."""
    found = {}
    try:
        paths = [p for p in folder.glob("*.json") if not p.name.endswith(".reason.json")]
    except OSError:
        return found
    for path in paths:
        stamp, _, event_id = path.stem.partition("-")
        if stamp == GARBAGE_STAMP or not event_id:
            continue
        try:
            found[event_id] = datetime.strptime(stamp, "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return found


# --- the chaos -------------------------------------------------------------------------------------


class Chaos:
    """Plays the waves, injects the faults phase by phase, and measures."""

    def __init__(self, loop: Loop, rounds: int, rate: float, seed: int, console: Console) -> None:
        self.loop, self.rounds, self.rate, self.console = loop, rounds, rate, console
        self.rng = random.Random(seed)
        self.seed = seed
        self.phases: list[Phase] = []
        self.requests: list[RequestRecord] = []
        self.requests_lock = threading.Lock()
        self.transformer_down: list[tuple[float, float, str]] = []
        self.killed_in_training: Counter[str] = Counter()  # run id -> trigger kills/stops while it trained
        self.traffic = Traffic(loop.infer_url, self._record, lambda: self.phase.name if self.phases else WARM_UP)
        self.waves = Waves(loop, self.traffic, rate, seed)
        self.observer = Observer(loop, lambda: self.phase.name if self.phases else WARM_UP, self._on_promoted)
        self.promotions = 0

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def _record(self, record: RequestRecord) -> None:
        with self.requests_lock:
            self.requests.append(record)

    def _on_promoted(self, run: dict[str, Any]) -> None:
        if run["outcome"] == "promoted":
            self.promotions += 1
        wave = self.waves.advance()
        self.say(f"run {run['id']} {run['outcome']} (version {run.get('version')}): wave {wave}")

    def say(self, text: str, style: str = "") -> None:
        line = f"[{style}]{escape(text)}[/]" if style else escape(text)
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}", highlight=False)

    def enter(self, name: str) -> None:
        now = time.time()
        offset = watch_log_size(self.loop)
        if self.phases:
            self.phase.end, self.phase.log_end = now, offset
        self.phases.append(Phase(name, now, log_start=offset))
        with self.observer.lock:
            self.observer.max_outbox = self.observer.outbox_size
        self.say(f"phase: {name}", "bold")

    # --- the whole run ---------------------------------------------------------------------------

    def run(self) -> None:
        self.enter(WARM_UP)
        self.observer.start()
        self.traffic.start()
        self.waves.advance()
        self.wait_for(lambda: self.promotions > 0, 300.0, "a first promotion (warm-up)")
        faults = list(FAULTS)
        self.rng.shuffle(faults)
        for fault in faults:
            if fault == "full disk" and not self.loop.mounted:
                continue
            self.enter(fault)
            for index in range(self.rounds):
                time.sleep(self.rng.uniform(*GAP_SECONDS))
                self.inject(fault, index)
        self.enter(SETTLE)
        self.wait_for(lambda: self.observer.running is None, 120.0, "the run under way to end")  # its canary needs answers
        with self.waves.lock:
            self.waves.stopped = True
            self.traffic.set(0.0)
        self.settle()

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.say(f"{what} did not happen within {seconds:.0f} s", "yellow")
                return False
            time.sleep(0.25)
        return True

    def settle(self) -> None:
        """Until no alarm waits in the outbox and no run is pending or running (for 5 s in a row)."""
        quiet_since = None
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            try:
                watch = httpx.get(self.loop.watch_url + "/status", timeout=5).json()
                trigger = httpx.get(self.loop.trigger_url + "/status", timeout=5).json()
                busy = (watch["outbox"] or watch.get("unstored_alarms") or trigger["pending"]
                        or any(r["outcome"] == "running" for r in trigger["runs"]))
            except (httpx.HTTPError, ValueError, KeyError):
                busy = True
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 5:
                return
            time.sleep(0.5)
        self.say(f"the loop did not settle within {SETTLE_SECONDS:.0f} s", "yellow")

    # --- faults ----------------------------------------------------------------------------------

    def inject(self, fault: str, index: int) -> None:
        record: dict[str, Any] = {"time": 0.0, "mid_canary": False, "mid_training": False}
        if fault.startswith("SIGKILL"):
            target = fault.split()[1]
            if index % 2 == 0:
                record["mid_canary"] = self.wait_for_step("canary", 2.5)
            elif target == "trigger" and index % 4 == 3:  # the pipeline's gate is starting: it may outlive the trigger
                record["mid_training"] = record["at_gate"] = self.wait_for_registration()
            elif target == "trigger":  # the other half of the trigger's kills land while a run trains
                record["mid_training"] = self.wait_for_step("training", 18.0)
            record["time"] = time.time()
            record.update(getattr(self, f"kill_{target}")(record["mid_canary"], restart_at_once=bool(record.get("at_gate"))))
        else:
            record["time"] = time.time()
            record.update({"sink outage": self.sink_outage, "sink 400": self.sink_refusal,
                           "corrupt outbox file": lambda: self.corrupt_outbox(index), "full disk": self.full_disk}[fault]())
        self.phase.injections.append(record)
        where = (" mid-canary" if record["mid_canary"] else " at the gate" if record.get("at_gate")
                 else " mid-training" if record["mid_training"] else "")
        self.say(f"{fault} #{index + 1}{where}: {record.get('detail', '')}")

    def wait_for_step(self, step: str, spread: float) -> bool:
        """Until a run is in ``step`` (on the trigger's /status), then a random moment up to ``spread`` s into it;
        whether it still is then."""
        def in_step() -> bool:
            with self.observer.lock:
                running = self.observer.running
            return running is not None and running.get("step") == step

        if not self.wait_for(in_step, STEP_WAIT, f"a run in step {step}"):
            return False
        time.sleep(self.rng.uniform(0.0, spread))
        with self.observer.lock:
            self.observer.polled = 0.0
        self.wait_for(lambda: self.observer.polled > 0, 5.0, "a fresh look at the trigger")
        return in_step()

    def wait_for_registration(self) -> bool:
        """Until a run in training registers its version (the promotion gate is next), then 0.3-1 s more:
        the gate's task is starting. Whether the run is still in step training then."""
        if not self.wait_for_step("training", 0.0):
            return False
        known = set(self.loop.registry.versions(MODEL))
        if not self.wait_for(lambda: bool(set(self.loop.registry.versions(MODEL)) - known), 60.0, "a version registered"):
            return False
        time.sleep(self.rng.uniform(0.3, 1.0))
        return self._running_step()[1] == "training"

    def _running_step(self) -> tuple[str | None, str | None]:
        with self.observer.lock:
            running = self.observer.running
        return (running["id"], running.get("step")) if running else (None, None)

    def _restart(self, child: Child, delay: float | None = None) -> None:
        time.sleep(self.rng.uniform(*RESTART_DELAY) if delay is None else delay)
        child.spawn()
        child.wait_ready(180.0)

    def kill_watch(self, mid_canary: bool, restart_at_once: bool = False) -> dict[str, Any]:
        with self.observer.lock:
            outbox = self.observer.outbox_size
        pid = self.loop.watch.pid
        self.loop.watch.kill()
        self._restart(self.loop.watch)
        return {"detail": f"pid {pid}, {outbox} alarm(s) in the outbox; restarted as {self.loop.watch.pid}"}

    def kill_trigger(self, mid_canary: bool, restart_at_once: bool = False) -> dict[str, Any]:
        run, step = self._running_step()
        if run is not None and step in (None, "training"):
            self.killed_in_training[run] += 1
        pid = self.loop.trigger.pid
        self.loop.trigger.kill()
        self._restart(self.loop.trigger, delay=0.0 if restart_at_once else None)
        return {"detail": f"pid {pid}, run {run} in step {step}; restarted as {self.loop.trigger.pid}", "run": run, "step": step}

    def kill_transformer(self, mid_canary: bool, restart_at_once: bool = False) -> dict[str, Any]:
        transformer = self.loop.serving()["transformer"]
        killed = time.time()
        os.kill(transformer["pid"], signal.SIGKILL)
        ready = self.loop.wait_transformer(120.0)
        self.transformer_down.append((killed, ready, "transformer killed"))
        return {"detail": f"pid {transformer['pid']} (restarts so far {transformer['restarts']}); ready again after "
                          f"{ready - killed:.1f} s"}

    def kill_predictor(self, mid_canary: bool, restart_at_once: bool = False) -> dict[str, Any]:
        shares = self.loop.serving()["traffic"]
        if mid_canary and len(shares) > 1:  # a replica of the canary (the smaller share)
            shares = [min(shares, key=lambda s: s["weight"])]
        share = self.rng.choice(shares)
        replica = self.rng.choice(share["replicas"])
        os.kill(replica["pid"], signal.SIGKILL)
        killed = time.time()

        def replaced() -> bool:
            try:
                for current in self.loop.serving()["traffic"]:
                    for other in current["replicas"]:
                        if other["address"] == replica["address"]:
                            return other["alive"] and other["pid"] != replica["pid"]
                return True  # the replica is gone from the split (its version was rolled back or drained)
            except (httpx.HTTPError, ValueError):
                return False

        self.wait_for(replaced, 90.0, "the predictor's restart")
        return {"detail": f"v{share['version']} replica {replica['address']} (pid {replica['pid']}, weight {share['weight']:g}); "
                          f"replaced after {time.time() - killed:.1f} s"}

    def kill_runtime(self, mid_canary: bool, restart_at_once: bool = False) -> dict[str, Any]:
        try:
            traffic = {s["version"]: s["weight"] for s in self.loop.serving()["traffic"]}
        except (httpx.HTTPError, ValueError):
            traffic = {}
        runtime = self.loop.runtime
        pid = runtime.pid
        killed = time.time()
        runtime.kill()
        kill_group(pid, timeout=30.0)  # its predictors and transformer end on their PDEATHSIG SIGTERM
        gone = time.time()
        self._restart(runtime)
        ready = self.loop.wait_transformer(120.0)
        self.transformer_down.append((killed, ready, "runtime killed"))
        return {"detail": f"pid {pid} (traffic {traffic}); children gone after {gone - killed:.1f} s, "
                          f"transformer ready again after {ready - killed:.1f} s"}

    def sink_outage(self) -> dict[str, Any]:
        run, step = self._running_step()
        if run is not None and step in (None, "training"):
            self.killed_in_training[run] += 1
        seconds = self.rng.uniform(*OUTAGE_SECONDS)
        self.loop.proxy.stop()
        self.loop.trigger.stop()
        with self.observer.lock:
            self.observer.max_outbox = self.observer.outbox_size
        time.sleep(seconds)
        with self.observer.lock:
            held = self.observer.max_outbox
        self.loop.trigger.spawn()
        self.loop.trigger.wait_ready(180.0)
        self.loop.proxy.start()
        return {"detail": f"{seconds:.0f} s (run {run} in step {step}); the outbox held up to {held} alarm(s)", "held": held}

    def sink_refusal(self) -> dict[str, Any]:
        before = len(self.loop.proxy.refused)
        self.loop.proxy.refuse(1)
        refused = self.wait_for(lambda: len(self.loop.proxy.refused) > before, 120.0, "an alarm to refuse")
        if not refused:
            self.loop.proxy.refuse(0)
            return {"detail": "no alarm came to refuse"}
        event_id = max(self.loop.proxy.refused - set(self.phase_refused()))
        dead = self.wait_for(lambda: event_id in dead_letters(self.loop.outbox), 15.0, f"alarm {event_id} in dead-letter")
        return {"detail": f"refused alarm {event_id}; {'in dead-letter' if dead else 'NOT in dead-letter'}", "refused": event_id,
                "dead_lettered": dead}

    def phase_refused(self) -> list[str]:
        return [i["refused"] for i in self.phase.injections if i.get("refused")]

    def corrupt_outbox(self, index: int) -> dict[str, Any]:
        garbage = GARBAGE[index % len(GARBAGE)]
        path = self.loop.outbox / f"{GARBAGE_STAMP}-chaos-garbage-{index}.json"
        path.write_bytes(garbage)
        quarantined = self.wait_for(lambda: not path.exists(), 45.0, f"{path.name} to leave the outbox")
        where = "quarantined" if (self.loop.outbox / "quarantine" / path.name).exists() else (
            "gone" if quarantined else "STILL in the outbox")
        return {"detail": f"{garbage[:24]!r} -> {where}", "quarantined": where == "quarantined"}

    def watch_events(self, outcome: str) -> float:
        """The watch's count of payload events with ``outcome`` since it started (nan if it does not answer)."""
        try:
            text = httpx.get(self.loop.watch_url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            return float("nan")
        return sum_samples(text, "kfloop_watch_events_total", model=MODEL, outcome=outcome)

    def full_disk(self) -> dict[str, Any]:
        seconds = self.rng.uniform(*FULL_DISK_SECONDS)
        filler = self.loop.state_dir / "chaos-filler"
        failing: set[str] = set()
        refused_before, taken_before = self.watch_events("refused"), self.watch_events("accepted")
        try:
            with open(filler, "wb", buffering=0) as handle:  # unbuffered: ENOSPC comes from write, never from close
                for chunk in (1 << 20, 4096, 1):
                    try:
                        while True:
                            handle.write(b"\0" * chunk)
                    except OSError:
                        pass
            free = os.statvfs(self.loop.state_dir)
            free_bytes = free.f_bavail * free.f_frsize
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    failing |= set(httpx.get(self.loop.watch_url + "/status", timeout=2).json().get("failing", {}))
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)
        finally:
            filler.unlink(missing_ok=True)
        refused = self.watch_events("refused") - refused_before
        taken = self.watch_events("accepted") - taken_before  # a journal's last page may still hold a few
        return {"detail": f"{seconds:.0f} s full ({free_bytes} bytes free); the watch took {taken:g} and refused {refused:g} "
                          f"payload events (503), reported failing: {', '.join(sorted(failing)) or 'nothing'}",
                "refused_events": refused}


def watch_log_size(loop: Loop) -> int:
    try:
        return (loop.logs / "watch.log").stat().st_size
    except OSError:
        return 0


def dead_letters(outbox: Path) -> set[str]:
    return set(alarm_files(outbox / "dead-letter"))


# --- the table -------------------------------------------------------------------------------------


def analyse(chaos: Chaos, final: dict[str, Any]) -> dict[str, Any]:
    """Per phase: injections, alarms raised and lost, duplicate runs, inconsistent rollouts, failed requests."""
    loop, proxy, observer = chaos.loop, chaos.loop.proxy, chaos.observer
    state = json.loads(loop.trigger_state.read_text()) if loop.trigger_state.exists() else {"seen": [], "runs": [], "pending": []}
    seen = set(state["seen"]) | proxy.taken
    dead = dead_letters(loop.outbox)
    pending = alarm_files(loop.outbox)
    raised: dict[str, float] = {}
    for source in (observer.outbox_seen, proxy.raised, alarm_files(loop.outbox / "dead-letter"), pending):
        for event_id, moment in source.items():
            raised[event_id] = min(moment, raised.get(event_id, moment))
    runs = {**observer.runs, **{r["id"]: r for r in [*state["runs"], *state["pending"]]}}
    versions_of: Counter[str] = Counter()
    for version in loop.registry.versions(MODEL):
        source = str(loop.registry.metadata(MODEL, version).get("data", {}).get("source", ""))
        if Path(source).parent.name == "data":
            versions_of[Path(source).name] += 1
    log = (loop.logs / "watch.log").read_bytes() if (loop.logs / "watch.log").exists() else b""
    with chaos.requests_lock:
        requests = list(chaos.requests)

    def phase_of(moment: float) -> Phase:
        return next((p for p in reversed(chaos.phases) if p.start <= moment), chaos.phases[0])

    def while_down(record: RequestRecord) -> bool:
        return any(start <= record.time + record.latency and record.time <= end for start, end, _ in chaos.transformer_down)

    by_event: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(runs.values(), key=lambda r: r.get("queued", 0)):
        by_event.setdefault(run.get("event_id", ""), []).append(run)
    rows, findings = [], {"lost": [], "duplicates": [], "inconsistent": [], "failed_outside": []}
    for phase in chaos.phases:
        ids = [i for i, moment in raised.items() if phase_of(moment) is phase]
        lost = [i for i in ids if i not in seen and not (i in proxy.refused and i in dead)]
        logged = len(ALARM_LINE.findall(log[phase.log_start:phase.log_end]))
        unstored = max(0, logged - len(ids))  # raised (the log says) but never in the outbox, the proxy or dead-letter
        findings["lost"] += [{"id": i, "phase": phase.name, "raised": raised[i], "pending": i in pending,
                              "refused": i in proxy.refused, "dead_lettered": i in dead} for i in lost]
        phase_runs = [r for r in runs.values() if phase_of(float(r.get("queued", 0))) is phase]  # alarms admitted here
        ended_runs = [r for r in runs.values() if phase_of(float(r.get("finished") or r.get("queued", 0))) is phase]
        duplicates = []
        for run in phase_runs:
            earlier = by_event.get(run.get("event_id", ""), [])
            if len(earlier) > 1 and run is not earlier[0]:
                duplicates.append({"run": run["id"], "event_id": run.get("event_id"), "why": "another run for the same alarm"})
            extra = versions_of[run["id"]] - 1 - chaos.killed_in_training[run["id"]]
            if extra > 0:
                duplicates.append({"run": run["id"], "event_id": run.get("event_id"),
                                   "why": f"trained {versions_of[run['id']]} times, {chaos.killed_in_training[run['id']]} kill(s) "
                                          "while it trained"})
        retrained = sum(1 for i in phase.injections if i.get("run") and i.get("step") in (None, "training"))
        findings["duplicates"] += [{**d, "phase": phase.name} for d in duplicates]
        checks = [c for c in observer.checks  # by when the run ended (the check may come later: the runtime was down)
                  if phase_of(float(runs.get(c["run"], {}).get("finished") or c["time"])) is phase]
        bad = [c for c in checks if c["state"] == "inconsistent"]
        unrepaired = [r for r in ended_runs if r.get("outcome") == "failed_inconsistent"]
        findings["inconsistent"] += [{**c, "phase": phase.name} for c in bad]
        findings["inconsistent"] += [{"run": r["id"], "phase": phase.name, "detail": f"run ended failed_inconsistent: {r.get('error')}"}
                                     for r in unrepaired]
        failed = [r for r in requests if r.phase == phase.name and r.status != 200]
        down = [r for r in failed if while_down(r)]
        findings["failed_outside"] += [{"phase": phase.name, "time": r.time, "status": r.status, "latency": round(r.latency, 3)}
                                       for r in failed if not while_down(r)]
        outcomes = Counter(str(r.get("outcome")) for r in ended_runs)
        injected = len(phase.injections)
        mid = sum(1 for i in phase.injections if i.get("mid_canary"))
        mid_training = sum(1 for i in phase.injections if i.get("mid_training") and not i.get("at_gate"))
        at_gate = sum(1 for i in phase.injections if i.get("at_gate"))
        notes = list(phase.notes)
        if phase.name == "sink 400":
            notes.append(f"{sum(1 for i in phase.injections if i.get('dead_lettered'))}/{injected} refused alarms in dead-letter")
        if phase.name == "corrupt outbox file":
            notes.append(f"{sum(1 for i in phase.injections if i.get('quarantined'))}/{injected} files quarantined")
        if phase.name == "sink outage":
            notes.append(f"outbox held up to {max((i.get('held', 0) for i in phase.injections), default=0)} alarms")
        if retrained:
            notes.append(f"{retrained} stop(s) of the trigger while a run trained: it trained again (kfp.local)")
        if phase.name == "full disk":
            notes.append(f"{sum(i.get('refused_events', 0) for i in phase.injections):g} payload events answered 503")
        outages = [end - start for start, end, _ in chaos.transformer_down if phase_of(start) is phase]
        if outages:
            notes.append(f"transformer down {sum(outages):.1f} s in all (longest {max(outages):.1f} s)")
        if unstored:
            notes.append(f"{unstored} alarm(s) logged, never stored")
        notes.append("runs ended: " + (", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "none"))
        rows.append({
            "fault": phase.name,
            "injected": injected,
            "mid_canary": mid,
            "mid_training": mid_training,
            "at_gate": at_gate,
            "alarms_raised": len(ids) + unstored,
            "alarms_lost": len(lost) + unstored,
            "duplicate_runs": len(duplicates),
            "inconsistent": len(bad) + len(unrepaired),
            "checks": len(checks),
            "unknown_checks": sum(1 for c in checks if c["state"] == "unknown"),
            "requests": sum(1 for r in requests if r.phase == phase.name),
            "failed": len(failed),
            "failed_while_down": len(down),
            "notes": "; ".join(notes),
        })
    return {"rows": rows, "final": final, "findings": findings, "proxy_outcomes": dict(proxy.outcomes),
            "runs": sorted(runs.values(), key=lambda r: r.get("queued", 0)),
            "phases": [asdict(p) for p in chaos.phases], "transformer_down": chaos.transformer_down,
            "quarantined": sorted(p.name for p in (loop.outbox / "quarantine").glob("*") if p.is_file())
            if (loop.outbox / "quarantine").is_dir() else []}


def print_table(result: dict[str, Any], seconds: float, console: Console) -> None:
    table = Table(title=f"chaos against a local loop (kfloop serve + watch + trigger), {seconds / 60:.1f} min")
    for column, justify in (("fault", "left"), ("injected", "right"), ("alarms raised", "right"), ("alarms lost", "right"),
                            ("duplicate runs", "right"), ("rollouts inconsistent", "right"),
                            ("failed client requests", "right"), ("notes", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result["rows"]:
        where = [f"{row[key]} {label}" for key, label in (("mid_canary", "mid-canary"), ("mid_training", "mid-training"),
                                                          ("at_gate", "at the gate")) if row[key]]
        injected = str(row["injected"]) + (f" ({', '.join(where)})" if where else "")
        checks = f"{row['inconsistent']} of {row['checks']} checks" + (f", {row['unknown_checks']} unknown" if row["unknown_checks"] else "")
        failed = f"{row['failed']} of {row['requests']}" + (f" ({row['failed_while_down']} while the transformer was down)"
                                                            if row["failed_while_down"] else "")

        def red(value: int, text: str) -> str:
            return f"[red]{text}[/]" if value else text

        table.add_row(row["fault"], injected, str(row["alarms_raised"]), red(row["alarms_lost"], str(row["alarms_lost"])),
                      red(row["duplicate_runs"], str(row["duplicate_runs"])), red(row["inconsistent"], checks),
                      red(row["failed"] - row["failed_while_down"], failed), row["notes"])
    console.print(table)
    final = result["final"]
    console.print(f"end state: {final['state']} -- {final['detail']}", highlight=False)
    console.print(f"alarm answers through the proxy: {result['proxy_outcomes']}", highlight=False)
    findings = result["findings"]
    for name, title in (("lost", "alarms lost"), ("duplicates", "duplicate runs"), ("inconsistent", "inconsistent rollouts"),
                        ("failed_outside", "client requests failed while the transformer was up")):
        if findings[name]:
            console.print(f"[red]{title}[/] ({len(findings[name])}): " +
                          json.dumps(findings[name][:12], default=str), highlight=False, soft_wrap=True)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything the way Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="injections of each fault (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=10.0, help="client requests/s (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs, registry, states)")
    parser.add_argument("--json", type=Path, help="write the rows, findings, runs and phases here")
    args = parser.parse_args()
    console = Console(width=200)
    home = Path(tempfile.mkdtemp(prefix="kfloop-chaos-"))
    started = time.time()
    loop = Loop(home, Ports.free(), console)
    chaos: Chaos | None = None
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        console.print(f"home {home}; training a first version (kfp.local) ...")
        loop.train_first_version()
        loop.mount_tmpfs()
        loop.start()
        chaos = Chaos(loop, args.rounds, args.rate, args.seed, console)
        try:
            chaos.run()
        finally:
            chaos.traffic.stop()
        final = chaos.observer.consistency("after the loop settled", settled=True)
        chaos.observer.stop()
        result = analyse(chaos, final)
        print_table(result, time.time() - started, console)
        if args.json:
            args.json.write_text(json.dumps({**result, "seed": args.seed, "rounds": args.rounds, "seconds": time.time() - started},
                                            default=str, indent=1))
        failed = any(r["alarms_lost"] or r["duplicate_runs"] or r["inconsistent"] or r["failed"] > r["failed_while_down"]
                     for r in result["rows"]) or final["state"] != "consistent"
        return 1 if failed else 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if chaos is not None:
            chaos.observer.stop()
        filler = loop.state_dir / "chaos-filler"
        filler.unlink(missing_ok=True)
        loop.stop(keep=args.keep)
        if args.keep:
            console.print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
