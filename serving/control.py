"""Control apps: the small JSON APIs that change what a kfloop process does, built one way.

:func:`control_app` wraps a FastAPI app's routes in what every control API
needs, from one place: credentials (:class:`~kfloop.serving.auth.RequireCredentials`),
a body limit (:class:`~kfloop.serving.limits.BodyLimit`), kfloop's JSON
error format for every refusal (:func:`install_error_handlers`) and bodies read
by :func:`control_json`. The predictor's and transformer's control ports
(:mod:`kfloop.serving.server`) and the local runtime's admin API
(:mod:`kfloop.local.admin`) are built with it; :mod:`kfloop.serving.listeners` serves them.
kserve-free: importing it parses no ``sys.argv``.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kfloop.errors import InputError, KfloopError, NotFoundError, UnsupportedMediaType, describe_validation_errors, to_http
from kfloop.serving.auth import Authenticator, RequireCredentials
from kfloop.serving.limits import BodyLimit

__all__ = ["CONTROL_MAX_BODY", "control_app", "control_json", "error_response", "install_error_handlers", "json_response"]

CONTROL_MAX_BODY = 64 * 1024  # bytes: control calls are a few fields


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: KfloopError) -> Response:
    """``exc`` as kfloop's JSON error answer (``{"error": ...}``, its status and headers)."""
    answer = to_http(exc)
    return json_response(answer.status, answer.body, answer.headers)


async def _kfloop_error(_: Request, exc: KfloopError) -> Response:
    return error_response(exc)


async def _no_route(request: Request, _: Exception) -> Response:
    return error_response(NotFoundError(f"no route {request.method} {request.url.path}"))


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return error_response(InputError(f"invalid request body: {describe_validation_errors(exc.errors(), show_input=False)}"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own answers (no route, method not allowed) in kfloop's format rather than ``{"detail": ...}``."""
    if exc.status_code == 404:
        return await _no_route(request, exc)
    return json_response(exc.status_code, {"error": str(exc.detail)}, exc.headers)


async def _bug(request: Request, exc: Exception) -> Response:
    """A bug: still kfloop's JSON (uvicorn logs the traceback), never a dropped connection."""
    return json_response(500, {"error": f"internal error ({type(exc).__name__}) in {request.url.path}: see the log"})


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal of ``app`` in kfloop's JSON error format: its own errors, bad bodies, no route, wrong method."""
    app.add_exception_handler(KfloopError, _kfloop_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]


async def control_json(request: Request) -> dict[str, Any]:
    """A control call's body: a JSON object sent as ``application/json`` (415 otherwise, 400 if not an object)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json, not {content_type or 'nothing'!r}")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InputError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    return body


def control_app(configure: Callable[[FastAPI], None], authenticator: Authenticator, *, title: str,
                protects: Callable[[str], bool] = lambda _: True, max_body: int = CONTROL_MAX_BODY) -> Any:
    """An ASGI app of the routes ``configure`` adds: paths ``protects`` names need ``authenticator``, bodies are
    at most ``max_body`` bytes, every error is kfloop's JSON."""
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_exception_handler(Exception, _bug)
    configure(app)
    return RequireCredentials(BodyLimit(app, limit=max_body), authenticator=authenticator, protects=protects)
