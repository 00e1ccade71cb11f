"""Process entry points: build the predictor or the transformer from options and serve it.

Each function is what one server process runs (``kfloop predictor`` /
``kfloop transformer``, the same in a container and under the local runtime);
it imports kserve only after ``sys.argv`` is reduced to the program name,
because kserve parses the command line when it is imported.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerAddress:
    """Where a server listens."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may carry: rows to predict, rows to explain."""

    max_batch: int = 1024
    max_explain_rows: int = 32


@dataclass(frozen=True)
class Access:
    """Who may call a server: the control port (on loopback, behind the home's token) and opt-in inference credentials.

    ``control_port`` None: no control routes at all. ``inference_token_file`` None: inference is open.
    """

    home: Path
    control_port: int | None = None
    inference_token_file: Path | None = None


def _quiet_kserve_argv() -> None:
    sys.argv = sys.argv[:1]


def _guards(access: Access, configure_control: object) -> dict[str, object]:
    """``run_model_server``'s ``control`` and ``inference_auth`` for ``access``."""
    from kfloop.credentials import local_token, read_token
    from kfloop.serving.auth import LocalToken
    from kfloop.serving.server import ControlPlane

    control = None
    if access.control_port is not None and configure_control is not None:
        control = ControlPlane(configure_control, access.control_port, LocalToken(local_token(access.home)))
    inference_auth = None
    if access.inference_token_file is not None:  # any client host may call inference: no Host check
        inference_auth = LocalToken(read_token(access.inference_token_file), loopback_only=False)
    return {"control": control, "inference_auth": inference_auth}


def run_predictor(name: str, version_dir: str, address: ServerAddress, access: Access, limits: RequestLimits, *,
                  fault_injection: bool = False) -> None:
    """Serve one registry version folder as model ``name`` (fault injection on the control port, if asked)."""
    _quiet_kserve_argv()
    from kfloop.serving.predictor import ForestPredictor
    from kfloop.serving.server import run_model_server

    predictor = ForestPredictor(name, version_dir, max_batch=limits.max_batch, max_explain_rows=limits.max_explain_rows)
    run_model_server(
        predictor,
        **_guards(access, predictor.install_fault_injection if fault_injection else None),
        component="predictor",
        host=address.host,
        http_port=address.http_port,
        grpc_port=address.grpc_port,
        enable_grpc=address.enable_grpc,
    )


def run_transformer(
    name: str,
    registry_uri: str,
    version: str | None,
    predictor_hosts: list[str],
    address: ServerAddress,
    access: Access,
    *,
    limits: RequestLimits,
    logger_url: str | None,
    logger_token_file: Path | None = None,
    inference_service: str | None = None,
    namespace: str = "",
    routes_file: Path | None = None,
) -> None:
    """Serve model ``name`` of the registry (``version``, or production) in front of ``predictor_hosts``.

    Payload events go to ``logger_url`` with the token in ``logger_token_file`` (none: without credentials,
    as KServe's logger sends them). ``routes_file`` (a ``PUT /kfloop/routes`` body) replaces that one route
    before the transformer is ready.
    """
    _quiet_kserve_argv()
    from kfloop.registry import ModelRegistry
    from kfloop.serving.payloads import EventContext, PayloadLogger
    from kfloop.serving.server import run_model_server
    from kfloop.serving.transformer import ForestTransformer, Route, TrafficSplit

    registry = ModelRegistry(registry_uri)
    resolved = registry.resolve(name, version)

    def load_preprocessor(wanted: str):
        return registry.preprocessor(name, registry.resolve(name, wanted))

    split = TrafficSplit((Route(resolved, load_preprocessor(resolved), predictor_hosts),))
    payload_logger = None
    if logger_url:
        context = EventContext(
            source=f"http://{socket.gethostname()}:{address.http_port}/",
            inference_service=inference_service or name,
            namespace=namespace,
        )
        payload_logger = PayloadLogger(logger_url, context, name, token_file=logger_token_file)
    transformer = ForestTransformer(name, split, load_preprocessor, max_batch=limits.max_batch,
                                    max_explain_rows=limits.max_explain_rows, payload_logger=payload_logger,
                                    routes_file=routes_file)
    run_model_server(
        transformer,
        component="transformer",
        host=address.host,
        http_port=address.http_port,
        grpc_port=address.grpc_port,
        enable_grpc=address.enable_grpc,
        **_guards(access, transformer.install_control),
    )
