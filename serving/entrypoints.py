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


@dataclass(frozen=True)
class ServerAddress:
    """Where a server listens."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True


def _quiet_kserve_argv() -> None:
    sys.argv = sys.argv[:1]


def run_predictor(name: str, version_dir: str, address: ServerAddress, *, max_batch: int, fault_injection: bool = False) -> None:
    """Serve one registry version folder as model ``name``."""
    _quiet_kserve_argv()
    from kfloop.serving.predictor import ForestPredictor
    from kfloop.serving.server import run_model_server

    predictor = ForestPredictor(name, version_dir, max_batch=max_batch)
    run_model_server(
        predictor,
        configure_app=predictor.install_fault_injection if fault_injection else None,
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
    *,
    max_batch: int,
    logger_url: str | None,
    inference_service: str | None = None,
    namespace: str = "",
    admin: bool = True,
) -> None:
    """Serve model ``name`` of the registry (``version``, or production) in front of ``predictor_hosts``."""
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
        payload_logger = PayloadLogger(logger_url, context, name)
    transformer = ForestTransformer(name, split, load_preprocessor, max_batch=max_batch, payload_logger=payload_logger)
    run_model_server(
        transformer,
        component="transformer",
        host=address.host,
        http_port=address.http_port,
        grpc_port=address.grpc_port,
        enable_grpc=address.enable_grpc,
        configure_app=transformer.install_admin_routes if admin else None,
    )
