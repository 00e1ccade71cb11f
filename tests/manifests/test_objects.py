"""What the rendered objects say: command lines kfloop accepts, the pipeline and the InferenceService agreeing,
Triggers that cannot loop, Istio telemetry, and values a cluster cannot use reported at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml

from kfloop.errors import ManifestError
from kfloop.manifests.render import (
    BROKER_TOKEN_PATH, DEAD_LETTER_PORT, broker_ingress_url, trigger_subject,
)
from kfloop.event_types import LABEL_EVENT
from loop_objects import (
    LABELS_TRIGGER, NAMESPACE, IMAGE, REGISTRY, PROMETHEUS, render, one, alarm_triggers, object_id, workloads,
)


# --- what the objects say --------------------------------------------------------------------


def cli_command(args: list[str]):
    """The click command of ``kfloop <args[0]>`` and its parsed parameters (nothing runs)."""
    from kfloop.cli import app

    command = typer.main.get_command(app).commands[args[0]]
    return command.make_context(args[0], list(args[1:])).params


def test_every_container_command_line_is_accepted_by_kfloops_cli_as_kserve_extends_it(objects):
    isvc = one(objects, "InferenceService")
    predictor = cli_command(isvc["spec"]["predictor"]["model"]["args"])
    assert (predictor["model_dir"], predictor["model"], predictor["host"], predictor["http_port"], predictor["no_grpc"]) == \
        (Path("/mnt/models"), "classifier", "0.0.0.0", 8080, True)
    # KServe appends these to a custom transformer's arguments (transformer_custom.go).
    injected = ["--model_name", isvc["metadata"]["name"], "--predictor_host", f"classifier-predictor.{NAMESPACE}", "--http_port", "8080"]
    transformer = cli_command(isvc["spec"]["transformer"]["containers"][0]["args"] + injected)
    assert (transformer["model"], transformer["predictor_protocol"], transformer["registry"], transformer["control_port"]) == \
        ("classifier", "v2", REGISTRY, None)  # no control routes: nothing can re-point the transformer
    assert (transformer["predictor_host"], transformer["host"], transformer["http_port"]) == (f"classifier-predictor.{NAMESPACE}", "0.0.0.0", 8080)
    watch = cli_command(one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (watch["sink"], watch["host"], watch["http_port"], watch["registry"]) == \
        (broker_ingress_url(NAMESPACE, "default"), "0.0.0.0", 8080, REGISTRY)
    assert (str(watch["sink_token_file"]), watch["event_auth"]) == (BROKER_TOKEN_PATH, "none")
    alarms = [o["metadata"]["name"] for o in alarm_triggers(objects)]
    assert (watch["dead_letter_port"], watch["dead_letter_auth"], watch["oidc_audience"], list(watch["oidc_subject"])) == \
        (DEAD_LETTER_PORT, "oidc", f"classifier-watch.{NAMESPACE}",
         [trigger_subject(NAMESPACE, name) for name in [*alarms, LABELS_TRIGGER]])
    trigger = cli_command(one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (trigger["inference_service"], trigger["namespace"], trigger["prometheus_url"], trigger["image"], trigger["host"]) == \
        ("classifier", NAMESPACE, PROMETHEUS, IMAGE, "0.0.0.0")
    assert (trigger["alarm_auth"], trigger["oidc_audience"], list(trigger["oidc_subject"]), trigger["kfp_allow_http"]) == \
        ("oidc", f"classifier-trigger.{NAMESPACE}", [trigger_subject(NAMESPACE, name) for name in alarms], True)


def test_the_transformer_names_the_predictor_protocol_and_logs_requests_to_the_watch_service(objects):
    isvc = one(objects, "InferenceService")
    args = isvc["spec"]["transformer"]["containers"][0]["args"]
    assert args[args.index("--predictor_protocol") + 1] == "v2"
    # Straight to the watch's Service (port 80 -> the watch's http port), not through the Broker:
    # KServe 0.20's logger sends no credentials, which an OIDC Broker answers with 401.
    watch = one(objects, "Service", "classifier-watch")
    assert watch["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                      {"name": "dead-letters", "port": 8081, "targetPort": "dead-letters", "protocol": "TCP"}]
    assert isvc["spec"]["transformer"]["logger"] == {
        "mode": "request", "url": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local/"}
    watch_pods = one(objects, "Deployment", "classifier-watch")["spec"]["template"]
    assert watch["spec"]["selector"].items() <= watch_pods["metadata"]["labels"].items()
    assert [(p["name"], p["containerPort"]) for p in watch_pods["spec"]["containers"][0]["ports"]] == \
        [("http", 8080), ("dead-letters", DEAD_LETTER_PORT)]
    assert "broker-ingress" not in json.dumps(isvc)
    assert "logger" not in isvc["spec"]["predictor"]  # the drift detector must see raw rows, not scaled ones
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard",
                                               "serving.kserve.io/autoscalerClass": "external"}
    for container in (isvc["spec"]["predictor"]["model"], isvc["spec"]["transformer"]["containers"][0]):
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}


def test_the_compiled_pipeline_and_the_inference_service_agree_on_image_and_storage_layout(policy, objects, tmp_path):
    from kfloop.pipelines.training import compile_training_pipeline

    spec = yaml.safe_load(compile_training_pipeline(policy, tmp_path / "pipeline.yaml", image=IMAGE, registry_uri=REGISTRY).read_text())
    pipeline_images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    root, model = parameters["registry_uri"]["defaultValue"], parameters["model_name"]["defaultValue"]
    assert pipeline_images == {IMAGE}
    served_images = {c["image"] for _, _, containers in workloads(objects) for c in containers}
    assert served_images == pipeline_images
    isvc = one(objects, "InferenceService")
    storage = isvc["spec"]["predictor"]["model"]["storageUri"]
    assert re.fullmatch(re.escape(f"{root}/{model}/") + r"[0-9]+/", storage), storage  # ModelRegistry.uri(model, version)
    assert isvc["metadata"]["name"] == model
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert trigger_args[trigger_args.index("--image") + 1] == IMAGE  # retraining runs submit the same base_image
    for args in (isvc["spec"]["transformer"]["containers"][0]["args"], trigger_args,
                 one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]):
        assert args[args.index("--registry") + 1] == root


def test_values_a_cluster_cannot_use_are_all_reported_at_once(policy):
    with pytest.raises(ManifestError) as caught:
        render(policy, namespace="Kfloop", image="ghcr.io/kfloop/kfloop:latest", registry_uri="/home/me/registry",
               storage_uri="s3://elsewhere/classifier/1", prometheus_url="prometheus:9090")
    message = str(caught.value)
    for part in ("namespace 'Kfloop'", "uses 'latest'", "registry '/home/me/registry' must be a s3:// or gs:// URI",
                 "storage URI 's3://elsewhere/classifier/1' must be a version of model 'classifier'",
                 "prometheus_url 'prometheus:9090'"):
        assert part in message
    with pytest.raises(ManifestError, match="has no tag"):
        render(policy, image="ghcr.io/kfloop/kfloop")
    assert one(render(policy, image=f"{IMAGE}@sha256:" + "0" * 64), "ServingRuntime")["spec"]["containers"][0]["image"].endswith("0" * 64)


def test_every_trigger_filters_on_type_and_no_subscriber_receives_what_it_emits(objects, policy):
    triggers = [o for o in objects if o["kind"] == "Trigger"]
    assert len(triggers) == len(policy.retraining.events) + 1  # payload events no longer pass the Broker; labels do
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    emits = {"classifier-watch": set(policy.retraining.events), "classifier-trigger": set()}
    received = {}
    for trigger in triggers:
        attributes = trigger["spec"]["filter"]["attributes"]
        assert attributes.get("type"), object_id(trigger)
        assert trigger["spec"]["broker"] == one(objects, "Broker")["metadata"]["name"]
        subscriber = trigger["spec"]["subscriber"]
        if "ref" in subscriber:
            name = subscriber["ref"]["name"]
            assert subscriber["ref"]["kind"] == "Service" and services[name]["spec"]["ports"][0]["port"] == 80
        else:  # the watch's dead-letter port: a uri (a Knative reference carries no port)
            name = subscriber["uri"].removeprefix("http://").split(".")[0]
            assert subscriber["uri"] == f"http://{name}.{NAMESPACE}.svc.cluster.local:{DEAD_LETTER_PORT}/"
        received.setdefault(name, set()).add(attributes["type"])
        assert attributes["type"] not in emits[name]
    assert received == {"classifier-trigger": set(policy.retraining.events), "classifier-watch": {LABEL_EVENT}}


def test_with_istio_the_failure_rule_reads_istio_telemetry_and_the_request_rule_stays_on_kfloops_counter(policy):
    def queries(objects):
        return {t["name"]: t["metadata"]["query"] for t in one(objects, "ScaledObject")["spec"]["triggers"]}

    plain, istio = queries(render(policy)), queries(render(policy, istio=True))
    assert "kfloop_requests_total" in plain["predictor-failures"]
    assert istio["predictor-failures"] == (
        'sum(rate(istio_requests_total{reporter="destination",destination_workload="classifier-predictor",'
        f'destination_workload_namespace="{NAMESPACE}",response_code=~"5.."}}[1m])) / '
        'sum(rate(istio_requests_total{reporter="destination",destination_workload="classifier-predictor",'
        f'destination_workload_namespace="{NAMESPACE}"}}[1m]))'
    )
    assert istio["request-rate"] == plain["request-rate"]
    pods = [pod for _, pod, _ in workloads(render(policy, istio=True)) if "labels" in pod]
    assert pods and all(pod["labels"]["sidecar.istio.io/inject"] == "true" for pod in pods)
