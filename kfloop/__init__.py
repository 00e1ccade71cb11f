"""kfloop: close the machine-learning loop on Kubeflow -- train -> serve -> watch -> act.

Public API: the data loader, the model registry and the errors.
Sub-packages (``docs/architecture.md`` has the layers): ``kfloop.components``
(KFP components), ``kfloop.pipelines`` (KFP pipelines and their local/cluster
runners), ``kfloop.serving`` (the servers), ``kfloop.policies`` (what to do
when), ``kfloop.manifests`` (cluster objects), ``kfloop.drift``,
``kfloop.local`` (the loop on one machine), ``kfloop.demo``, ``kfloop.cli``.
"""

__version__ = "0.1.0"

from kfloop.errors import (  # noqa: E402
    ClusterError,
    ConflictError,
    DataError,
    InputError,
    KfloopError,
    NotFoundError,
    PermanentError,
    PipelineError,
    PolicyError,
    RegistryError,
    TemporaryError,
)

# Heavier parts of the public API load on first use: every pipeline task imports
# kfloop, and each of them pays its import time again.
_LAZY = {"LabelledData": "kfloop.data", "load_dataset": "kfloop.data", "ModelRegistry": "kfloop.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kfloop' has no attribute {name!r}")

__all__ = [
    "ClusterError",
    "ConflictError",
    "DataError",
    "InputError",
    "KfloopError",
    "NotFoundError",
    "PermanentError",
    "TemporaryError",
    "LabelledData",
    "ModelRegistry",
    "PipelineError",
    "PolicyError",
    "RegistryError",
    "__version__",
    "load_dataset",
]
