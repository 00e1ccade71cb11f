"""The transformer: the client-facing KServe model in front of the predictor replicas.

:class:`ForestTransformer` validates client rows (V1, V2, gRPC), scales them
with the model version's preprocessor, calls a predictor replica over V2 REST
and maps class indices to class names. Its traffic goes through a
:class:`TrafficSplit` of :class:`Route` s (a version and its replicas), which
``PUT /kfloop/routes`` on the control port or a routes file replaces; it also
answers requests pinned to a version and mirrors requests to a shadow route.
Explanations (V1 ``:explain``, V2 explanation outputs) take the same way: the
predictor computes them on the rows this transformer scaled
(:mod:`kfloop.serving.explanations`).
:func:`kfloop.serving.entrypoints.run_transformer` builds and serves it
(``kfloop transformer``); :mod:`kfloop.local.runtime` sets its routes.
Design notes (versions per call, pinning, shadows): ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import logging
import itertools
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import orjson
from fastapi import FastAPI, Request
from kserve import InferOutput, InferRequest, InferResponse, Model

from kfloop.errors import (
    MODEL_VERSION_HEADER, InputError, KfloopError, NotFoundError, PayloadTooLarge, TemporaryError, UpstreamError,
)
from kfloop.explain import DEFAULT_MAX_ROWS, EXPLAIN_OUTPUTS, ExplainOptions, Explanation
from kfloop.preprocessing import Preprocessor
from kfloop.registry import checked_version
from kfloop.event_types import REQUEST_EVENT, RESPONSE_EVENT
from kfloop.serving.explanations import explanation_outputs, read_tensors, requested_options
from kfloop.serving.payloads import PayloadLogger
from kfloop.serving.metrics import SHADOW_REQUESTS, UPSTREAM_REQUESTS
from kfloop.serving.protocol import (
    DEFAULT_MAX_BATCH,
    FEATURES_INPUT,
    INDEX_OUTPUT,
    LABEL_OUTPUT,
    PROBA_OUTPUT,
    REQUEST_ID_HEADER,
    InputSchema,
    pinned_version,
    version_not_served,
    versioned_input,
)

log = logging.getLogger(__name__)

ROUTES_PATH = "/kfloop/routes"  # on the control port
_UPSTREAM = re.compile(r"[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}")
VERSION_RETRIES = 3  # new versions a call may learn from predictors' 409 answers
MAX_MIRRORS_IN_FLIGHT = 256  # copies on their way to shadow routes; more are dropped (counted)
VERSION_IDLE_SECONDS = 120.0
PreprocessorLoader = Callable[[str], Preprocessor]


@dataclass
class Route:
    """One model version and the predictor replicas (``host:port``) that serve it.

    ``also`` holds the other versions its replicas were found to serve (a
    Service mid-rollout), with their preprocessors and when each last answered.
    """

    version: str
    preprocessor: Preprocessor
    upstreams: list[str]
    weight: float = 100.0
    mirror: bool = False  # a shadow: gets a copy of every request off the request path, its answers thrown away
    also: dict[str, Preprocessor] = field(default_factory=dict)
    _answered: dict[str, float] = field(default_factory=dict, repr=False)
    _cycle: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)  # version, preprocessor and also change together

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise InputError(f"route for version {self.version} has no predictor replicas")
        self._cycle = itertools.cycle(self.upstreams)
        self._answered.setdefault(self.version, time.monotonic())

    def preprocessors(self) -> dict[str, Preprocessor]:
        """Every version this route's replicas serve, with its preprocessor (a snapshot)."""
        with self._lock:
            return {self.version: self.preprocessor, **self.also}

    def add(self, version: str, preprocessor: Preprocessor) -> None:
        """A replica serves ``version`` too."""
        with self._lock:
            if version != self.version:
                self.also.setdefault(version, preprocessor)

    def answered(self, version: str, now: float) -> None:
        """Note an answer by ``version``; forget versions idle for ``VERSION_IDLE_SECONDS``."""
        with self._lock:
            self._answered[version] = now
            known = {self.version, *self.also}
            if len(known) == 1 or version not in known:
                return
            for stale in [v for v in known if now - self._answered.setdefault(v, now) > VERSION_IDLE_SECONDS]:
                if stale == self.version:  # the route's own version is gone: the answering one takes its place
                    self.version, self.preprocessor = version, self.also.pop(version)
                else:
                    self.also.pop(stale, None)
                self._answered.pop(stale, None)

    def next_upstream(self, avoid: set[str] = frozenset()) -> str:
        """The next replica round-robin, skipping those in ``avoid`` while others remain."""
        for _ in range(len(self.upstreams)):
            upstream = next(self._cycle)
            if upstream not in avoid:
                return upstream
        return next(self._cycle)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version, "also": sorted(self.also), "upstreams": list(self.upstreams), "weight": self.weight,
                    "mirror": self.mirror}


