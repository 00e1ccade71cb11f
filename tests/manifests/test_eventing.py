"""Who may send events on a cluster: Knative OIDC, EventPolicies, Trigger audiences and subjects, retries and
dead letters, the policy's delivery settings; disruption budgets; the policy reaching the pods."""

from __future__ import annotations

import copy
import hashlib
import json

import kubernetes_validate
import pytest

from kfloop.errors import ManifestError
from kfloop.manifests.render import (
    BROKER_TOKEN_PATH, DEAD_LETTER_PORT, broker_audience, broker_ingress_url, knative_child_name, trigger_subject,
)
from kfloop.manifests.schemas import validate_manifest
from kfloop.policies import load_policy
from kfloop.event_types import ALARM_EVENTS, LABEL_EVENT, REQUEST_EVENT
from loop_objects import (
    LABELS_TRIGGER, NAMESPACE, K8S_VERSIONS, render, one, alarm_triggers, object_id, selects, loop_pods,
)


# --- who may send events (Knative OIDC) -------------------------------------------------------


def test_only_the_watchs_service_account_may_post_the_policys_alarm_types_to_the_broker(objects, policy, shared_specs):
    event_policy, broker = one(objects, "EventPolicy", "classifier-alarms"), one(objects, "Broker")
    validate_manifest(event_policy, shared_specs)
    assert event_policy["apiVersion"] == "eventing.knative.dev/v1alpha1"
    assert event_policy["spec"]["to"] == [{"ref": {"apiVersion": broker["apiVersion"], "kind": "Broker", "name": broker["metadata"]["name"]}}]
    watch_account = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["serviceAccountName"]
    assert event_policy["spec"]["from"] == [{"sub": f"system:serviceaccount:{NAMESPACE}:{watch_account}"}]  # no prefix '*'
    assert event_policy["spec"]["filters"] == [{"any": [{"exact": {"type": event}} for event in policy.retraining.events]}]
    assert set(policy.retraining.events) <= set(ALARM_EVENTS) and REQUEST_EVENT not in json.dumps(event_policy)
    # The policy applies once the Broker exists; it comes after it in apply order.
    kinds = [o["kind"] for o in objects]
    assert kinds.index("Broker") < kinds.index("EventPolicy")


def test_labels_enter_the_broker_only_from_the_labellers_account_and_reach_the_watchs_oidc_port(objects, shared_specs):
    """The cluster's label door: the labeller's ServiceAccount (and no one else) may post io.kfloop.label events to
    the Broker; a Trigger delivers them to the watch's dead-letter port with a token of its own ServiceAccount,
    which the watch admits there -- and the trigger service does not."""
    event_policy, trigger = one(objects, "EventPolicy", "classifier-labels"), one(objects, "Trigger", LABELS_TRIGGER)
    for obj in (event_policy, trigger):
        validate_manifest(obj, shared_specs)
    labeller = one(objects, "ServiceAccount", "classifier-labeller")
    assert labeller["automountServiceAccountToken"] is False  # its token is made for the Broker's audience, by its client
    assert event_policy["spec"]["from"] == [{"sub": f"system:serviceaccount:{NAMESPACE}:classifier-labeller"}]
    assert event_policy["spec"]["filters"] == [{"exact": {"type": LABEL_EVENT}}]
    assert event_policy["spec"]["to"] == one(objects, "EventPolicy", "classifier-alarms")["spec"]["to"]
    assert trigger["spec"]["filter"] == {"attributes": {"type": LABEL_EVENT}} and "delivery" not in trigger["spec"]
    assert trigger["spec"]["subscriber"] == {"uri": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local:{DEAD_LETTER_PORT}/",
                                             "audience": f"classifier-watch.{NAMESPACE}"}
    watch_args = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    label_subject = trigger_subject(NAMESPACE, LABELS_TRIGGER)
    assert label_subject in watch_args and label_subject not in trigger_args
    names = [object_id(o) for o in objects]
    assert names.index("Deployment/classifier-watch") < names.index(f"Trigger/{LABELS_TRIGGER}")


def test_the_watch_posts_alarms_with_a_projected_token_for_the_brokers_audience(objects):
    template = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in template["volumes"]}
    (container,) = template["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "broker-token"]
    assert volumes["broker-token"] == {"name": "broker-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": f"eventing.knative.dev/broker/{NAMESPACE}/default", "expirationSeconds": 3600, "path": "token"}}]}}
    assert broker_audience("KFloop", "Default") == "eventing.knative.dev/broker/kfloop/default"  # as Knative publishes it
    assert mount == {"name": "broker-token", "mountPath": "/var/run/secrets/kfloop/broker", "readOnly": True}
    args = container["args"]
    assert f"{mount['mountPath']}/token" == BROKER_TOKEN_PATH == args[args.index("--sink-token-file") + 1]
    assert args[args.index("--sink") + 1] == broker_ingress_url(NAMESPACE, "default")
    assert args[args.index("--event-auth") + 1] == "none"  # the NetworkPolicy admits only the transformer's pods
    # Its API token (it reads the OIDC discovery that checks dead letters' tokens) is bound to no Role:
    # only what every ServiceAccount may do.
    account = template["serviceAccountName"]
    assert not [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and any(subject["name"] == account for subject in o["subjects"])]


