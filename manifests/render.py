"""The loop on a cluster as Kubernetes objects: one pure function from the policy and a few addresses.

:func:`render_objects` returns every object ``kfloop deploy`` applies (and
``kfloop manifests`` writes), in the order they can be applied:

- ServiceAccounts, the trigger service's namespaced Role and RoleBinding, the
  policy as a ConfigMap, NetworkPolicies that open only the loop's paths;
- the Knative ``Broker``; the ``ServingRuntime`` and the v1beta1
  ``InferenceService`` (transformer -> predictor on the kfloop image, payload
  logger on the transformer) with KEDA's ``ScaledObject`` from
  :func:`~kfloop.policies.compile.compile_scaled_object`;
- the drift detector (``kfloop watch``) and the trigger service
  (``kfloop trigger``) as Deployments + Services, the Knative ``Trigger`` s from
  :func:`~kfloop.policies.compile.compile_triggers`, and a ``PodMonitor`` for
  every ``/metrics``.

Everything the objects need from outside is *referenced*, never inlined: the
storage credentials (Secret :data:`STORAGE_SECRET`) and the Kubeflow Pipelines
token (Secret :data:`KFP_TOKEN_SECRET`) are created by the operator, as
``docs/cluster.md`` shows. All values are checked in one place before anything
is built, and every bad one is reported at once.
"""

from __future__ import annotations

from typing import Any

import yaml

from kfloop.errors import ManifestError
from kfloop.kube import dns_label_problem
from kfloop.policies.compile import compile_scaled_object, compile_triggers
from kfloop.policies.signals import signal_of
from kfloop.policies.spec import Policy, ScalingRule

__all__ = [
    "DEFAULT_KFP_HOST",
    "KFP_TOKEN_SECRET",
    "PORT",
    "STORAGE_SECRET",
    "broker_ingress_url",
    "kustomization",
    "render_objects",
]

PORT = 8080  # every kfloop server's REST port (and /metrics)
STORAGE_SECRET = "kfloop-storage"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ AWS_ENDPOINT_URL ...)
KFP_TOKEN_SECRET = "kfloop-kfp-token"  # key "token": a bearer token Kubeflow Pipelines accepts
DEFAULT_KFP_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
MODEL_FORMAT = "kfloop"  # what the ServingRuntime declares it serves: a kfloop registry version folder
USER_ID = 10001  # the image's non-root user
HOME = "/home/kfloop"
STATE_DIR = "/var/lib/kfloop"
POLICY_DIR = "/etc/kfloop"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
PREDICTOR_CONTAINER = "kserve-container"  # the name KServe merges the runtime and the ISVC container by
KNATIVE_EVENTING_NAMESPACE = "knative-eventing"
STORAGE_SCHEMES = ("s3", "gs")  # read by KServe's storage initializer *and* by fsspec in kfloop's pods

# (cpu request, cpu limit, memory request, memory limit) per component; the overlays resize them.
_RESOURCES = {
    "predictor": ("250m", "1", "256Mi", "1Gi"),
    "transformer": ("250m", "1", "256Mi", "1Gi"),
    "watch": ("100m", "1", "256Mi", "1Gi"),
    "trigger": ("100m", "500m", "256Mi", "1Gi"),
}


