"""Run one kfloop model in KServe's ModelServer, the way kfloop serves it.

:func:`run_model_server` loads a model and serves it on ``kserve.ModelServer``
with kfloop's additions: its own bind address, body limits, kfloop's error
format, no ``null`` fields, request counts, the Open Inference Protocol's
versioned routes (:func:`install_v2_infer`, :func:`install_v2_versions`),
opt-in inference credentials and a :class:`ControlPlane` (admin routes on their
own loopback port). :mod:`kfloop.serving.entrypoints` calls it for ``kfloop predictor``
and ``kfloop transformer`` (control routes: :mod:`kfloop.serving.control`).
``import kserve`` parses ``sys.argv``, so import this module only from a process
entry point, after setting ``sys.argv``. Design notes: ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import ORJSONResponse
from grpc import aio
from grpc_interceptor import AsyncExceptionToStatusInterceptor
from kserve import InferRequest, ModelServer, PredictorConfig
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import ModelNotReady
from kserve.logging import KSERVE_TRACE_LOGGER_NAME
from kserve.model_server import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as kserve_app
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError
import uvicorn

from kfloop.errors import InputError, KfloopError, describe_validation_errors
from kfloop.serving.auth import Authenticator, GrpcCredentials, RequireCredentials, inference_path
from kfloop.serving.control import control_app, install_error_handlers
from kfloop.serving.listeners import listening, uvicorn_config
from kfloop.serving.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, HeaderLimitedHttp
from kfloop.serving.metrics import GrpcRequestCounter, RequestCounter
from kfloop.serving.protocol import ServesVersions, version_not_served

DEFAULT_HOST = "127.0.0.1"
GRPC_MAX_MESSAGE = 8 * 1024 * 1024
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
}


@dataclass(frozen=True)
class ControlPlane:
    """A server's admin routes, served on their own port (loopback) behind ``authenticator``."""

    configure: Callable[[FastAPI], None]
    port: int
    authenticator: Authenticator
    host: str = DEFAULT_HOST


class _VersionedDataPlane(DataPlane):
    """kserve's data plane, with model versions: V2 metadata lists the versions a request may pin, and
    metadata and readiness can be asked of one version (404 for a version the model does not serve)."""

    def versions_of(self, model_name: str) -> tuple[str, ...]:
        """The versions ``model_name`` serves (none for a model that cannot say); ModelNotFound (404) if not served."""
        model = self.get_model_from_registry(model_name)
        return model.served_versions() if isinstance(model, ServesVersions) else ()

    def check_version(self, model_name: str, version: str) -> None:
        """Nothing if ``model_name`` serves ``version``, else a 404 (the model's, or the version's)."""
        served = self.versions_of(model_name)
        if version not in served:
            raise version_not_served(model_name, version, served)

    async def model_metadata(self, model_name: str, model_version: str | None = None) -> dict:
        if model_version is not None:
            self.check_version(model_name, model_version)
        metadata = await super().model_metadata(model_name)
        versions = self.versions_of(model_name)
        if versions:
            metadata["versions"] = list(versions)
        return metadata

    async def version_ready(self, model_name: str, model_version: str) -> bool:
        self.check_version(model_name, model_version)
        return await self.model_ready(model_name)


class _VersionedServicer(InferenceServicer):
    """kserve's gRPC servicer, with the version in ``ModelReady`` and ``ModelMetadata`` honoured (and
    ``versions`` in metadata); ``ModelInfer`` carries its version to the model in ``InferRequest.model_version``."""

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:  # noqa: N802
        if request.version:
            return pb.ModelReadyResponse(ready=await self._data_plane.version_ready(request.name, request.version))
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext) -> pb.ModelMetadataResponse:  # noqa: N802
        metadata = await self._data_plane.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata.get("versions", []), platform=metadata["platform"],
            inputs=metadata["inputs"], outputs=metadata["outputs"],
        )


class _KfloopErrorToStatus(AsyncExceptionToStatusInterceptor):
    """kfloop errors -> gRPC status by their HTTP status; kserve's own errors as kserve maps them."""

    def __init__(self) -> None:
        super().__init__()
        self._kserve = ExceptionToStatusInterceptor()

    async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str) -> None:
        if isinstance(ex, KfloopError):
            await context.abort(_GRPC_CODES.get(ex.status, grpc.StatusCode.UNAVAILABLE), str(ex))
        await self._kserve.handle_exception(ex, request_or_iterator, context, method_name)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