def test_the_trigger_service_checks_the_audience_and_the_subject_of_each_trigger(objects):
    triggers = alarm_triggers(objects)
    audiences = {t["spec"]["subscriber"]["audience"] for t in triggers}
    assert audiences == {f"classifier-trigger.{NAMESPACE}"}
    args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--alarm-auth") + 1] == "oidc"
    assert args[args.index("--oidc-audience") + 1] in audiences
    subjects = [args[i + 1] for i, arg in enumerate(args) if arg == "--oidc-subject"]
    # Knative names each Trigger's ServiceAccount kmeta.ChildName(<trigger>, "-oidc-eventing.knative.dev-Trigger"):
    # these Trigger names are longer than 29 characters, so the names are truncated and hashed.
    assert subjects == [f"system:serviceaccount:{NAMESPACE}:" + knative_child_name(t["metadata"]["name"], "-oidc-eventing.knative.dev-Trigger").lower()
                        for t in triggers]
    assert subjects == [f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-drift-det5ad38360105a63786aecb70a40784125",
                        f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-outlier-d" + hashlib.md5(
                            b"classifier-trigger-on-outlier-detected-oidc-eventing.knative.dev-Trigger").hexdigest(),
                        f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-accuracy-" + hashlib.md5(
                            b"classifier-trigger-on-accuracy-low-oidc-eventing.knative.dev-Trigger").hexdigest()]
    assert trigger_subject("ns", "short") == "system:serviceaccount:ns:short-oidc-eventing.knative.dev-trigger"
    # Its ServiceAccount mounts its token: it reads the cluster's OIDC discovery (allowed to every
    # ServiceAccount by the default system:service-account-issuer-discovery binding), no extra RBAC.
    assert one(objects, "ServiceAccount", "classifier-trigger")["automountServiceAccountToken"] is True
    assert {o["kind"] for o in objects} & {"ClusterRoleBinding", "ClusterRole"} == set()


def test_every_alarm_trigger_retries_with_the_policys_back_off_and_dead_letters_to_the_watch(objects, policy, shared_specs):
    triggers = alarm_triggers(objects)
    watch_service = one(objects, "Service", "classifier-watch")
    watch_args = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    dead_letter_port = {p["name"]: p for p in watch_service["spec"]["ports"]}["dead-letters"]
    for trigger in triggers:
        validate_manifest(trigger, shared_specs)
        # The CRD keeps unknown fields under ``delivery`` (for Knative's experimental ones), so its keys are checked here.
        assert trigger["spec"]["delivery"] == {
            "retry": policy.retraining.delivery.retries, "backoffPolicy": "exponential", "backoffDelay": "PT1S",
            "deadLetterSink": {"uri": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local:{dead_letter_port['port']}/",
                               "audience": f"classifier-watch.{NAMESPACE}"},
        }
    # The sink is the watch's dead-letter port, which checks the sink's audience and each Trigger's ServiceAccount
    # (broker-filter forwards a dead letter with the token of the Trigger that could not deliver it).
    assert watch_args[watch_args.index("--dead-letter-port") + 1] == str(DEAD_LETTER_PORT) == str(dead_letter_port["port"])
    assert watch_args[watch_args.index("--dead-letter-auth") + 1] == "oidc"
    assert watch_args[watch_args.index("--oidc-audience") + 1] == triggers[0]["spec"]["delivery"]["deadLetterSink"]["audience"]
    assert watch_args[watch_args.index("--oidc-audience") + 1] != trigger_args[trigger_args.index("--oidc-audience") + 1]
    subjects = [args[i + 1] for args in (watch_args, trigger_args) for i, arg in enumerate(args) if arg == "--oidc-subject"]
    alarm_subjects = [trigger_subject(NAMESPACE, t["metadata"]["name"]) for t in triggers]
    assert subjects == [*alarm_subjects, trigger_subject(NAMESPACE, LABELS_TRIGGER), *alarm_subjects]
    # The Triggers, which name the sink, are applied after the watch that serves it.
    names = [object_id(o) for o in objects]
    assert all(names.index("Deployment/classifier-watch") < names.index(object_id(t)) for t in triggers)