@dataclass(frozen=True)
class TrafficSplit:
    """Routes with weights (percent); one route takes all traffic."""

    routes: tuple[Route, ...]

    def pick(self) -> Route:
        if len(self.routes) == 1:
            return self.routes[0]
        point = random.uniform(0.0, sum(r.weight for r in self.routes))
        for route in self.routes:
            point -= route.weight
            if point <= 0:
                return route
        return self.routes[-1]


@dataclass
class _Call:
    """One inference request on its way through preprocess -> predict -> postprocess."""

    protocol: str  # "v1" or "v2"
    request_id: str  # the client's id (V2 ``id`` or ``x-request-id``), else the inference id
    inference_id: str  # this request's own id: the payload events' ce-id
    route: Route
    rows: np.ndarray
    preprocessors: dict[str, Preprocessor]  # the route's versions when the call began, plus any it learned
    scaled: dict[str, np.ndarray]  # version -> rows scaled with its preprocessor
    traceparent: str
    client_id: str | None = None
    requested: set[str] | None = None
    from_grpc: bool = False
    pinned: str | None = None  # the version the client asked for; only its replicas may answer
    version: str | None = None  # the version that answered
    indices: np.ndarray | None = None
    proba: np.ndarray | None = None
    v1_body: dict[str, Any] | None = None  # a V1 call's body (an explain call reads its options there)
    explain: ExplainOptions | None = None  # an explanation is asked
    explanation: dict[str, np.ndarray] | None = None  # its tensors, as the predictor answered them
    explanation_parameters: dict[str, Any] | None = None


def route_specs(body: Any) -> list[Any]:
    """The route specs of a ``PUT /kfloop/routes`` body or a routes file (each checked by :meth:`ForestTransformer.set_routes`)."""
    specs = body.get("routes") if isinstance(body, dict) else None
    if not isinstance(specs, list):
        raise InputError('routes must be {"routes": [{"version": ..., "upstreams": [...]}]}')
    return specs


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """The W3C trace context to send on: same trace id, a new span id (a fresh trace if none came in)."""
    parts = parent.split("-") if parent else []
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"{parts[0]}-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return new_traceparent()