class OmitNulls:
    """ASGI middleware: drop ``null`` fields from V2 JSON responses.

    kserve serialises optional fields it did not fill (``model_version``,
    ``parameters``, ``versions``) as ``null``, which the Open Inference
    Protocol schema does not allow.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v2") or path.endswith("/infer"):
            await self.app(scope, receive, send)  # infer answers come from v2_infer, already without nulls
            return
        start: dict | None = None

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                if message.get("more_body"):
                    await send(start)
                    start = None
                else:
                    body = orjson.dumps(_without_nulls(orjson.loads(message["body"])))
                    headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": headers})
                    start = None
                    await send({**message, "body": body})
                    return
            await send(message)

        await self.app(scope, receive, rewrite)


def install_v2_infer(app: FastAPI, dataplane: _VersionedDataPlane) -> None:
    """V2 ``/infer`` and ``/versions/{v}/infer`` without FastAPI's generic response encoding.

    Same steps as kserve's handler (decode, ``dataplane.infer``, encode) but the
    JSON answer is written with orjson, nulls left out: kserve's route spends
    about a sixth of a predictor's CPU in ``jsonable_encoder``. Registered
    before kserve's routes, so it takes precedence; binary-tensor requests
    still go through kserve's own decoder.

    The versioned route answers 404 for a version the model does not serve
    before it reads the body, and hands the version to the model in
    ``InferRequest.model_version`` -- the field gRPC fills too -- so the model
    (which may change its versions meanwhile: the transformer's routes) has
    the last word.
    """

    async def infer(model_name: str, model_version: str | None, request: Request) -> Response:
        if model_version is not None:
            dataplane.check_version(model_name, model_version)
        body = await request.body()
        headers = dict(request.headers.items())
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        if INFERENCE_CONTENT_LENGTH_HEADER in headers:
            infer_request, _ = dataplane.decode(body, headers, protocol_version="v2", model_name=model_name)
        else:
            infer_request = _json_infer_request(body, model_name)
        if model_version is not None:
            infer_request.model_version = model_version
        response, response_headers = await dataplane.infer(model_name=model_name, request=infer_request, headers=headers)
        response, encode_headers = dataplane.encode(model_name=model_name, response=response, headers=headers, req_attributes={})
        response_headers.update(encode_headers)
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        if isinstance(response, bytes):
            return Response(content=response, headers=response_headers, media_type="application/octet-stream")
        return Response(
            content=orjson.dumps(_without_nulls(response), option=orjson.OPT_SERIALIZE_NUMPY),
            headers=response_headers,
            media_type="application/json",
        )

    async def v2_infer(model_name: str, request: Request) -> Response:
        return await infer(model_name, None, request)

    async def v2_version_infer(model_name: str, model_version: str, request: Request) -> Response:
        return await infer(model_name, model_version, request)

    app.add_api_route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", v2_version_infer, methods=["POST"],
                      include_in_schema=False)


def install_v2_versions(app: FastAPI, dataplane: _VersionedDataPlane) -> None:
    """V2 metadata and readiness of one model version (kserve 0.20 answers 501 to both); registered
    before kserve's routes, so they take precedence. 404 for a version the model does not serve."""

    async def version_metadata(model_name: str, model_version: str) -> ORJSONResponse:
        return ORJSONResponse(_without_nulls(await dataplane.model_metadata(model_name, model_version)))

    async def version_ready(model_name: str, model_version: str) -> ORJSONResponse:
        if not await dataplane.version_ready(model_name, model_version):
            raise ModelNotReady(model_name)
        return ORJSONResponse({"name": model_name, "ready": True})

    app.add_api_route("/v2/models/{model_name}/versions/{model_version}", version_metadata, methods=["GET"],
                      include_in_schema=False)
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/ready", version_ready, methods=["GET"],
                      include_in_schema=False)


def _json_infer_request(body: bytes, model_name: str) -> InferRequest:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"request body is not valid JSON: {exc}") from None
    try:
        return InferRequest.from_inference_request(InferenceRequest.model_validate(document), model_name)
    except ValidationError as exc:
        raise InputError(f"invalid V2 inference request: {describe_validation_errors(exc.errors(), show_input=False)}") from None


