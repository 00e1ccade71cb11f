"""Reaching Kubernetes: whether this process runs in a pod, loading its credentials, and one-line reasons.

Shared by everything that talks to a cluster (deploying manifests, the
KServe deployer, the Kubeflow Pipelines client), so all of them find their
credentials the same way and report a failure as one line.
"""

from __future__ import annotations

import re

from kfloop.errors import ClusterError

__all__ = ["SERVICE_ACCOUNT_TOKEN", "dns_label_problem", "first_line", "in_cluster", "load_kube_config"]

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def dns_label_problem(value: str, what: str) -> str | None:
    """Why ``value`` cannot name a Kubernetes object or namespace (a DNS-1123 label), or None."""
    if len(value) <= 63 and _DNS_LABEL.match(value):
        return None
    return (f"{what} {value!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)")


def in_cluster() -> bool:
    """Whether this process runs in a pod with a service account token mounted."""
    import os

    return os.path.exists(SERVICE_ACCOUNT_TOKEN)


def load_kube_config(context: str | None = None) -> None:
    """Configure the kubernetes client: the named kube context, or inside a pod its service account.

    Raises :class:`~kfloop.errors.ClusterError` naming what is missing (no kubeconfig, a pod without
    ``KUBERNETES_SERVICE_HOST``, an unreadable token or CA), never the client's own traceback.
    """
    from kubernetes import config

    try:
        if context or not in_cluster():
            config.load_kube_config(context=context)
        else:
            config.load_incluster_config()
    except (config.ConfigException, OSError) as exc:
        where = f"kube context {context!r}" if context else ("this pod's service account" if in_cluster() else "the kubeconfig")
        raise ClusterError(f"cannot reach Kubernetes with {where}: {first_line(exc)}") from None


def first_line(value: object) -> str:
    """The first line of an error's text (its type's name when it has none)."""
    text = str(value).strip()
    if text:
        return text.splitlines()[0]
    return type(value).__name__ if isinstance(value, BaseException) else "unknown error"