def render_objects(
    policy: Policy,
    *,
    namespace: str,
    image: str,
    storage_uri: str,
    registry_uri: str,
    prometheus_url: str,
    broker: str = "default",
    istio: bool = False,
    kfp_host: str = DEFAULT_KFP_HOST,
    monitoring_namespace: str = "monitoring",
) -> list[dict[str, Any]]:
    """Every object of ``policy`` 's loop in ``namespace``, in apply order.

    ``image`` is the kfloop image (a tag other than ``latest``, or a digest) and
    also the pipeline's ``base_image`` the trigger service submits with;
    ``storage_uri`` is the registry version to serve, ``<registry_uri>/<model>/<version>``;
    ``prometheus_url`` is what KEDA and the trigger service query;
    ``monitoring_namespace`` is where Prometheus runs (the NetworkPolicies let
    it scrape). With ``istio`` the predictor's failure-rate rule reads Istio's
    ``istio_requests_total``, which also counts the 5xx a crashed or
    unreachable predictor never got to count itself.

    The InferenceService is named after the model. Raises
    :class:`~kfloop.errors.ManifestError` listing every bad value.
    """
    _check(policy, namespace=namespace, image=image, storage_uri=storage_uri, registry_uri=registry_uri,
           prometheus_url=prometheus_url, broker=broker, kfp_host=kfp_host, monitoring_namespace=monitoring_namespace)
    loop = _Loop(policy, namespace, image, registry_uri.rstrip("/"), broker, istio)
    scaled_object = compile_scaled_object(policy, namespace=namespace, inference_service=loop.isvc, prometheus_url=prometheus_url)
    if istio:
        _use_istio_failures(scaled_object, policy.scaling.rules, loop.isvc, namespace)
    triggers = compile_triggers(policy, namespace=namespace, broker=broker, trigger_service=loop.name("trigger"),
                                drift_service=loop.name("watch"), inference_service=loop.isvc)
    return [
        loop.service_account("serving", automount=False, secrets=(STORAGE_SECRET,)),
        loop.service_account("watch", automount=False),
        loop.service_account("trigger", automount=True),  # the KServe deployer patches the InferenceService
        loop.trigger_role(),
        loop.trigger_role_binding(),
        loop.policy_config_map(),
        *loop.network_policies(monitoring_namespace),
        loop.broker(),
        loop.serving_runtime(),
        loop.inference_service(storage_uri.rstrip("/")),
        scaled_object,
        loop.deployment("watch", loop.watch_args()),
        loop.service("watch"),
        loop.deployment("trigger", loop.trigger_args(kfp_host, prometheus_url), env=(_kfp_token_env(),)),
        loop.service("trigger"),
        *triggers,
        loop.pod_monitor(),
    ]


def broker_ingress_url(namespace: str, broker: str) -> str:
    """Where events enter a Knative Broker (the multi-tenant broker ingress)."""
    return f"http://broker-ingress.{KNATIVE_EVENTING_NAMESPACE}.svc.cluster.local/{namespace}/{broker}"


def kustomization(files: list[str], namespace: str) -> str:
    """A kustomize base listing ``files`` (YAML text with a header saying where it came from)."""
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(files)}
    return (
        "# Written by 'kfloop manifests': re-render rather than edit (the renderer is the source of truth).\n"
        f"# Namespace '{namespace}', the image and the storage URI are baked into arguments and URLs:\n"
        "# an overlay must not change them (no 'namespace:' or 'images:' transformers).\n"
        + yaml.safe_dump(body, sort_keys=False)
    )