class _KfloopModelServer(ModelServer):
    def __init__(self, *, host: str, component: str, version_of: Callable[[str], str | None], configure_app: Callable[[FastAPI], None] | None,
                 control: ControlPlane | None, control_socket: socket.socket | None, inference_auth: Authenticator | None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **kwargs: Any) -> None:
        super().__init__(enable_latency_logging=False, **kwargs)
        self.host = host
        self.component = component
        self.version_of = version_of
        self.max_body_bytes = max_body_bytes
        self.configure_app = configure_app
        self.control = control
        self.control_socket = control_socket
        self.inference_auth = inference_auth
        self.dataplane = _VersionedDataPlane(model_registry=self.registered_models)

    def start(self, models: list[Any]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        # kserve logs a timing line per request (and uvicorn an access line): costly on the hot path.
        logging.getLogger(KSERVE_TRACE_LOGGER_NAME).setLevel(logging.WARNING)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        kserve_app.add_middleware(OmitNulls)
        kserve_app.add_middleware(BodyLimit, limit=self.max_body_bytes)
        if self.inference_auth is not None:
            kserve_app.add_middleware(RequireCredentials, authenticator=self.inference_auth, protects=inference_path)
        kserve_app.add_middleware(RequestCounter, component=self.component, version_of=self.version_of)
        install_error_handlers(kserve_app)
        install_v2_infer(kserve_app, self.dataplane)
        install_v2_versions(kserve_app, self.dataplane)
        if self.configure_app is not None:
            self.configure_app(kserve_app)
        rest = RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            grace_period=self.grace_period, timeout_keep_alive=self.timeout_keep_alive,
        )
        rest.config.host = self.host
        rest.config.http = HeaderLimitedHttp  # uvicorn reads it when the server starts (Config.load)
        rest.config.access_log = False
        self._rest_server = rest
        self.servers.append(rest.start())
        if self.enable_grpc:
            self.servers.append(self._serve_grpc())
        if self.control is not None:
            self.servers.append(self._serve_control(self.control, self.control_socket))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    async def _serve_control(self, control: ControlPlane, sock: socket.socket) -> None:
        """The admin app on ``sock`` (its own port); it stops with the REST server (uvicorn passes the signal on)."""
        app = control_app(control.configure, control.authenticator, title=f"kfloop {self.component} control")
        await uvicorn.Server(uvicorn_config(app)).serve(sockets=[sock])

    async def _serve_grpc(self) -> None:
        interceptors: tuple[Any, ...] = (GrpcRequestCounter(self.component, self.version_of), _KfloopErrorToStatus())
        if self.inference_auth is not None:
            interceptors += (GrpcCredentials(self.inference_auth),)
        server = aio.server(
            futures.ThreadPoolExecutor(max_workers=self.max_threads),
            interceptors=interceptors,
            options=[("grpc.max_send_message_length", GRPC_MAX_MESSAGE), ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE)],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            _VersionedServicer(self.dataplane, self.model_repository_extension), server
        )
        server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        self._grpc_server = _GrpcStopper(server, self.grace_period)
        await server.start()
        await server.wait_for_termination()


class _GrpcStopper:
    """What ``ModelServer.stop`` calls to stop the gRPC server."""

    def __init__(self, server: aio.Server, grace: float) -> None:
        self._server = server
        self._grace = grace

    async def stop(self, sig: int | None = None) -> None:
        await self._server.stop(grace=self._grace)


def run_model_server(
    model: Any,
    *,
    component: str,
    http_port: int,
    grpc_port: int,
    host: str = DEFAULT_HOST,
    enable_grpc: bool = True,
    predictor_config: PredictorConfig | None = None,
    configure_app: Callable[[FastAPI], None] | None = None,
    control: ControlPlane | None = None,
    inference_auth: Authenticator | None = None,
    grace_period: int = 10,
) -> None:
    """Load ``model`` and serve it until SIGTERM/SIGINT (``configure_app`` adds routes to the client-facing app).

    The control port listens before the model loads: a ready REST port means the control port takes connections.
    """
    control_socket = listening(control.host, control.port, "the control routes") if control is not None else None
    model.load()

    def version_of(name: str) -> str | None:
        return str(getattr(model, "version", "")) if name == model.name else None

    server = _KfloopModelServer(
        host=host, component=component, version_of=version_of, configure_app=configure_app, control=control,
        control_socket=control_socket, inference_auth=inference_auth,
        http_port=http_port, grpc_port=grpc_port, enable_grpc=enable_grpc,
        predictor_config=predictor_config or PredictorConfig(predictor_host=None), grace_period=grace_period,
    )
    server.start([model])