def test_the_policys_delivery_settings_reach_the_triggers(policy):
    slow = policy.model_copy(update={"retraining": policy.retraining.model_copy(update={
        "delivery": policy.retraining.delivery.model_copy(update={"retries": 3, "backoff_delay_seconds": 0.5,
                                                                  "backoff_policy": "linear"})})})
    for trigger in alarm_triggers(render(slow)):
        delivery = trigger["spec"]["delivery"]
        assert (delivery["retry"], delivery["backoffPolicy"], delivery["backoffDelay"]) == (3, "linear", "PT0.5S")


@pytest.mark.parametrize("parent, suffix, want", [  # knative.dev/pkg kmeta/names_test.go
    ("asdf", "-deployment", "asdf-deployment"),
    ("f" * 63, "-deployment", "ffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deployment"),
    ("f" * 63, "-deploy", "ffffffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deploy"),
    ("f" * 63, "f" * 63, "fffffffffffffffffffffffffffffff0502661254f13c89973cb3a83e0cbec0"),
    ("a", "f" * 63, "ab5cfd486935decbc0d305799f4ce4414ffffffffffffffffffffffffffffff"),
    ("b" * 32, "f" * 32, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb329c7c81b9ab3ba71aa139066aa5625d"),
    ("aaaa", "b---a" * 20, "aaaa7a3f7966594e3f0849720eced8212c18b---ab---ab---ab---ab---ab"),
    ("a" * 17, "a.-.-.-.-.-.-.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaaaa1eb10dc911444f8434af83b7225442da"),
])
def test_knative_child_names_match_knatives_own_test_vectors(parent, suffix, want):
    assert knative_child_name(parent, suffix) == want


def test_the_kfp_token_goes_over_plain_http_only_to_an_in_cluster_service(policy):
    def trigger_args(objects):
        return one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]

    default = trigger_args(render(policy))
    assert default[default.index("--kfp-host") + 1] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert "--kfp-allow-http" in default
    assert "--kfp-allow-http" in trigger_args(render(policy, kfp_host="http://ml-pipeline.kubeflow.svc:8888"))
    assert "--kfp-allow-http" not in trigger_args(render(policy, kfp_host="https://kubeflow.example.org/pipeline"))
    with pytest.raises(ManifestError) as caught:
        render(policy, kfp_host="http://kubeflow.example.org/pipeline")
    assert ("kfp_host 'http://kubeflow.example.org/pipeline' would carry the Kubeflow Pipelines token in clear: "
            "use https://, or an in-cluster Service address (NAME.NAMESPACE.svc[.cluster.local])") in str(caught.value)


def test_inference_service_pods_have_disruption_budgets_that_never_block_a_drain(objects):
    budgets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {f"classifier-{component}-budget" for component in ("predictor", "transformer", "explainer")}
    pods = {pod.name: pod for pod in loop_pods(objects)}  # (not the one-replica watch and trigger)
    for component in ("predictor", "transformer", "explainer"):
        budget = budgets[f"classifier-{component}-budget"]
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert [name for name, pod in pods.items() if selects(budget["spec"]["selector"], pod.labels)] == [component]


@pytest.mark.parametrize("break_it, validator", [
    (lambda o: one(o, "EventPolicy", "classifier-alarms")["spec"]["from"][0].update(subject="x"), "crd"),
    (lambda o: one(o, "EventPolicy", "classifier-labels")["spec"].update(form=[]), "crd"),
    (lambda o: one(o, "EventPolicy", "classifier-alarms")["spec"]["to"][0]["ref"].update(namespace="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-drift-detected")["spec"]["subscriber"].update(audiance="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-drift-detected")["spec"]["delivery"]["deadLetterSink"].update(audiance="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-outlier-detected")["spec"]["delivery"].update(retry="8"), "crd"),
    (lambda o: one(o, "PodDisruptionBudget", "classifier-predictor-budget")["spec"].update(maxUnavailible=1), "core"),
    (lambda o: one(o, "NetworkPolicy", "classifier-watch-ingress")["spec"]["ingress"][0]["from"][0].update(podSelecter={}), "core"),
    (lambda o: one(o, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["volumes"][-1]["projected"]["sources"][0]["serviceAccountToken"].update(expirySeconds=1), "core"),
])
def test_a_misspelt_field_in_the_new_objects_is_caught(objects, shared_specs, break_it, validator):
    broken = copy.deepcopy(objects)
    break_it(broken)
    changed = [b for a, b in zip(objects, broken) if a != b]
    assert len(changed) == 1
    if validator == "crd":
        with pytest.raises(ManifestError):
            validate_manifest(changed[0], shared_specs)
    else:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(changed[0], K8S_VERSIONS[0], strict=True)


def test_the_policy_reaches_the_pods_unchanged(objects, policy, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["policy.yaml"])
    assert load_policy(path) == policy
    deployment = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in deployment["containers"][0]["volumeMounts"]}
    args = deployment["containers"][0]["args"]
    assert args[args.index("--policy") + 1] == f"{mounts['policy']}/policy.yaml"
