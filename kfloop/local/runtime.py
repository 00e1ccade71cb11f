"""The local serving runtime: predictor replicas and the transformer as supervised processes.

:class:`ServingRuntime` starts ``kfloop predictor`` replicas and one
client-facing ``kfloop transformer`` (:class:`~kfloop.local.supervisor.ManagedProcess`
es), restarts those that die, and changes what is served without failing a
request (:meth:`~ServingRuntime.scale`, :meth:`~ServingRuntime.set_traffic`,
:meth:`~ServingRuntime.switch_version`); :class:`~kfloop.local.admin.AdminServer` offers the same
operations as a JSON API on loopback. :class:`~kfloop.local.stack.LocalStack`
creates both; its :class:`~kfloop.policies.scaling.Autoscaler` calls ``scale``,
and the trigger's :class:`~kfloop.policies.rollout.LocalDeployer` uses the
admin API. Changes, restarts and the routes file: ``docs/serving.md``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from kfloop.credentials import bearer, local_token, token_path
from kfloop.errors import InputError, KfloopError, TemporaryError, UpstreamError
from kfloop.durable import atomic_write
from kfloop.http_clients import http_client
from kfloop.local.supervisor import ManagedProcess, free_port
from kfloop.registry import ModelRegistry, checked_version

__all__ = ["Replica", "ServingRuntime", "TrafficShare"]

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0


@dataclass
class Replica:
    """A predictor replica serving one version."""

    version: str
    port: int
    process: ManagedProcess
    control_port: int | None = None  # fault injection, when the runtime has it on

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class TrafficShare:
    """A version and the percentage of requests it takes."""

    version: str
    weight: float
    replicas: list[Replica] = field(default_factory=list)
    mirror: bool = False  # a shadow: weight 0, gets a copy of every request (its answers thrown away)


class ServingRuntime:
    """Predictors + transformer for one registry model, on this machine."""

    def __init__(
        self,
        registry_uri: str,
        model: str,
        *,
        home: Path,
        version: str | None = None,
        replicas: int = 1,
        host: str = "127.0.0.1",
        http_port: int = 8080,
        grpc_port: int = 8081,
        logger_url: str | None = None,
        log_dir: Path = Path(".kfloop/logs"),
        max_batch: int = 1024,
        max_explain_rows: int = 32,
        fault_injection: bool = False,
        prometheus_targets: Path | None = None,
        max_replicas: int = 100,
        inference_token_file: Path | None = None,
    ) -> None:
        self.registry = ModelRegistry(registry_uri)
        if not self.registry.is_local:
            raise InputError("the local runtime serves from a local registry path")
        self.model = model
        self.initial_version = version
        self.initial_replicas = replicas
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.logger_url = logger_url
        self.log_dir = Path(log_dir)
        self.routes_file = self.log_dir / f"transformer-{model}-routes.json"  # the split a (re)started transformer takes
        self.home = Path(home)
        self._http = http_client(timeout=5.0, headers=bearer(local_token(self.home)))  # every control call
        self.inference_token_file = inference_token_file
        self.transformer_control_port = free_port()  # kept across transformer restarts
        self.max_batch = max_batch
        self.max_explain_rows = max_explain_rows
        self.fault_injection = fault_injection
        self.prometheus_targets = prometheus_targets
        self.max_replicas = max_replicas  # the policy's bound: no admin call scales past it
        self.shares: list[TrafficShare] = []
        self.transformer: ManagedProcess | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start replicas, then the transformer in front of them; return once all are ready. If one of them
        does not start, every process started so far is stopped before the error is raised."""
        version = self.registry.resolve(self.model, self.initial_version)
        try:
            with self._lock:
                share = TrafficShare(version, 100.0, self._start_replicas(version, self.initial_replicas))
                self.shares = [share]
                self._write_routes()
                self.transformer = self._transformer_process(version, [r.address for r in share.replicas])
                self.transformer.spawn()
                self.transformer.wait_ready()
        except BaseException:
            self.stop()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="kfloop-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        """Stop every process this runtime started (transformer first, then replicas)."""
        self._stop.set()
        with self._lock:
            processes = ([self.transformer] if self.transformer else []) + [
                r.process for s in self.shares for r in s.replicas
            ]
            for process in processes:
                process.stop()
            self.shares = []

    def __enter__(self) -> "ServingRuntime":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "rest": f"http://{self.host}:{self.http_port}",
            "grpc": f"{self.host}:{self.grpc_port}",
            "v1": f"http://{self.host}:{self.http_port}/v1/models/{self.model}:predict",
            "explain": f"http://{self.host}:{self.http_port}/v1/models/{self.model}:explain",
            "v2": f"http://{self.host}:{self.http_port}/v2/models/{self.model}/infer",
        }

    # --- operations --------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The version taking the most traffic."""
        return max(self.shares, key=lambda s: s.weight).version

    def replica_count(self, version: str | None = None) -> int:
        version = version or self.version
        return sum(len(s.replicas) for s in self.shares if s.version == version)

    def scale(self, replicas: int) -> int:
        """Set the number of predictor replicas of the main version (at least 1)."""
        if not 1 <= replicas <= self.max_replicas:
            raise InputError(f"replicas must be between 1 and {self.max_replicas} (the policy's max_replicas), got {replicas}")
        with self._lock:
            removed: list[Replica] = []
            with self._changing() as started:
                share = max(self.shares, key=lambda s: s.weight)
                if replicas > len(share.replicas):
                    started += self._start_replicas(share.version, replicas - len(share.replicas))
                    share.replicas.extend(started)
                elif replicas < len(share.replicas):
                    removed = share.replicas[replicas:]
                    del share.replicas[replicas:]
                if started or removed:
                    self._apply_routes()
            self._drain_and_stop(removed)
            return len(share.replicas)

    def set_traffic(self, weights: dict[str, float], mirror: str | None = None) -> None:
        """Send ``weights`` (version -> percent) of requests to each version, and a copy of every request to
        ``mirror`` (a shadow version, one replica, whose answers only the watch sees); starts and drains replicas."""
        if not weights or not all(0.0 <= w <= 100.0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise InputError(f"traffic weights must be percentages (0 to 100), not all zero, got {weights}")
        if mirror is not None and weights.get(mirror, 0) > 0:
            raise InputError(f"version {mirror} cannot be both a shadow (mirror) and take {weights[mirror]:g} % of traffic")
        with self._lock:
            for version in [*weights, *([mirror] if mirror is not None else [])]:  # all exist before a replica starts
                self.registry.metadata(self.model, checked_version(version))
            replicas_each = max(1, self.replica_count())
            with self._changing() as started:
                kept = []
                for version, weight in weights.items():
                    if weight == 0:
                        continue
                    current = next((s for s in self.shares if s.version == version), None)
                    if current is None:
                        current = TrafficShare(version, weight, self._start_replicas(version, replicas_each))
                        started += current.replicas
                    current.weight, current.mirror = float(weight), False
                    kept.append(current)
                if mirror is not None:
                    shadow = next((s for s in self.shares if s.version == mirror), None)
                    if shadow is None:
                        shadow = TrafficShare(mirror, 0.0, self._start_replicas(mirror, 1))
                        started += shadow.replicas
                    shadow.weight, shadow.mirror = 0.0, True
                    kept.append(shadow)
                dropped = [s for s in self.shares if s not in kept]
                self.shares = kept
                self._apply_routes()
            self._drain_and_stop([r for s in dropped for r in s.replicas])

    def switch_version(self, version: str) -> None:
        """Move all traffic to ``version`` without failing a request (start new, switch, drain old)."""
        self.set_traffic({version: 100.0})

    def status(self) -> dict[str, Any]:
        """What is served (read without the lock: a transformer restart holds it until the transformer is ready,
        and a rollout reads the status meanwhile)."""
        shares = list(self.shares)
        return {
            "model": self.model,
            "version": max(shares, key=lambda s: s.weight).version if shares else None,
            "endpoints": self.endpoints,
            "transformer": self._describe(self.transformer) if self.transformer else None,
            "traffic": [
                {"version": s.version, "weight": s.weight, "mirror": s.mirror,
                 "replicas": [{"address": r.address, **self._describe(r.process)} for r in s.replicas]}
                for s in shares
            ],
        }

    @staticmethod
    def _describe(process: ManagedProcess) -> dict[str, Any]:
        return {"pid": process.pid, "alive": process.alive(), "restarts": process.restarts, "log": str(process.log_path)}

    # --- internals ---------------------------------------------------------------------------

    def _kfloop(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kfloop", *args]

    def _start_replicas(self, version: str, count: int) -> list[Replica]:
        version_dir = self.registry.uri(self.model, version)
        started = []
        for _ in range(count):
            port = free_port()
            control_port = free_port() if self.fault_injection else None
            control = ["--fault-injection", "--control-port", str(control_port)] if control_port else []
            process = ManagedProcess(
                name=f"predictor {self.model} v{version} :{port}",
                argv=self._kfloop(
                    "predictor", "--model-dir", version_dir, "--model", self.model, "--http-port", str(port),
                    "--no-grpc", "--max-batch", str(self.max_batch), "--max-explain-rows", str(self.max_explain_rows), "--home", str(self.home), *control,
                ),
                ready_url=f"http://127.0.0.1:{port}/v2/models/{self.model}/ready",
                log_path=self.log_dir / f"predictor-{self.model}-v{version}-{port}.log",
            )
            process.spawn()
            started.append(Replica(version, port, process, control_port))
        try:
            for replica in started:
                replica.process.wait_ready()
        except KfloopError:
            for replica in started:
                replica.process.stop()
            raise
        return started

    def _transformer_process(self, version: str, upstreams: list[str]) -> ManagedProcess:
        argv = self._kfloop(
            "transformer", "--model", self.model, "--registry", self.registry.root, "--version", version,
            "--predictor-host", ",".join(upstreams), "--host", self.host,
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--max-batch", str(self.max_batch),
            "--max-explain-rows", str(self.max_explain_rows),
            "--home", str(self.home), "--control-port", str(self.transformer_control_port),
            "--routes-file", str(self.routes_file),
        )
        if self.logger_url:  # the watch on this machine takes events with the home's token
            argv += ["--logger-url", self.logger_url, "--logger-token-file", str(token_path(self.home))]
        if self.inference_token_file is not None:
            argv += ["--auth-token-file", str(self.inference_token_file)]
        return ManagedProcess(
            name=f"transformer {self.model}",
            argv=argv,
            ready_url=f"http://{self.host}:{self.http_port}/v2/models/{self.model}/ready",
            log_path=self.log_dir / f"transformer-{self.model}.log",
        )

    def _routes_url(self) -> str:
        return f"http://127.0.0.1:{self.transformer_control_port}/kfloop/routes"

    def metrics_urls(self) -> list[str]:
        """``/metrics`` of every predictor replica (what a Prometheus would scrape)."""
        with self._lock:
            return [f"http://{r.address}/metrics" for s in self.shares for r in s.replicas]

    def inject_failures(self, rate: float, version: str | None = None) -> None:
        """Make the replicas (of ``version``, default all) answer ``rate`` of requests with 503."""
        if not self.fault_injection:
            raise InputError("this runtime was started without fault injection")
        with self._lock:
            replicas = [r for s in self.shares for r in s.replicas if version is None or s.version == version]
        for replica in replicas:
            answer = self._http.put(f"http://127.0.0.1:{replica.control_port}/kfloop/faults", json={"failure_rate": rate},
                                    timeout=5.0)
            if answer.status_code != 200:
                raise UpstreamError(f"replica {replica.address} refused fault injection: {answer.text}")

    def _write_prometheus_targets(self) -> None:
        """Prometheus ``file_sd`` targets of the replicas, replaced atomically."""
        if self.prometheus_targets is None:
            return
        groups = [{"targets": [r.address for r in s.replicas], "labels": {"version": s.version}} for s in self.shares]
        atomic_write(self.prometheus_targets, json.dumps(groups))

    def _routes_body(self) -> dict[str, Any]:
        """The split as ``PUT /kfloop/routes`` takes it (and the routes file holds it)."""
        return {"routes": [{"version": s.version, "weight": s.weight, "upstreams": [r.address for r in s.replicas],
                            **({"mirror": True} if s.mirror else {})} for s in self.shares]}

    def _write_routes(self) -> None:
        """The routes file and the Prometheus targets of the current shares."""
        try:
            self._write_prometheus_targets()
            atomic_write(self.routes_file, json.dumps(self._routes_body()))
        except OSError as exc:
            raise TemporaryError(f"cannot write the routes of {self.model}: {exc}") from None

    def _apply_routes(self) -> None:
        """Give the transformer the current split: first the routes file (what a restart takes), then ``PUT``."""
        self._write_routes()
        try:
            response = self._http.put(self._routes_url(), json=self._routes_body(), timeout=30.0)
        except httpx.TransportError as exc:
            raise TemporaryError(
                f"the transformer did not take the new routes ({type(exc).__name__}: {exc}); it is down or restarting, try again"
            ) from None
        if response.status_code != 200:
            raise UpstreamError(f"transformer refused the new routes: HTTP {response.status_code} {response.text}")

    @contextmanager
    def _changing(self) -> Iterator[list[Replica]]:
        """A change of the shares (under the lock) that is undone if it fails.

        The change adds the replicas it starts to the list it is given. If it
        raises, the shares and their weights and replicas are put back, the old
        routes re-applied (best effort), and the started replicas stopped.
        """
        previous = [(share, share.weight, share.mirror, list(share.replicas)) for share in self.shares]
        started: list[Replica] = []
        try:
            yield started
        except BaseException:
            for share, weight, mirror, replicas in previous:
                share.weight, share.mirror, share.replicas[:] = weight, mirror, replicas
            self.shares = [share for share, _, _, _ in previous]
            try:
                self._apply_routes()
            except KfloopError as exc:
                # It may hold the new split (a PUT that timed out): a restart makes it take the old one from the file.
                if self.transformer is not None and self.transformer.alive():
                    log.warning("the transformer did not take the old routes back (%s); restarting it", exc)
                    self.transformer.process.kill()
            finally:
                for replica in started:
                    replica.process.stop()
            raise

    def _in_flight(self) -> dict[str, int] | None:
        """Requests in flight per replica address, as the transformer counts them; None when it cannot tell now."""
        try:
            answer = self._http.get(self._routes_url(), timeout=5.0)
        except httpx.ConnectError:
            return {}  # down: its requests ended with it, and its restart takes the routes file
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        try:
            return dict(answer.json()["in_flight"])
        except (ValueError, KeyError, TypeError):
            return None

    def _drain_and_stop(self, replicas: list[Replica]) -> None:
        """Wait until the transformer has no request in flight to ``replicas`` (at most DRAIN_TIMEOUT), then stop them."""
        addresses = {r.address for r in replicas}
        deadline = time.monotonic() + DRAIN_TIMEOUT
        try:
            while addresses and time.monotonic() < deadline:
                in_flight = self._in_flight()
                if in_flight is not None and not any(in_flight.get(a, 0) for a in addresses):
                    break
                time.sleep(0.05)
        finally:
            for replica in replicas:
                replica.process.stop()

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                processes = [r.process for s in self.shares for r in s.replicas]
                processes += [self.transformer] if self.transformer else []
            for process in processes:
                if not process.stopping and not process.alive():
                    self._restart(process)

    def _restart(self, process: ManagedProcess) -> None:
        code = process.process.returncode if process.process else None
        delay = process.exited()
        log.warning("%s exited (code %s); restarting in %.1f s", process.name, code, delay)
        if self._stop.wait(delay):
            return
        with self._lock:  # a process a change stopped meanwhile stays stopped
            if process.stopping or self._stop.is_set():
                return
            process.respawn()
            if process is self.transformer:
                # It reads the routes file while it starts: no change until it is ready (docs/serving.md).
                self._wait_ready(process)
                return
        self._wait_ready(process)

    @staticmethod
    def _wait_ready(process: ManagedProcess) -> None:
        try:
            process.wait_ready()
        except KfloopError as exc:
            log.error("restart of %s failed: %s", process.name, exc)