class _Loop:
    """Builds the objects of one model's loop; every name and label comes from here."""

    def __init__(self, policy: Policy, namespace: str, image: str, registry_uri: str, broker: str, istio: bool) -> None:
        self.policy, self.namespace, self.image = policy, namespace, image
        self.registry_uri, self.broker_name, self.istio = registry_uri, broker, istio
        self.model = policy.model
        # Named after the model: KServe appends "--model_name <isvc name>" to the
        # transformer's arguments, so both names must agree.
        self.isvc = policy.model

    # --- names and labels --------------------------------------------------------------------

    def name(self, component: str) -> str:
        return f"{self.model}-{component}"

    def labels(self, component: str | None = None) -> dict[str, str]:
        labels = {"app.kubernetes.io/managed-by": "kfloop", "app.kubernetes.io/part-of": self.model}
        if component is not None:
            labels["app.kubernetes.io/component"] = component
        return labels

    def metadata(self, name: str, component: str | None = None) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": self.labels(component)}

    def pod_labels(self, component: str) -> dict[str, str]:
        labels = self.labels(component)
        if self.istio:
            labels["sidecar.istio.io/inject"] = "true"
        return labels

    # --- RBAC --------------------------------------------------------------------------------

    def service_account(self, component: str, *, automount: bool, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
        account: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": self.metadata(self.name(component), component),
            "automountServiceAccountToken": automount,
        }
        if secrets:
            # KServe's storage initializer takes its S3/GCS credentials from the
            # Secrets listed on the predictor's ServiceAccount.
            account["secrets"] = [{"name": secret} for secret in secrets]
        return account

    def trigger_role(self) -> dict[str, Any]:
        """What ``kfloop trigger`` does with the Kubernetes API, and nothing else, in this namespace only.

        The ``pipelines.kubeflow.org`` rules are what multi-user Kubeflow
        Pipelines checks (SubjectAccessReview in the profile namespace) when the
        token in :data:`KFP_TOKEN_SECRET` is this ServiceAccount's; with another
        token (or a single-user KFP) they grant nothing and do no harm.
        """
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": self.metadata(self.name("trigger"), "trigger"),
            "rules": [
                {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                 "resourceNames": [self.isvc], "verbs": ["get", "list", "watch", "patch"]},
                {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["runs", "experiments"],
                 "verbs": ["create", "get", "list"]},
            ],
        }

    def trigger_role_binding(self) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": self.metadata(self.name("trigger"), "trigger"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": self.name("trigger")},
            "subjects": [{"kind": "ServiceAccount", "name": self.name("trigger"), "namespace": self.namespace}],
        }

    # --- configuration -----------------------------------------------------------------------

    def policy_config_map(self) -> dict[str, Any]:
        document = yaml.safe_dump(self.policy.model_dump(mode="json"), sort_keys=False)
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.metadata(self.name("policy")),
            "data": {"policy.yaml": document},
        }

    # --- network -----------------------------------------------------------------------------

    def network_policies(self, monitoring_namespace: str) -> list[dict[str, Any]]:
        """Ingress rules for each of the loop's pods (egress stays open: S3, KFP and the API server are cluster-specific).

        transformer: clients, on its port and the payload logger's (KServe's
        agent, 9081); predictor: the transformer; watch and trigger: the Broker's
        dispatcher in knative-eventing; all: Prometheus, on ``/metrics``.
        """
        scrape = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_namespace}}}
        broker = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KNATIVE_EVENTING_NAMESPACE}}}
        transformer_pods = {"podSelector": {"matchLabels": self._kserve_pods("transformer")}}
        scrape_ports = [PORT, 15020, 15090] if self.istio else [PORT]  # + the sidecar's merged and Envoy stats
        return [
            self._network_policy("transformer", self._kserve_pods("transformer"), [
                {"ports": _tcp(PORT, 9081)},  # the client-facing entry point
            ]),
            self._network_policy("predictor", self._kserve_pods("predictor"), [
                {"from": [transformer_pods], "ports": _tcp(PORT)},
                {"from": [scrape], "ports": _tcp(*scrape_ports)},
            ]),
            *[
                self._network_policy(component, self._selector(component), [
                    {"from": [broker], "ports": _tcp(PORT)},
                    {"from": [scrape], "ports": _tcp(PORT)},
                ])
                for component in ("watch", "trigger")
            ],
        ]

    def _network_policy(self, component: str, pods: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(self.name(f"{component}-ingress"), component),
            "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": rules},
        }

    def _kserve_pods(self, component: str) -> dict[str, str]:
        """The labels KServe itself puts on an InferenceService component's pods."""
        return {"serving.kserve.io/inferenceservice": self.isvc, "component": component}

    def _selector(self, component: str) -> dict[str, str]:
        return {"app.kubernetes.io/part-of": self.model, "app.kubernetes.io/component": component}

    # --- events ------------------------------------------------------------------------------

    def broker(self) -> dict[str, Any]:
        return {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "metadata": self.metadata(self.broker_name),
            "spec": {"delivery": {"retry": 5, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S"}},
        }

    # --- serving -----------------------------------------------------------------------------

    def serving_runtime(self) -> dict[str, Any]:
        """The runtime KServe requires for ``predictor.model``.

        It carries the same container as the InferenceService (KServe merges the
        two by name, the InferenceService's fields winning), so it also runs the
        predictor on its own; ``autoSelect`` is off so no other model lands here.
        """
        return {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "ServingRuntime",
            "metadata": self.metadata(self.name("runtime"), "predictor"),
            "spec": {
                "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": False}],
                "protocolVersions": ["v2"],
                "containers": [self.predictor_container()],
            },
        }

    def predictor_container(self) -> dict[str, Any]:
        args = ["predictor", "--model-dir", MODEL_DIR, "--model", self.model, "--host", "0.0.0.0",
                "--http-port", str(PORT), "--no-grpc"]
        return self._container(PREDICTOR_CONTAINER, "predictor", args, probes=True)

    def inference_service(self, storage_uri: str) -> dict[str, Any]:
        """The v1beta1 InferenceService: transformer (+ payload logger) -> predictor, Standard mode.

        ``autoscalerClass: external``: KServe creates neither HPA nor
        ScaledObject, and ours (from the policy) scales ``<isvc>-predictor``.
        KServe's own KEDA form cannot carry the policy: it drops the trigger's
        ``metricType``, so the failure-rate rule would be read as a per-replica
        average instead of a share, and it drops the scale-up policy and the
        polling interval (see :func:`~kfloop.policies.compile.compile_kserve_autoscaling`).
        ``deploymentMode: Standard`` is set explicitly because the shipped
        configmaps default to Knative, where KEDA does not apply.

        The predictor is a ``model`` (not ``containers``) so that its version is
        ``storageUri``, which the trigger service patches to roll out.
        """
        predictor_model = {
            "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
            "runtime": self.name("runtime"),
            "protocolVersion": "v2",
            "storageUri": storage_uri,
            **self.predictor_container(),
        }
        transformer_args = [
            "transformer", "--model", self.model, "--registry", self.registry_uri, "--predictor_protocol", "v2",
            "--host", "0.0.0.0", "--http-port", str(PORT), "--no-grpc",
            "--no-admin",  # the routes API would let any client re-point the transformer
        ]
        scaling = self.policy.scaling
        return {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                **self.metadata(self.isvc, "inference"),
                "annotations": {
                    "serving.kserve.io/deploymentMode": "Standard",
                    "serving.kserve.io/autoscalerClass": "external",
                },
            },
            "spec": {
                "predictor": {
                    **self._pod_fields("serving", "predictor"),
                    "minReplicas": scaling.min_replicas,
                    "maxReplicas": scaling.max_replicas,
                    "model": predictor_model,
                },
                "transformer": {
                    **self._pod_fields("serving", "transformer"),
                    "minReplicas": scaling.min_replicas,
                    "maxReplicas": scaling.max_replicas,
                    # On the transformer, the logger sees the raw client rows: what the drift detector must see.
                    "logger": {"mode": "request", "url": broker_ingress_url(self.namespace, self.broker_name)},
                    "containers": [self._container(PREDICTOR_CONTAINER, "transformer", transformer_args, probes=True,
                                                   storage=True)],
                },
            },
        }

    # --- watch and trigger -------------------------------------------------------------------

    def watch_args(self) -> list[str]:
        return [
            "watch", "--registry", self.registry_uri, "--model", self.model,
            "--sink", broker_ingress_url(self.namespace, self.broker_name),
            "--policy", f"{POLICY_DIR}/policy.yaml", "--state-dir", STATE_DIR,
            "--http-port", str(PORT), "--host", "0.0.0.0",
        ]

    def trigger_args(self, kfp_host: str, prometheus_url: str) -> list[str]:
        return [
            "trigger", "--registry", self.registry_uri, "--model", self.model,
            "--policy", f"{POLICY_DIR}/policy.yaml", "--state-dir", STATE_DIR,
            "--kfp-host", kfp_host, "--image", self.image,
            "--inference-service", self.isvc, "--namespace", self.namespace, "--prometheus-url", prometheus_url,
            "--http-port", str(PORT), "--host", "0.0.0.0",
        ]

    def deployment(self, component: str, args: list[str], env: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        """One replica, replaced (not rolled): each keeps state (window, outbox, pending runs) in ``STATE_DIR``."""
        container = self._container(component, component, args, probes=False, storage=True, state=True)
        if env:
            container["env"] = [*container["env"], *env]
        pod = self._pod_fields(component, component, state=True)
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.metadata(self.name(component), component),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": self._selector(component)},
                "template": {
                    "metadata": {"labels": pod.pop("labels")},
                    "spec": {**pod, "containers": [container]},
                },
            },
        }

    def service(self, component: str) -> dict[str, Any]:
        """Port 80, so a Knative Trigger can name the Service as its subscriber ``ref``."""
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(self.name(component), component),
            "spec": {
                "selector": self._selector(component),
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        }

    def pod_monitor(self) -> dict[str, Any]:
        """Prometheus scrapes ``/metrics`` of every pod of the loop (kfloop_requests_total feeds KEDA)."""
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": self.metadata(self.name("metrics")),
            "spec": {
                "selector": {"matchLabels": self.labels()},
                "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": f"{min(self.policy.scaling.evaluation_seconds, 60)}s"}],
            },
        }

    # --- pods and containers -----------------------------------------------------------------

    def _pod_fields(self, account: str, component: str, *, state: bool = False) -> dict[str, Any]:
        """What every pod of the loop shares: its account, a non-root security context, writable scratch space."""
        volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
        if state:
            volumes += [
                {"name": "state", "emptyDir": {}},  # survives container restarts; the production overlay uses a PVC
                {"name": "policy", "configMap": {"name": self.name("policy")}},
            ]
        return {
            "labels": self.pod_labels(component),
            "serviceAccountName": self.name(account),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": USER_ID,
                "runAsGroup": USER_ID,
                "fsGroup": USER_ID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": volumes,
        }

    def _container(self, name: str, component: str, args: list[str], *, probes: bool,
                   storage: bool = False, state: bool = False) -> dict[str, Any]:
        cpu_request, cpu_limit, memory_request, memory_limit = _RESOURCES[component]
        mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
        if state:
            mounts += [{"name": "state", "mountPath": STATE_DIR},
                       {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True}]
        container: dict[str, Any] = {
            "name": name,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "args": args,
            "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
            "env": [{"name": "HOME", "value": HOME}],
            "resources": {
                "requests": {"cpu": cpu_request, "memory": memory_request},
                "limits": {"cpu": cpu_limit, "memory": memory_limit},
            },
            "securityContext": {
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": mounts,
        }
        if storage:
            # The registry (s3:// or gs://) is read through fsspec with these credentials.
            container["envFrom"] = [{"secretRef": {"name": STORAGE_SECRET}}]
        if probes:
            container["readinessProbe"] = _http_probe("/v2/health/ready", period=5, failures=3)
            container["livenessProbe"] = _http_probe("/v2/health/live", period=10, failures=6, delay=20)
        else:
            container["readinessProbe"] = _http_probe("/healthz", period=10, failures=3)
            container["livenessProbe"] = _http_probe("/healthz", period=20, failures=6, delay=20)
        return container


def _http_probe(path: str, *, period: int, failures: int, delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period,
                             "timeoutSeconds": 3, "failureThreshold": failures}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _kfp_token_env() -> dict[str, Any]:
    # Optional: a single-user Kubeflow Pipelines in the cluster needs no token.
    return {"name": "KFLOOP_KFP_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": KFP_TOKEN_SECRET, "key": "token", "optional": True}}}


