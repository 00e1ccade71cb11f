"""Putting rendered objects on a cluster: server-side apply, a Ready wait, and what changed.

:class:`Cluster` is one connection to one kube context (or the pod's own
service account). :meth:`Cluster.apply` server-side-applies objects as field
manager ``kfloop`` and reports each as ``created``, ``configured`` or
``unchanged``; :meth:`Cluster.wait_ready` follows an InferenceService's
conditions until it is Ready; :meth:`Cluster.check_eventing_features` reads
Knative Eventing's feature flags before anything is applied and refuses when
one the objects need is off. :func:`apply_objects` and :func:`wait_ready` are
the one-call forms; :func:`feature_patch_command` is the ``kubectl`` line that
turns flags on.

Every failure is one :class:`~kfloop.errors.ClusterError` line that names the
kube context: no kube config, an unknown context, an unreachable API server, a
kind the cluster does not know (with the operator that provides it), or a
refused object.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from kfloop.errors import ClusterError
from kfloop.kube import first_line, in_cluster

__all__ = ["EVENTING_FEATURES", "Change", "Cluster", "FeatureValues", "apply_objects", "feature_patch_command", "wait_ready"]

IN_CLUSTER = "in-cluster"
_OPERATORS = {
    "serving.kserve.io": "KServe",
    "keda.sh": "KEDA",
    "eventing.knative.dev": "Knative Eventing",
    "monitoring.coreos.com": "the Prometheus operator",
}
_VOLATILE_METADATA = ("resourceVersion", "managedFields", "generation", "creationTimestamp", "uid")
_ISVC_CONDITIONS = ("PredictorReady", "TransformerReady", "IngressReady", "Ready")
EVENTING_FEATURES = ("knative-eventing", "config-features")  # namespace and name of Knative Eventing's feature flags

FeatureValues = dict[str, tuple[str, ...]]
"""A Knative Eventing feature flag and the values that satisfy it; the first is the one to set."""

ProgressCallback = Callable[[dict[str, str], str], None]
"""Called on every poll with ``{condition type: "True"|"False"|"Unknown"}`` and the newest message."""


@dataclass(frozen=True)
class Change:
    """What one apply did to one object."""

    kind: str
    namespace: str
    name: str
    action: str  # created | configured | unchanged

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "action": self.action}


class Cluster:
    """A connection to the API server of one kube context."""

    def __init__(self, client: Any, context: str, server: str) -> None:
        self.client = client  # kubernetes.dynamic.DynamicClient
        self.context = context
        self.server = server

    @classmethod
    def connect(cls, context: str | None = None, *, timeout: float = 10.0) -> "Cluster":
        """Load the kube config (``KUBECONFIG`` or ``~/.kube/config``; inside a pod, its service account) and reach the API server."""
        from kubernetes import client, config
        from kubernetes.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION
        from kubernetes.dynamic import DynamicClient

        location = os.environ.get("KUBECONFIG", KUBE_CONFIG_DEFAULT_LOCATION)
        paths = [os.path.expanduser(p) for p in location.split(os.pathsep) if p]
        if context is None and not any(os.path.exists(p) for p in paths) and in_cluster():
            config.load_incluster_config()
            api_client, name = client.ApiClient(), IN_CLUSTER
        else:
            if not any(os.path.exists(p) for p in paths):
                raise ClusterError(f"no kube config found at {location}: set KUBECONFIG or give --context")
            try:
                contexts, active = config.list_kube_config_contexts(config_file=location)
                name = context or (active or {}).get("name") or "?"
                if context is not None and context not in {c["name"] for c in contexts}:
                    known = ", ".join(sorted(c["name"] for c in contexts)) or "none"
                    raise ClusterError(f"kube context {context!r} is not in {location} (it has: {known})")
                api_client = config.new_client_from_config(config_file=location, context=context)
            except config.ConfigException as exc:
                raise ClusterError(f"cannot use kube config {location}: {first_line(exc)}") from None
        api_client.configuration.retries = False  # one clear error rather than urllib3's retries
        server = api_client.configuration.host
        try:
            if not api_client.configuration.proxy:
                _connect_tcp(server, timeout)  # urllib3 has no connect timeout here: a black hole would hang
            dynamic = DynamicClient(api_client)  # reads /version and the API groups
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach"; say why in one line
            raise ClusterError(f"cannot reach the cluster of kube context {name!r} ({server}): {_reason(exc)}") from None
        return cls(dynamic, name, server)

    # --- apply -------------------------------------------------------------------------------

    def apply(self, objects: list[dict[str, Any]], *, dry_run: bool = False, field_manager: str = "kfloop") -> list[Change]:
        """Server-side apply each object in order (conflicts forced: kfloop owns what it renders)."""
        return [self._apply_one(obj, dry_run=dry_run, field_manager=field_manager) for obj in objects]

    def _apply_one(self, obj: dict[str, Any], *, dry_run: bool, field_manager: str) -> Change:
        from kubernetes.dynamic.exceptions import NotFoundError

        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta.get("namespace", ""), meta["name"]
        resource = self._resource(obj["apiVersion"], kind)
        try:
            try:
                before = resource.get(name=name, namespace=namespace or None).to_dict()
            except NotFoundError:
                before = None
            after = resource.server_side_apply(
                body=obj, name=name, namespace=namespace or None, field_manager=field_manager,
                force_conflicts=True, dry_run="All" if dry_run else None,
            ).to_dict()
        except Exception as exc:  # noqa: BLE001 - ApiException or a dropped connection, both end the deploy
            raise ClusterError(
                f"kube context {self.context!r} refused {kind} {namespace}/{name}: {_reason(exc)}"
            ) from None
        return Change(kind, namespace, name, _action(before, after, dry_run=dry_run))

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self.client.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            group = api_version.rpartition("/")[0]
            needs = f": install {_OPERATORS[group]}" if group in _OPERATORS else ""
            raise ClusterError(
                f"the cluster of kube context {self.context!r} has no {kind} ({api_version}){needs}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - discovery failed mid-way
            raise ClusterError(f"cannot reach the cluster of kube context {self.context!r} ({self.server}): {_reason(exc)}") from None

    # --- Knative Eventing features ------------------------------------------------------------

    def eventing_features(self) -> dict[str, str] | None:
        """Knative Eventing's feature flags (``data`` of ConfigMap knative-eventing/config-features).

        ``{}`` when the ConfigMap does not exist (every flag then has its
        default); None when this kube context may not read it (a namespace
        admin on a shared cluster), so the caller can say it could not check.
        """
        from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError, UnauthorizedError

        namespace, name = EVENTING_FEATURES
        try:
            config_map = self._resource("v1", "ConfigMap").get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return {}
        except (ForbiddenError, UnauthorizedError):
            return None
        except Exception as exc:  # noqa: BLE001 - a dropped connection ends the deploy like any other
            raise ClusterError(f"cannot read ConfigMap {namespace}/{name} in kube context {self.context!r}: {_reason(exc)}") from None
        return {str(k): str(v) for k, v in (config_map.get("data") or {}).items()}

    def check_eventing_features(self, required: FeatureValues, recommended: FeatureValues) -> list[str]:
        """Raise :class:`ClusterError` if a ``required`` flag has none of its values; return a warning line per other concern.

        Both map a flag to the values that satisfy it, the first being the one
        to set. The error is one line naming the flag and the ``kubectl patch``
        that turns it on. Warnings: ``recommended`` flags at another value, or
        flags this kube context cannot read. Values compare case-insensitively,
        as Knative reads them.
        """
        namespace, name = EVENTING_FEATURES
        features = self.eventing_features()
        if features is None:
            return [f"cannot read ConfigMap {namespace}/{name} in kube context {self.context!r} to check that "
                    + ", ".join(f"{flag}={values[0]}" for flag, values in required.items())
                    + f" (a cluster admin runs: {feature_patch_command(required)})"]
        off = {flag: values for flag, values in required.items() if not _satisfied(features.get(flag), values)}
        if off:
            flag, values = next(iter(off.items()))
            raise ClusterError(
                f"Knative Eventing's feature {flag} is {_shown(features.get(flag))} in kube context {self.context!r} "
                f"(ConfigMap {namespace}/{name}); the loop needs {values[0]!r}: {feature_patch_command(off)}"
            )
        return [f"Knative Eventing's feature {flag} is {_shown(features.get(flag))} in kube context {self.context!r}; "
                f"recommended: {values[0]!r} ({feature_patch_command({flag: values})})"
                for flag, values in recommended.items() if not _satisfied(features.get(flag), values)]

    # --- wait --------------------------------------------------------------------------------

    def wait_ready(self, namespace: str, name: str, timeout: float, *, on_progress: ProgressCallback | None = None,
                   poll_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """Poll the InferenceService until its ``Ready`` condition is True for its current generation.

        Returns the InferenceService. Raises :class:`ClusterError` with the
        conditions that are not True (and KServe's message) after ``timeout`` seconds.
        """
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = self._resource("serving.kserve.io/v1beta1", "InferenceService")
        deadline = clock() + timeout
        conditions: dict[str, str] = {}
        message = "waiting for KServe to report status"
        while True:
            try:
                isvc = resource.get(name=name, namespace=namespace).to_dict()
            except NotFoundError:
                isvc = {}
                message = f"InferenceService {namespace}/{name} does not exist"
            except Exception as exc:  # noqa: BLE001
                raise ClusterError(f"lost the cluster of kube context {self.context!r} ({self.server}): {_reason(exc)}") from None
            conditions, message = _isvc_state(isvc, message)
            if on_progress is not None:
                on_progress(conditions, message)
            if conditions.get("Ready") == "True" and _observed(isvc):
                return isvc
            if clock() >= deadline:
                pending = ", ".join(f"{k}={v}" for k, v in conditions.items() if v != "True") or "no status"
                raise ClusterError(
                    f"InferenceService {namespace}/{name} in kube context {self.context!r} is not Ready "
                    f"after {timeout:.0f} s ({pending}): {message}"
                )
            sleep(poll_seconds)


def apply_objects(objects: list[dict[str, Any]], *, context: str | None = None, dry_run: bool = False,
                  field_manager: str = "kfloop") -> list[dict[str, str]]:
    """Server-side apply ``objects`` on the cluster of kube ``context``; one ``{kind, namespace, name, action}`` each."""
    return [change.as_dict() for change in Cluster.connect(context).apply(objects, dry_run=dry_run, field_manager=field_manager)]


def wait_ready(namespace: str, name: str, timeout: float, *, context: str | None = None,
               on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Wait until InferenceService ``namespace/name`` is Ready; see :meth:`Cluster.wait_ready`."""
    return Cluster.connect(context).wait_ready(namespace, name, timeout, on_progress=on_progress)


def feature_patch_command(flags: FeatureValues) -> str:
    """The ``kubectl`` command that sets each of ``flags`` to its first value in Knative Eventing's config-features."""
    import json

    namespace, name = EVENTING_FEATURES
    patch = json.dumps({"data": {flag: values[0] for flag, values in flags.items()}}, separators=(",", ":"))
    return f"kubectl -n {namespace} patch configmap {name} --type merge -p '{patch}'"


def _satisfied(value: str | None, wanted: tuple[str, ...]) -> bool:
    return value is not None and value.strip().lower() in {w.lower() for w in wanted}


def _shown(value: str | None) -> str:
    return "not set (Knative's default applies)" if value is None else repr(value)


def _action(before: dict[str, Any] | None, after: dict[str, Any], *, dry_run: bool) -> str:
    """created / configured / unchanged, from the object before and after the apply.

    A real apply that changes nothing leaves ``resourceVersion`` alone; a dry run
    never bumps it, so there the content (less status and bookkeeping) is compared.
    """
    if before is None:
        return "created"
    if not dry_run:
        same = before["metadata"].get("resourceVersion") == after["metadata"].get("resourceVersion")
    else:
        same = _content(before) == _content(after)
    return "unchanged" if same else "configured"


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k not in _VOLATILE_METADATA}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": metadata}