class ForestTransformer(Model):
    """Client-facing model: same name as the predictor's (KServe forwards by name)."""

    def __init__(
        self,
        name: str,
        split: TrafficSplit,
        load_preprocessor: PreprocessorLoader,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_explain_rows: int = DEFAULT_MAX_ROWS,
        payload_logger: PayloadLogger | None = None,
        timeout: float = 30.0,
        routes_file: Path | None = None,
    ) -> None:
        super().__init__(name, return_response_headers=True)  # x-request-id: the id the request was captured under
        self.split = split
        self.routes_file = routes_file  # read in load(): a file that cannot be used stops the start-up
        self.load_preprocessor = load_preprocessor
        self.max_batch = max_batch
        self.max_explain_rows = max_explain_rows
        self.payload_logger = payload_logger
        self.timeout = timeout
        self.in_flight: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future] = {}  # versions whose preprocessor is being loaded
        self._mirrors: set[asyncio.Task] = set()  # shadow calls under way (kept referenced until they end)
        self._session: aiohttp.ClientSession | None = None
        self._schema = InputSchema(split.routes[0].preprocessor.feature_names, max_batch)

    @property
    def version(self) -> str:
        """The version taking the most traffic (what metrics report; metadata lists :meth:`served_versions`)."""
        return max(self.split.routes, key=lambda r: r.weight).version

    def served_versions(self) -> tuple[str, ...]:
        """Every version a request may pin: each route's own and those its replicas were found to serve."""
        versions = {version for route in self.split.routes for version in route.preprocessors()}
        return tuple(sorted(versions, key=lambda v: (len(v), v)))  # registry versions are digits: numeric order

    def load(self) -> bool:
        """Take the routes file's split, if given; only then is the transformer ready."""
        if self.routes_file is not None:
            try:
                body = orjson.loads(self.routes_file.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise InputError(f"cannot read the routes file {self.routes_file}: {exc}") from None
            self.set_routes(route_specs(body))
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        return [{"name": FEATURES_INPUT, "datatype": "FP32", "shape": [-1, self._schema.n_features]}]

    def get_output_types(self) -> list[dict]:
        classes = len(self.split.routes[0].preprocessor.classes)
        return [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBA_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
        ]

    # --- routes (admin) ----------------------------------------------------------------------

    def set_routes(self, specs: list[dict[str, Any]]) -> TrafficSplit:
        """Replace the traffic split; new versions' preprocessors are loaded before the swap."""
        if not specs:
            raise InputError("routes must not be empty")
        known = {version: preprocessor for r in self.split.routes for version, preprocessor in r.preprocessors().items()}
        routes = []
        for spec in specs:
            try:
                version, upstreams, weight = str(spec["version"]), list(spec["upstreams"]), float(spec.get("weight", 100))
                mirror = spec.get("mirror", False)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise InputError('each route needs "version" and "upstreams" (list of host:port), optional "weight" '
                                 'and "mirror"') from None
            if not isinstance(mirror, bool) or (mirror and weight != 0):
                raise InputError(f"route {version}: a mirror (shadow) route takes no traffic of its own: weight 0, "
                                 f"mirror true (got weight {weight!r}, mirror {mirror!r})")
            checked_version(version)
            bad = [u for u in upstreams if not isinstance(u, str) or not _UPSTREAM.fullmatch(u)]
            if bad or not 0.0 <= weight <= 100.0:
                raise InputError(f"route {version}: upstreams must be host:port and weight 0..100 (got {bad or weight!r})")
            preprocessor = known.get(version) or self.load_preprocessor(version)
            if preprocessor.feature_names != self._schema.feature_names:
                raise InputError(f"version {version} expects other features than the served model")
            routes.append(Route(version, preprocessor, upstreams, weight, mirror))
        if all(r.weight == 0 for r in routes):
            raise InputError("routes must give some route a weight above 0")
        self.split = TrafficSplit(tuple(routes))
        return self.split

    def install_control(self, app: FastAPI) -> None:
        """``GET|PUT /kfloop/routes`` (control port): the runtime's control of replicas, versions and canaries."""
        from kfloop.serving.control import control_json

        async def get_routes() -> dict[str, Any]:
            return {"routes": [r.describe() for r in self.split.routes], "in_flight": dict(self.in_flight)}

        async def put_routes(request: Request) -> dict[str, Any]:
            specs = route_specs(await control_json(request))
            split = await asyncio.get_running_loop().run_in_executor(None, self.set_routes, specs)
            return {"routes": [r.describe() for r in split.routes]}

        app.add_api_route(ROUTES_PATH, get_routes, methods=["GET"])
        app.add_api_route(ROUTES_PATH, put_routes, methods=["PUT"])

    # --- inference ---------------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess already validated the rows

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> _Call:
        headers = headers or {}
        pinned = pinned_version(payload)
        route, preprocessors = self._route_for(pinned)
        schema = self._schema
        if isinstance(payload, InferRequest):
            rows = schema.rows_from_v2(payload.inputs)
            protocol = "v2"
            requested = {o.name for o in payload.request_outputs} if payload.request_outputs else None
            known = (LABEL_OUTPUT, PROBA_OUTPUT, *EXPLAIN_OUTPUTS)
            unknown = sorted((requested or set()) - set(known))
            if unknown:
                raise InputError(f"unknown output(s) {unknown}; this model has {', '.join(known)}")
            explain = requested_options(payload, requested or ())
            client_id = payload.id or headers.get("x-request-id")
        elif isinstance(payload, dict):
            rows = schema.rows_from_v1(payload)
            protocol, requested, explain = "v1", None, None
            client_id = headers.get("x-request-id")
        else:
            raise InputError("request body is not JSON: send Content-Type: application/json")
        # Every request gets its own id (clients may reuse theirs); the client's id travels beside it.
        inference_id = str(uuid.uuid4())
        call = _Call(
            protocol=protocol,
            request_id=client_id or inference_id,
            inference_id=inference_id,
            client_id=client_id,
            route=route,
            rows=rows,
            preprocessors=preprocessors,
            scaled={version: preprocessor.transform(rows) for version, preprocessor in preprocessors.items()},
            traceparent=child_traceparent(headers.get("traceparent")),
            requested=requested,
            from_grpc=isinstance(payload, InferRequest) and payload.from_grpc,
            pinned=pinned,
            v1_body=payload if protocol == "v1" else None,
        )
        if explain is not None:
            self._ask_explanation(call, explain)
        if self.payload_logger is not None:  # logged only now that its rows are valid
            self.payload_logger.log(REQUEST_EVENT, inference_id, _event_body(payload), "application/json", call.traceparent,
                                    client_id=client_id)
        return call

    def _route_for(self, pinned: str | None) -> tuple[Route, dict[str, Preprocessor]]:
        """The route a call takes and the versions its rows are scaled for.

        Unpinned: the weighted pick, and every version its replicas serve. Pinned:
        the route serving that version (the one whose own version it is first,
        whatever its weight), and that version alone.
        """
        split = self.split  # one snapshot: PUT /kfloop/routes swaps the split
        if pinned is None:
            route = split.pick()
            return route, route.preprocessors()
        for route in sorted(split.routes, key=lambda r: r.version != pinned):
            preprocessor = route.preprocessors().get(pinned)
            if preprocessor is not None:
                return route, {pinned: preprocessor}
        raise version_not_served(self.name, pinned, self.served_versions())

    def _ask_explanation(self, call: _Call, options: ExplainOptions) -> None:
        if len(call.rows) > self.max_explain_rows:
            raise PayloadTooLarge(f"{len(call.rows)} rows to explain; at most {self.max_explain_rows} per request "
                                  "(the policy's explain.max_rows)")
        call.explain = options

    async def explain(self, call: _Call, headers: dict[str, str] | None = None) -> _Call:
        """V1 ``:explain``: the call's rows and an explanation, from a predictor (options in the body)."""
        self._ask_explanation(call, ExplainOptions.parse(call.v1_body or {}))
        return await self.predict(call, headers)

    async def predict(self, call: _Call, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> _Call:
        route = call.route
        tried: set[str] = set()
        learned = misses = 0
        body = self._body(call)
        while True:
            upstream = route.next_upstream(avoid=tried)
            try:
                status, content, served = await self._post(upstream, body, call.traceparent)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Refused, reset or dropped (a replica died or was stopped): inference has no side
                # effects, so another replica may answer it.
                UPSTREAM_REQUESTS.labels(self.name, upstream, "error").inc()
                tried.add(upstream)
                if len(tried) < len(route.upstreams):
                    continue
                raise UpstreamError(f"predictor {upstream} failed: {type(exc).__name__}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                UPSTREAM_REQUESTS.labels(self.name, upstream, "error").inc()
                raise UpstreamError(f"predictor {upstream} failed: {type(exc).__name__}") from None
            UPSTREAM_REQUESTS.labels(self.name, upstream, "ok" if status < 500 else "error").inc()
            if status == 409 and call.pinned is not None and misses < max(len(route.upstreams), VERSION_RETRIES):
                # A replica of another version (a route mid-rollout): a pinned call is not rescaled for it
                # but asked of another replica -- behind a Service, the same address reaches another pod.
                misses += 1
                tried.add(upstream)
                continue
            if status == 409 and served and served not in call.scaled and call.pinned is None and learned < VERSION_RETRIES:
                learned += 1
                await self._learn_version(call, served)
                body = self._body(call)
                continue
            return self._read_answer(call, upstream, status, content)

    @staticmethod
    def _body(call: _Call) -> bytes:
        inputs = [{"name": versioned_input(version), "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel()}
                  for version, rows in call.scaled.items()]
        outputs = [INDEX_OUTPUT, PROBA_OUTPUT, *(EXPLAIN_OUTPUTS if call.explain is not None else ())]
        body: dict[str, Any] = {"id": call.request_id, "inputs": inputs, "outputs": [{"name": name} for name in outputs]}
        if call.explain is not None:
            body["parameters"] = call.explain.to_fields()
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    async def _mirror(self, shadow: Route, call: _Call) -> None:
        """Send a copy of ``call``'s rows to the shadow route, off the request path; its answer goes to the payload
        logger only (a response event marked ``shadow``, with the call's id: the watch compares and judges it).
        Never raises: a failure is counted (``kfloop_shadow_requests_total{outcome="error"}``) and logged."""
        try:
            rows = shadow.preprocessor.transform(call.rows)
            body = orjson.dumps({"id": call.inference_id, "outputs": [{"name": INDEX_OUTPUT}],
                                 "inputs": [{"name": versioned_input(shadow.version), "shape": list(rows.shape),
                                             "datatype": "FP32", "data": rows.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
            upstream = shadow.next_upstream(avoid=set())
            status, content, _ = await self._post(upstream, body, child_traceparent(call.traceparent))
            document = orjson.loads(content)
            if status >= 400 or str(document.get("model_version")) != shadow.version:
                raise UpstreamError(f"shadow {upstream} answered HTTP {status} (version {document.get('model_version')})")
            indices = np.asarray({o["name"]: o for o in document["outputs"]}[INDEX_OUTPUT]["data"], dtype=np.int64)
            labels = shadow.preprocessor.decode(indices).tolist()
        except Exception as exc:  # the shadow never touches the client's answer
            SHADOW_REQUESTS.labels(self.name, shadow.version, "error").inc()
            log.warning("shadow call to version %s failed: %s: %s", shadow.version, type(exc).__name__, exc)
            return
        SHADOW_REQUESTS.labels(self.name, shadow.version, "ok").inc()
        if self.payload_logger is not None:
            answer = {"model_name": self.name, "model_version": shadow.version,
                      "outputs": [{"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [len(labels)], "data": labels}]}
            self.payload_logger.log(RESPONSE_EVENT, call.inference_id, answer, "application/json", call.traceparent,
                                    client_id=call.client_id, version=shadow.version, shadow=True)

    async def _learn_version(self, call: _Call, version: str) -> None:
        """A replica of the route serves ``version``: add its preprocessor to the route and to this call."""
        preprocessor = call.route.preprocessors().get(version) or await self._load_once(version)
        call.route.add(version, preprocessor)
        call.preprocessors[version] = preprocessor
        call.scaled[version] = preprocessor.transform(call.rows)

    async def _load_once(self, version: str) -> Preprocessor:
        """``version``'s preprocessor from the registry; concurrent callers share one load."""
        loading = self._loading.get(version)
        if loading is None:
            loading = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, self.load_preprocessor, version))
            self._loading[version] = loading
            loading.add_done_callback(lambda _: self._loading.pop(version, None))
        try:
            preprocessor = await asyncio.shield(loading)
        except KfloopError as exc:
            raise UpstreamError(f"a predictor serves version {version}, which this transformer cannot load: {exc}") from None
        if preprocessor.feature_names != self._schema.feature_names:
            raise UpstreamError(f"a predictor serves version {version}, which expects other features than the served model")
        return preprocessor

    async def _post(self, upstream: str, body: bytes, traceparent: str) -> tuple[int, bytes, str | None]:
        # aiohttp, not httpx, on this one hop (the hot path): benchmarks/http_clients.py shows why.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        self.in_flight[upstream] = self.in_flight.get(upstream, 0) + 1
        try:
            async with self._session.post(
                f"http://{upstream}/v2/models/{self.name}/infer",
                data=body,
                headers={"content-type": "application/json", "traceparent": traceparent},
            ) as answer:
                return answer.status, await answer.read(), answer.headers.get(MODEL_VERSION_HEADER)
        finally:
            self.in_flight[upstream] -= 1

    def _read_answer(self, call: _Call, upstream: str, status: int, content: bytes) -> _Call:
        try:
            document = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"predictor {upstream} answered HTTP {status} with a non-JSON body") from None
        if status >= 400:
            error = document.get("error", "") if isinstance(document, dict) else ""
            if call.explain is not None and status in _EXPLAIN_REFUSALS:  # the client's to mend (or to wait for)
                raise _EXPLAIN_REFUSALS[status](f"predictor {upstream}: {error}")
            raise UpstreamError(f"predictor {upstream} answered HTTP {status}: {error}")
        version = str(document.get("model_version"))
        if version not in call.scaled:
            raise UpstreamError(
                f"predictor {upstream} serves version {version}, "
                f"this transformer sent features for version(s) {sorted(call.scaled)}"
            )
        call.version = version
        call.route.answered(version, time.monotonic())
        outputs = {o["name"]: o for o in document["outputs"]}
        call.indices = np.asarray(outputs[INDEX_OUTPUT]["data"], dtype=np.int64)
        probabilities = outputs[PROBA_OUTPUT]
        call.proba = np.asarray(probabilities["data"], dtype=np.float32).reshape(probabilities["shape"])
        if call.explain is not None:
            call.explanation = read_tensors(document["outputs"])
            call.explanation_parameters = dict(document.get("parameters") or {})
        return call

    @staticmethod
    def _explanation(call: _Call) -> Explanation:
        """The explanation a predictor answered for ``call``, read back (for V1's per-row objects)."""
        assert call.explanation is not None and call.explain is not None and call.version is not None
        method = (call.explanation_parameters or {}).get("explanation_method", call.explain.method)
        return Explanation.from_tensors(call.explanation, version=call.version, method=method,
                                        class_names=call.preprocessors[call.version].classes, probabilities=call.proba)

    def postprocess(self, call: _Call, headers: dict[str, str] | None = None,
                    response_headers: dict[str, str] | None = None) -> Any:
        """The answer: labels (V1) or the V2 outputs; ``x-request-id`` is the inference id the request's rows
        were captured under (what a label names), whatever id the client gave. A gRPC answer has no headers
        (KServe's servicer sends none): it carries that id as its ``x-request-id`` parameter."""
        if response_headers is not None:
            response_headers[REQUEST_ID_HEADER] = call.inference_id
        labels = call.preprocessors[call.version].decode(call.indices).tolist()
        if call.protocol == "v1":
            response: Any = {"predictions": labels}
            if call.explanation is not None:
                response["explanations"] = self._explanation(call).rows()
        else:
            outputs = []
            if call.requested is None or LABEL_OUTPUT in call.requested:
                outputs.append(InferOutput(LABEL_OUTPUT, [len(labels)], "BYTES", labels))
            if call.requested is None or PROBA_OUTPUT in call.requested:
                outputs.append(InferOutput(PROBA_OUTPUT, list(call.proba.shape), "FP32", call.proba.ravel().tolist()))
            parameters = {REQUEST_ID_HEADER: call.inference_id} if call.from_grpc else {}
            if call.explanation is not None:
                outputs += explanation_outputs(call.explanation, call.requested or ())
                parameters |= call.explanation_parameters or {}
            response = InferResponse(
                response_id=call.request_id,
                model_name=self.name,
                model_version=call.version,
                infer_outputs=outputs,
                from_grpc=call.from_grpc,
                parameters=parameters or None,
            )
        if call.pinned is None:  # a shadow gets a copy of what the clients send, not of requests pinned elsewhere
            for shadow in self.split.routes:
                if not shadow.mirror or shadow is call.route:
                    continue
                if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:  # a slow shadow never piles up work here
                    SHADOW_REQUESTS.labels(self.name, shadow.version, "dropped").inc()
                    continue
                self._mirrors.add(task := asyncio.get_running_loop().create_task(self._mirror(shadow, call)))
                task.add_done_callback(self._mirrors.discard)
        if self.payload_logger is not None:
            self.payload_logger.log(RESPONSE_EVENT, call.inference_id, _event_body(response), "application/json", call.traceparent,
                                    client_id=call.client_id, version=call.version)
        return response


# What a predictor's refusal of an explanation means for the client (anything else is the predictor's failure).
_EXPLAIN_REFUSALS: dict[int, type[KfloopError]] = {400: InputError, 404: NotFoundError, 413: PayloadTooLarge,
                                                   503: TemporaryError}


def _event_body(payload: Any) -> Any:
    """What KServe's logger would record: the V1 dict, or the V2 REST form of a request/response."""
    if isinstance(payload, (InferRequest, InferResponse)):
        return _V2Body(payload)
    return payload


class _V2Body:
    """Defers the V2 REST conversion to the logger's worker, off the request path."""

    def __init__(self, message: InferRequest | InferResponse) -> None:
        self.message = message

    def to_json(self) -> bytes:
        body, _ = self.message.to_rest()
        if isinstance(body, bytes):
            return body
        return orjson.dumps({k: v for k, v in body.items() if v is not None}, option=orjson.OPT_SERIALIZE_NUMPY)