def _use_istio_failures(scaled_object: dict[str, Any], rules: list[ScalingRule], isvc: str, namespace: str) -> None:
    """Point every trigger whose signal Istio counts too at Istio's request counter of the predictor workload."""
    by_name = {rule.name: rule for rule in rules}
    selector = (f'reporter="destination",destination_workload="{isvc}-predictor",'
                f'destination_workload_namespace="{namespace}"')
    for trigger in scaled_object["spec"]["triggers"]:
        rule = by_name.get(trigger["name"])
        istio_query = signal_of(rule).istio_query if rule is not None else None
        if istio_query is not None:
            trigger["metadata"]["query"] = istio_query(selector, rule.window)


def _check(policy: Policy, **values: str) -> None:
    """Raise one :class:`ManifestError` naming every value a cluster could not use."""
    problems = []
    for field in ("namespace", "broker", "monitoring_namespace"):
        problem = dns_label_problem(values[field], field)
        if problem is not None:
            problems.append(problem)
    problems += _image_problems(values["image"])
    registry, storage = values["registry_uri"].rstrip("/"), values["storage_uri"].rstrip("/")
    scheme = registry.split("://", 1)[0] if "://" in registry else ""
    if scheme not in STORAGE_SCHEMES:
        problems.append(f"registry {registry!r} must be a {' or '.join(f'{s}://' for s in STORAGE_SCHEMES)} URI the cluster can read")
    version = storage.rsplit("/", 1)[-1]
    if storage != f"{registry}/{policy.model}/{version}" or not version.isdigit():
        problems.append(f"storage URI {storage!r} must be a version of model {policy.model!r} in the registry: "
                        f"{registry}/{policy.model}/<version>")
    for field in ("prometheus_url", "kfp_host"):
        if not values[field].startswith(("http://", "https://")):
            problems.append(f"{field} {values[field]!r} must be an http:// or https:// URL")
    if problems:
        raise ManifestError("cannot render the cluster objects: " + "; ".join(problems))


def _image_problems(image: str) -> list[str]:
    reference, _, digest = image.partition("@")
    last = reference.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if digest:
        return [] if digest.startswith("sha256:") else [f"image {image!r} has a malformed digest (want @sha256:...)"]
    if not tag:
        return [f"image {image!r} has no tag: give an exact tag or a digest"]
    if tag == "latest":
        return [f"image {image!r} uses 'latest': give an exact tag or a digest"]
    return []