def _isvc_state(isvc: dict[str, Any], fallback: str) -> tuple[dict[str, str], str]:
    status = isvc.get("status") or {}
    found = {c.get("type"): c for c in status.get("conditions") or []}
    conditions = {kind: found[kind].get("status", "Unknown") for kind in _ISVC_CONDITIONS if kind in found}
    messages = [c.get("message") or c.get("reason") for c in found.values() if c.get("status") != "True"]
    failure = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
    if failure.get("message"):
        messages.insert(0, f"{failure.get('reason', 'failure')}: {failure['message']}")
    pending = [kind for kind, value in conditions.items() if value != "True"]
    if any(messages):
        return conditions, next(m for m in messages if m)
    if not conditions:
        return conditions, fallback
    return conditions, f"waiting for {', '.join(pending)}" if pending else "all conditions True"


def _observed(isvc: dict[str, Any]) -> bool:
    """The status describes the spec just applied (KServe sets observedGeneration)."""
    generation = isvc.get("metadata", {}).get("generation")
    observed = (isvc.get("status") or {}).get("observedGeneration")
    return generation is None or observed is None or observed >= generation


def _connect_tcp(server: str, timeout: float) -> None:
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server)
    port = url.port or (443 if url.scheme == "https" else 80)
    with socket.create_connection((url.hostname or "localhost", port), timeout=timeout):
        pass


def _reason(exc: BaseException) -> str:
    """The one line that says why a call failed: 'connection refused', 'HTTP 403 Forbidden: ...'."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        body = getattr(exc, "body", None) or b""
        detail = _api_message(body) or getattr(exc, "reason", "") or ""
        return f"HTTP {status}: {detail}".rstrip(": ")
    reason = getattr(exc, "reason", None)
    text = str(reason if isinstance(reason, BaseException) else exc)
    lowered = text.lower()
    for known in ("connection refused", "timed out", "name or service not known", "no route to host",
                  "certificate verify failed", "connection reset"):
        if known in lowered:
            return known
    return first_line(text if text else type(exc).__name__)


def _api_message(body: Any) -> str:
    import json

    try:
        return str(json.loads(body).get("message", ""))
    except (ValueError, TypeError, AttributeError):
        return ""
