"""The loop on a cluster as Kubernetes objects: one pure function from the policy and a few addresses.

:func:`render_objects` checks every value (one :class:`~kfloop.errors.ManifestError` lists each
bad one), then returns every object of one model's loop in apply order: ServiceAccounts, RBAC,
the policy ConfigMap, NetworkPolicies, the Knative Broker and EventPolicies, the watch, the
``ServingRuntime`` and ``InferenceService`` with KEDA's ``ScaledObject`` and PodDisruptionBudgets,
the trigger service, the Knative ``Trigger`` s and a ``PodMonitor`` (``_Loop`` builds each).
It also names the Secrets the operator creates (:data:`STORAGE_SECRET`,
:data:`STORAGE_READONLY_SECRET`, :data:`KFP_TOKEN_SECRET`) and the Knative features the objects
need (:data:`REQUIRED_EVENTING_FEATURES`). :mod:`kfloop.cli.cluster` calls it for
``kfloop manifests`` (with :func:`kustomization`) and ``kfloop deploy``. See ``docs/manifests.md``.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from kfloop.errors import ManifestError
from kfloop.event_types import LABEL_EVENT
from kfloop.kube import dns_label_problem
from kfloop.policies.compile import compile_label_trigger, compile_scaled_object, compile_triggers
from kfloop.policies.signals import signal_of
from kfloop.policies.spec import Policy, ScalingRule

__all__ = [
    "BROKER_TOKEN_PATH",
    "DEAD_LETTER_PORT",
    "DEFAULT_KFP_HOST",
    "KFP_TOKEN_SECRET",
    "PORT",
    "RECOMMENDED_EVENTING_FEATURES",
    "REQUIRED_EVENTING_FEATURES",
    "STORAGE_READONLY_SECRET",
    "STORAGE_SECRET",
    "broker_audience",
    "broker_ingress_url",
    "knative_child_name",
    "kustomization",
    "render_objects",
    "service_account_subject",
    "trigger_subject",
]

PORT = 8080  # every kfloop server's REST port (and /metrics)
DEAD_LETTER_PORT = 8081  # the watch's port for alarms the Triggers could not deliver (their deadLetterSink)
STORAGE_SECRET = "kfloop-storage"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ AWS_ENDPOINT_URL ...): read-write
STORAGE_READONLY_SECRET = "kfloop-storage-readonly"  # the same keys, for credentials that can only read the registry
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
BROKER_TOKEN_DIR = "/var/run/secrets/kfloop/broker"
BROKER_TOKEN_PATH = f"{BROKER_TOKEN_DIR}/token"  # the watch's projected token for the Broker ingress
BROKER_TOKEN_SECONDS = 3600  # the kubelet rotates it at 80 % of this; the watch re-reads the file
SERVICE_NAME_SUFFIXES = (".svc", ".svc.cluster.local")  # in-cluster Service addresses, where plain http may carry a token
# Knative Eventing's ConfigMap knative-eventing/config-features: what the rendered objects need
# (the EventPolicy webhook refuses EventPolicies while OIDC is off, and without it nobody is checked)
# and what docs/cluster.md recommends. Each flag maps to the values that satisfy it, the first being
# the one to set. transport-encryption "permissive" gives the Broker an https address beside its
# http one; "strict" is accepted as stronger, but kfloop's own Services speak plain http (not tried
# against "strict").
REQUIRED_EVENTING_FEATURES = {"authentication-oidc": ("enabled",)}
RECOMMENDED_EVENTING_FEATURES = {"default-authorization-mode": ("deny-all",), "transport-encryption": ("permissive", "strict")}

# (cpu request, cpu limit, memory request, memory limit) per component; the overlays resize them.
_RESOURCES = {
    "predictor": ("250m", "1", "256Mi", "1Gi"),
    "transformer": ("250m", "1", "256Mi", "1Gi"),
    "explainer": ("100m", "1", "256Mi", "1Gi"),
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
    ``storage_uri`` is the registry version to serve, ``<registry_uri>/<model>/<version>/``;
    ``prometheus_url`` is what KEDA and the trigger service query;
    ``monitoring_namespace`` is where Prometheus runs (the NetworkPolicies let
    it scrape); ``kfp_host`` may be ``http://`` only for an in-cluster Service
    address (the trigger then carries the Kubeflow Pipelines token over plain
    http with ``--kfp-allow-http``). With ``istio`` the predictor's
    failure-rate rule reads Istio's ``istio_requests_total``, which also counts
    the 5xx a crashed or unreachable predictor never got to count itself.

    The InferenceService is named after the model. Raises
    :class:`~kfloop.errors.ManifestError` listing every bad value.
    """
    _check(policy, namespace=namespace, image=image, storage_uri=storage_uri, registry_uri=registry_uri,
           prometheus_url=prometheus_url, broker=broker, kfp_host=kfp_host, monitoring_namespace=monitoring_namespace)
    loop = _Loop(policy, namespace, image, registry_uri.rstrip("/"), broker, istio)
    scaled_object = compile_scaled_object(policy, namespace=namespace, inference_service=loop.isvc, prometheus_url=prometheus_url)
    if istio:
        _use_istio_failures(scaled_object, policy.scaling.rules, loop.isvc, namespace)
    # No payload Trigger (drift_service): the payload logger posts to the watch directly (it cannot
    # authenticate to a Broker with OIDC on); alarms carry a token for the trigger service's audience.
    triggers = compile_triggers(policy, namespace=namespace, broker=broker, trigger_service=loop.name("trigger"),
                                inference_service=loop.isvc, audience=loop.trigger_audience(),
                                dead_letter_service=loop.name("watch"), dead_letter_port=DEAD_LETTER_PORT,
                                dead_letter_audience=loop.dead_letter_audience())
    subjects = [trigger_subject(namespace, trigger["metadata"]["name"]) for trigger in triggers]
    labels = compile_label_trigger(policy, namespace=namespace, broker=broker, watch_service=loop.name("watch"),
                                   port=DEAD_LETTER_PORT, audience=loop.dead_letter_audience())
    label_subject = trigger_subject(namespace, labels["metadata"]["name"])
    return [
        # Predictor (KServe's storage initializer) and transformer only read the registry.
        loop.service_account("serving", automount=False, secrets=(STORAGE_READONLY_SECRET,)),
        # Its API token only reads the cluster's OIDC discovery document, to check the tokens dead
        # letters carry (no Role binds it); alarms go to the Broker with its projected Broker token.
        loop.service_account("watch", automount=True),
        # The KServe deployer patches the InferenceService; the token also reads the cluster's
        # OIDC discovery document, which every ServiceAccount may (system:service-account-issuer-discovery).
        loop.service_account("trigger", automount=True),
        # The labelling team's client posts io.kfloop.label events to the Broker with a token of this account.
        loop.service_account("labeller", automount=False),
        loop.trigger_role(),
        loop.trigger_role_binding(),
        loop.policy_config_map(),
        *loop.network_policies(monitoring_namespace),
        loop.broker(),
        loop.alarm_event_policy(),
        loop.label_event_policy(),
        loop.deployment("watch", loop.watch_args([*subjects, label_subject]), volumes=(loop.broker_token_volume(),),
                        mounts=(loop.broker_token_mount(),), ports=(_port("dead-letters", DEAD_LETTER_PORT),)),
        loop.service("watch", ports=(_port("dead-letters", DEAD_LETTER_PORT),)),
        loop.serving_runtime(),
        # A folder URI: KServe's storage initializer lists by bare prefix (".../1" would copy ".../10/" too).
        loop.inference_service(f"{storage_uri.rstrip('/')}/"),
        scaled_object,
        loop.disruption_budget("predictor"),
        loop.disruption_budget("transformer"),
        loop.disruption_budget("explainer"),
        loop.deployment("trigger", loop.trigger_args(kfp_host, prometheus_url, subjects), env=(_kfp_token_env(),)),
        loop.service("trigger"),
        *triggers,
        labels,
        loop.pod_monitor(),
    ]


