"""Run the training pipeline on this machine with ``kfp.local``: each task a subprocess (no venvs) or,
with :class:`ContainerTasks`, a container of the kfloop image (``DockerRunner``).

kfp.local writes its progress and every task's output to stdout; the run is
tapped so that the full log goes to a file, each task's start and end reach a
callback (the CLI draws its progress from them), and a failed task's own
kfloop error message is raised here instead of KFP's generic one.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import re
import tempfile
import threading
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from kfp import local

import kfloop.errors
from kfloop.errors import ClusterError, InputError, KfloopError, PipelineError
from kfloop.pipelines.training import build_training_pipeline, pipeline_arguments
from kfloop.policies import Policy
from kfloop.registry import ModelRegistry
from kfloop.search import Search

LOCAL_IMAGE = "kfloop:local"  # the tag `make image` builds


@dataclass(frozen=True)
class ContainerTasks:
    """Every task in a container of ``image`` through kfp.local's ``DockerRunner`` (docker-py, ``DOCKER_HOST``).

    What a task needs is arranged here, not by the user: the image's entry point is cleared (KFP sends its
    command as the container's Cmd; a pod's command replaces the entry point, Docker's does not), the task
    runs as the caller's uid (the pipeline root's outputs stay the caller's), a local registry and local data
    are mounted at their own paths, and there is no network -- unless the registry or the data is remote: then
    the host's (an object store on loopback here; on a cluster, the pod network). ``environment`` reaches every task:
    an object store's credentials.
    """

    image: str = LOCAL_IMAGE
    environment: Mapping[str, str] = field(default_factory=dict)

    def runner(self, *, registry_uri: str, data_uri: str | None) -> local.DockerRunner:
        from docker.types import Mount

        self._check_daemon()
        registry = ModelRegistry(registry_uri)
        mounts = []
        if registry.is_local:
            root = Path(registry.root).resolve()
            root.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(target=str(root), source=str(root), type="bind"))
        if data_uri is not None and Path(data_uri).exists():
            data = str(Path(data_uri).resolve())
            mounts.append(Mount(target=data, source=data, type="bind", read_only=True))
        remote_data = data_uri is not None and "://" in data_uri and not data_uri.startswith("file://")
        return local.DockerRunner(
            entrypoint=[""], user=f"{os.getuid()}:{os.getgid()}", mounts=mounts,
            network_mode="host" if remote_data or not registry.is_local else "none",
            environment={"HOME": "/tmp", **self.environment},
        )

    def _check_daemon(self) -> None:
        """A clear error now rather than a pull that cannot succeed (kfp.local pulls a missing image)."""
        try:
            import docker
        except ImportError:
            raise InputError("--runner docker needs docker-py: pip install 'kfloop[docker]'") from None
        try:
            client = docker.from_env()
            client.ping()
        except docker.errors.DockerException as exc:
            raise ClusterError(f"no Docker daemon answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(default)')}: {exc}") from None
        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise InputError(f"image {self.image!r} is not in the Docker daemon: build it (make image) or docker load it") from None
        finally:
            client.close()

TaskCallback = Callable[[str, str], None]  # (task name, "started" | "succeeded" | "failed")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_KFLOOP_ERROR = re.compile(r"kfloop\.errors\.(\w+): (.+)$")


class _LogTap(io.TextIOBase):
    """A stdout stand-in: writes to a log file and reports task starts and ends."""

    def __init__(self, log: io.TextIOBase, on_task: TaskCallback | None) -> None:
        self._log = log
        self._on_task = on_task
        self._pending = ""
        self._lock = threading.Lock()
        self.error: tuple[str, str] | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._log.write(text)
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for line in lines:
                self._scan(_ANSI.sub("", line))
        return len(text)

    def _scan(self, line: str) -> None:
        if match := _KFLOOP_ERROR.search(line):
            self.error = (match.group(1), match.group(2).strip())
        if self._on_task is None:
            return
        if match := _STARTED.search(line):
            self._on_task(match.group(1), "started")
        elif match := _FINISHED.search(line):
            self._on_task(match.group(1), "succeeded" if match.group(2) == "SUCCESS" else "failed")


@contextmanager
def _task_tmpdir(parent: Path) -> Iterator[None]:
    """Point child processes' TMPDIR into a folder removed afterwards (kfp.local leaves one per task)."""
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="tmp-", dir=parent) as tmp:
        os.environ["TMPDIR"] = tmp
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """Give the process back what a kfp.local run changes in it: the root logger's handlers and level (a run
    leaves a handler on a stream it closes) and ``builtins.print``, which each task replaces with an indenting
    one while it runs -- tasks of a ``ParallelFor`` overlap in threads, and the last to finish may put back
    another task's replacement (then numba, imported later by shap, refuses to start)."""
    root = logging.getLogger()
    handlers, level, original_print = root.handlers[:], root.level, builtins.print
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        builtins.print = original_print


def run_training_locally(
    policy: Policy,
    *,
    registry_uri: str,
    workdir: Path,
    data_uri: str | None = None,
    target: str | None = None,
    model: str | None = None,
    on_task: TaskCallback | None = None,
    move_production: bool = True,
    search: Search | None = None,
    containers: ContainerTasks | None = None,
) -> dict[str, Any]:
    """Run the pipeline under kfp.local; returns the promotion gate's decision
    (``move_production`` and ``search``: see :func:`~kfloop.pipelines.training.pipeline_arguments`).
    Tasks are subprocesses of this interpreter, or containers with ``containers``.

    Artifacts of the run stay under ``workdir/runs``, its log in ``workdir/logs``.
    """
    workdir = Path(workdir)
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = workdir / "logs" / f"train-{datetime.now():%Y%m%d-%H%M%S-%f}.log"
    arguments = pipeline_arguments(
        policy, data_uri=data_uri, target=target, registry_uri=str(registry_uri), model=model, move_production=move_production,
        search=search,
    )
    if containers is None:
        runner: local.SubprocessRunner | local.DockerRunner = local.SubprocessRunner(use_venv=False)
        pipeline = build_training_pipeline(policy, registry_uri=str(registry_uri))
    else:
        runner = containers.runner(registry_uri=str(registry_uri), data_uri=data_uri)
        pipeline = build_training_pipeline(policy, containers.image, registry_uri=str(registry_uri))
    # No cache (kfp.local's default, said out loud): see build_training_pipeline.
    local.init(runner=runner, pipeline_root=str((workdir / "runs").resolve()), enable_caching=False)
    with open(log_path, "w") as log, _task_tmpdir(workdir), _process_state_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfp.local warns about base_image and display names on every task
        tap = _LogTap(log, on_task)
        try:
            with redirect_stdout(tap):
                task = pipeline(**arguments)
        except RuntimeError as exc:
            raise _task_error(tap, exc, log_path) from None
    decision = dict(task.output)
    decision["log"] = str(log_path)
    return decision


def _task_error(tap: _LogTap, exc: RuntimeError, log_path: Path) -> KfloopError:
    if tap.error is not None:
        name, message = tap.error
        error_type = getattr(kfloop.errors, name, PipelineError)
        if isinstance(error_type, type) and issubclass(error_type, KfloopError):
            return error_type(message)
        return PipelineError(message)
    return PipelineError(f"{_ANSI.sub('', str(exc))} (full log: {log_path})")