def broker_ingress_url(namespace: str, broker: str) -> str:
    """Where events enter a Knative Broker (the multi-tenant broker ingress)."""
    return f"http://broker-ingress.{KNATIVE_EVENTING_NAMESPACE}.svc.cluster.local/{namespace}/{broker}"


def broker_audience(namespace: str, broker: str) -> str:
    """The OIDC audience a Broker publishes (``status.address.audience``) and its ingress checks."""
    return f"eventing.knative.dev/broker/{namespace}/{broker}".lower()


def service_account_subject(namespace: str, account: str) -> str:
    """The ``sub`` of a token Kubernetes issues for a ServiceAccount (what an EventPolicy's ``from.sub`` names)."""
    return f"system:serviceaccount:{namespace}:{account}"


def trigger_subject(namespace: str, trigger: str) -> str:
    """The ``sub`` of the token Knative's broker-filter sends with the events of Trigger ``trigger``.

    Once ``authentication-oidc`` is on, Knative gives every Trigger its own
    ServiceAccount, ``kmeta.ChildName(<trigger>, "-oidc-eventing.knative.dev-Trigger")``
    lower-cased (knative/eventing ``pkg/auth/serviceaccount.go``): that is
    ``<trigger>-oidc-eventing.knative.dev-trigger`` for a name of at most 29
    characters, and a truncated name with an MD5 for a longer one (the
    Trigger shows it in ``status.auth.serviceAccountName``).
    """
    return service_account_subject(namespace, knative_child_name(trigger, "-oidc-eventing.knative.dev-Trigger").lower())


def knative_child_name(parent: str, suffix: str) -> str:
    """``knative.dev/pkg/kmeta.ChildName``: ``parent + suffix``, hashed to fit 63 characters when longer."""
    longest, head = 63, 63 - 32
    if len(parent) <= longest - len(suffix):
        return parent + suffix
    if head - len(suffix) <= 0:
        digest = hashlib.md5((parent + suffix).encode(), usedforsecurity=False).hexdigest()
        name = parent[:head] + digest
        name += suffix[:max(longest - len(name), 0)]
        return re.sub(r"[^a-zA-Z0-9]+$", "", name)
    return parent[:head - len(suffix)] + hashlib.md5(parent.encode(), usedforsecurity=False).hexdigest() + suffix


def kustomization(files: list[str], namespace: str) -> str:
    """A kustomize base listing ``files`` (YAML text with a header saying where it came from)."""
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(files)}
    return (
        "# Written by 'kfloop manifests': re-render rather than edit (the renderer is the source of truth).\n"
        f"# Namespace '{namespace}', the image and the storage URI are baked into arguments and URLs:\n"
        "# an overlay must not change them (no 'namespace:' or 'images:' transformers).\n"
        "# Needs Knative Eventing's " + ", ".join(f"{flag}: {values[0]}" for flag, values in REQUIRED_EVENTING_FEATURES.items())
        + " (ConfigMap knative-eventing/config-features; 'kfloop deploy --dry-run' prints the command).\n"
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

    def service_url(self, component: str) -> str:
        """The in-cluster address of a component's Service (port 80)."""
        return f"http://{self.name(component)}.{self.namespace}.svc.cluster.local/"

    def trigger_audience(self) -> str:
        """The OIDC audience of the trigger service: the Triggers ask Knative for tokens with it, the service checks it.

        A plain Service has no audience of its own (only Knative addressables
        publish one), so Knative sends no token unless the Trigger names one.
        It is this loop's trigger Service, so a token minted for another
        loop's trigger service is refused here.
        """
        return f"{self.name('trigger')}.{self.namespace}"

    def dead_letter_audience(self) -> str:
        """The OIDC audience of the watch's dead-letter port: the Triggers' ``deadLetterSink.audience``, the watch checks it.

        Knative forwards a dead letter with a token of the Trigger's own
        ServiceAccount, minted for the sink's audience -- which a plain URI
        lacks unless the Trigger names one.
        """
        return f"{self.name('watch')}.{self.namespace}"

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
        agent, 9081); explainer: clients (KServe routes ``:explain`` to it);
        predictor: the transformer and the explainer; watch: the transformer's pods,
        whose payload logger posts to it directly (the logger sends no
        credentials, so *this* rule is what keeps forged payloads out);
        trigger, and the watch's dead-letter port: Knative's broker-filter pods,
        the only ones that deliver a Trigger's events and dead letters (a
        namespace *and* pod selector in one peer: both must match); all:
        Prometheus, on ``/metrics`` (the same port).
        """
        scrape = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_namespace}}}
        broker_filter = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KNATIVE_EVENTING_NAMESPACE}},
            "podSelector": {"matchLabels": {"eventing.knative.dev/brokerRole": "filter"}},
        }
        transformer_pods = {"podSelector": {"matchLabels": self._kserve_pods("transformer")}}
        explainer_pods = {"podSelector": {"matchLabels": self._kserve_pods("explainer")}}
        scrape_ports = [PORT, 15020, 15090] if self.istio else [PORT]  # + the sidecar's merged and Envoy stats
        return [
            self._network_policy("transformer", self._kserve_pods("transformer"), [
                {"ports": _tcp(PORT, 9081)},  # the client-facing entry point
            ]),
            self._network_policy("explainer", self._kserve_pods("explainer"), [
                {"ports": _tcp(PORT)},  # clients' :explain requests
            ]),
            self._network_policy("predictor", self._kserve_pods("predictor"), [
                {"from": [transformer_pods, explainer_pods], "ports": _tcp(PORT)},
                {"from": [scrape], "ports": _tcp(*scrape_ports)},
            ]),
            self._network_policy("watch", self._selector("watch"), [
                {"from": [transformer_pods], "ports": _tcp(PORT)},
                {"from": [scrape], "ports": _tcp(PORT)},
                {"from": [broker_filter], "ports": _tcp(DEAD_LETTER_PORT)},  # the Triggers' dead letters
            ]),
            self._network_policy("trigger", self._selector("trigger"), [
                {"from": [broker_filter], "ports": _tcp(PORT)},
                {"from": [scrape], "ports": _tcp(PORT)},
            ]),
        ]

    def _network_policy(self, component: str, pods: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(self.name(f"{component}-ingress"), component),
            # Copied: the peers are shared between policies, and one object's edits must not reach another's.
            "spec": {"podSelector": {"matchLabels": dict(pods)}, "policyTypes": ["Ingress"], "ingress": copy.deepcopy(rules)},
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

    def alarm_event_policy(self) -> dict[str, Any]:
        """Only the watch's ServiceAccount may post to the Broker, and only the policy's alarm types."""
        alarm_types = [{"exact": {"type": event}} for event in self.policy.retraining.events]
        return self._broker_event_policy("alarms", "watch", {"any": alarm_types})

    def label_event_policy(self) -> dict[str, Any]:
        """Only the labeller's ServiceAccount may post labels to the Broker, and nothing else."""
        return self._broker_event_policy("labels", "labeller", {"exact": {"type": LABEL_EVENT}})

    def _broker_event_policy(self, name: str, sender: str, admitted: dict[str, Any]) -> dict[str, Any]:
        """An EventPolicy on the Broker: ``sender``'s ServiceAccount may post the events ``admitted`` filters.

        One policy per sender: Knative lets the first policy (by name) whose
        ``from`` matches decide alone, so a second one could not widen or narrow
        it. Needs ``authentication-oidc`` (the webhook refuses an EventPolicy
        without it).
        """
        return {
            "apiVersion": "eventing.knative.dev/v1alpha1",
            "kind": "EventPolicy",
            "metadata": self.metadata(self.name(name), sender),
            "spec": {
                "to": [{"ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": self.broker_name}}],
                "from": [{"sub": service_account_subject(self.namespace, self.name(sender))}],
                "filters": [admitted],
            },
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
                "--http-port", str(PORT), "--no-grpc", "--max-explain-rows", str(self.policy.explain.max_rows)]
        return self._container(PREDICTOR_CONTAINER, "predictor", args, probes=True)

    def inference_service(self, storage_uri: str) -> dict[str, Any]:
        """The v1beta1 InferenceService: transformer (+ payload logger) -> predictor, and an explainer, Standard mode.

        KServe sends ``:explain`` to the explainer, around the transformer. The explainer is kfloop's
        transformer again (no logger: explanations are not traffic), so it scales the raw rows with the
        version's preprocessor and asks the predictor, which explains with its kept forest: the same
        way as ``:predict``, and as on one machine.

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
            "--max-explain-rows", str(self.policy.explain.max_rows),
            # No --control-port: the routes API, which re-points the transformer, is not served at all.
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
                    # It posts to the watch's Service, not the Broker: it sends no credentials (KServe 0.20),
                    # which an OIDC Broker answers with 401; the watch's NetworkPolicy admits only these pods.
                    "logger": {"mode": "request", "url": self.service_url("watch")},
                    "containers": [self._container(PREDICTOR_CONTAINER, "transformer", transformer_args, probes=True,
                                                   storage=STORAGE_READONLY_SECRET)],
                },
                "explainer": {
                    **self._pod_fields("serving", "explainer"),
                    "minReplicas": 1,
                    "maxReplicas": scaling.max_replicas,
                    "containers": [self._container(PREDICTOR_CONTAINER, "explainer", transformer_args, probes=True,
                                                   storage=STORAGE_READONLY_SECRET)],
                },
            },
        }

    def disruption_budget(self, component: str) -> dict[str, Any]:
        """At most one pod of an InferenceService component evicted at a time (drains, upgrades).

        ``maxUnavailable: 1`` rather than ``minAvailable``: KEDA may run the
        predictor (and the policy the transformer) at one replica, where
        ``minAvailable: 1`` would block every node drain and cluster upgrade
        until someone deletes the budget. The price is a short outage when the
        only replica is evicted; set ``scaling.min_replicas`` to 2 for
        drains without one. ``AlwaysAllow`` lets a drain evict pods that are
        not Ready anyway (crash-looping ones would otherwise hold it up).

        The watch and the trigger service get none: each runs one replica
        (strategy Recreate, its state on disk), so a budget could either block
        every drain or allow the one eviction that happens anyway.
        """
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.metadata(self.name(f"{component}-budget"), component),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": self._kserve_pods(component)},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }

    # --- watch and trigger -------------------------------------------------------------------

    def watch_args(self, subjects: list[str]) -> list[str]:
        args = [
            "watch", "--registry", self.registry_uri, "--model", self.model,
            "--sink", broker_ingress_url(self.namespace, self.broker_name),
            "--sink-token-file", BROKER_TOKEN_PATH,
            # Payload events carry no credentials (KServe's logger cannot send any): the
            # watch's NetworkPolicy, which admits only the transformer's pods, stands in.
            "--event-auth", "none",
            "--policy", f"{POLICY_DIR}/policy.yaml", "--state-dir", STATE_DIR,
            "--http-port", str(PORT), "--host", "0.0.0.0",
            # Dead letters and labels come from broker-filter with a token of the Trigger's ServiceAccount.
            "--dead-letter-port", str(DEAD_LETTER_PORT), "--dead-letter-auth", "oidc",
            "--oidc-audience", self.dead_letter_audience(),
        ]
        for subject in subjects:  # one per Trigger: each has its own ServiceAccount
            args += ["--oidc-subject", subject]
        return args

    def trigger_args(self, kfp_host: str, prometheus_url: str, subjects: list[str]) -> list[str]:
        args = [
            "trigger", "--registry", self.registry_uri, "--model", self.model,
            "--policy", f"{POLICY_DIR}/policy.yaml", "--state-dir", STATE_DIR,
            "--kfp-host", kfp_host, "--image", self.image,
            "--inference-service", self.isvc, "--namespace", self.namespace, "--prometheus-url", prometheus_url,
            "--http-port", str(PORT), "--host", "0.0.0.0",
            "--alarm-auth", "oidc", "--oidc-audience", self.trigger_audience(),
        ]
        for subject in subjects:  # one per Trigger: each has its own ServiceAccount
            args += ["--oidc-subject", subject]
        if urlsplit(kfp_host).scheme == "http":
            # Only an in-cluster Service gets here (_check): the token stays on the pod network,
            # where the KFP API's own NetworkPolicies / mesh apply. A remote host must be https.
            args.append("--kfp-allow-http")
        return args

    def broker_token_volume(self) -> dict[str, Any]:
        """The watch's ServiceAccount token for the Broker ingress, rotated by the kubelet.

        Bound to the Broker's audience, so it is no use against the Kubernetes
        API or any other service; the ServiceAccount itself mounts no API token.
        """
        return {"name": "broker-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": broker_audience(self.namespace, self.broker_name),
            "expirationSeconds": BROKER_TOKEN_SECONDS,
            "path": BROKER_TOKEN_PATH.rsplit("/", 1)[1],
        }}]}}

    def broker_token_mount(self) -> dict[str, Any]:
        return {"name": "broker-token", "mountPath": BROKER_TOKEN_DIR, "readOnly": True}

    def deployment(self, component: str, args: list[str], env: tuple[dict[str, Any], ...] = (),
                   volumes: tuple[dict[str, Any], ...] = (), mounts: tuple[dict[str, Any], ...] = (),
                   ports: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        """One replica, replaced (not rolled): each keeps state (window, outbox, pending runs) in ``STATE_DIR``.

        ``ports`` are container ports beside ``http`` (``name`` and ``port``).
        """
        container = self._container(component, component, args, probes=False, storage=STORAGE_SECRET, state=True)
        if env:
            container["env"] = [*container["env"], *env]
        container["ports"] = [*container["ports"], *({"name": p["name"], "containerPort": p["port"], "protocol": "TCP"}
                                                     for p in ports)]
        container["volumeMounts"] = [*container["volumeMounts"], *mounts]
        pod = self._pod_fields(component, component, state=True)
        pod["volumes"] = [*pod["volumes"], *volumes]
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

    def service(self, component: str, ports: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        """Port 80, so a Knative Trigger can name the Service as its subscriber ``ref``; ``ports`` on their own numbers."""
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(self.name(component), component),
            "spec": {
                "selector": self._selector(component),
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                          *({"name": p["name"], "port": p["port"], "targetPort": p["name"], "protocol": "TCP"} for p in ports)],
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
                   storage: str | None = None, state: bool = False) -> dict[str, Any]:
        """One of the loop's containers; ``storage`` names the Secret whose credentials it reads the registry with."""
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
        if storage is not None:
            # The registry (s3:// or gs://) is read through fsspec with these credentials.
            container["envFrom"] = [{"secretRef": {"name": storage}}]
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


def _port(name: str, port: int) -> dict[str, Any]:
    """A named port of a container and of its Service (the same number on both)."""
    return {"name": name, "port": port}


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
    kfp = urlsplit(values["kfp_host"])
    if kfp.scheme == "http" and not (kfp.hostname or "").endswith(SERVICE_NAME_SUFFIXES):
        problems.append(f"kfp_host {values['kfp_host']!r} would carry the Kubeflow Pipelines token in clear: "
                        "use https://, or an in-cluster Service address (NAME.NAMESPACE.svc[.cluster.local])")
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
