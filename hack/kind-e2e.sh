#!/usr/bin/env bash
# kfloop on kind, end to end: a kind cluster, the operators the loop runs on, the kfloop image,
# a first model in an in-cluster MinIO, `kfloop deploy`, and one smoke request.
#
# WHERE THIS WAS RUN: NOWHERE YET, as a whole. What has run, on this project's machines (Docker
# 20.10, no image registry, no Kubernetes): the image build (`make image`), the pipeline's tasks in
# that image (kfp.local's DockerRunner), the InferenceService's containers as KServe starts them
# (storage initializer from S3, predictor and transformer with the rendered args, read-only root,
# uid 10001, no capabilities), the watch and trigger containers, and the S3 registry against a real
# S3 server (SeaweedFS) -- all in `make test-containers`. No kind cluster could start there (kind
# needs its node image from a registry), so every kubectl/helm/kind command below is unverified:
# read it before running it, and expect to fix a version or a flag. Needs: docker, kind, kubectl,
# helm, python3 >= 3.11, curl, network access to GitHub releases and the image registries.
#
#   hack/kind-e2e.sh            # create the cluster (if missing), install, deploy, smoke-test
#   KEEP=0 hack/kind-e2e.sh     # ... and delete the cluster at the end
#
# What it does NOT install: Kubeflow Pipelines (heavy). Serving, scaling and the drift
# detector work without it; a drift alarm reaches the trigger service, whose retraining run then
# fails to reach KFP. Set INSTALL_KFP=1 to add standalone KFP (single-user, no token needed).
set -euo pipefail

CLUSTER=${CLUSTER:-kfloop}
NAMESPACE=${NAMESPACE:-kfloop}
IMAGE=${IMAGE:-ghcr.io/kfloop/kfloop:0.1.0}
MODEL=classifier                       # the default policy's model: the InferenceService's name
REGISTRY=s3://kfloop/registry
KSERVE_VERSION=${KSERVE_VERSION:-v0.20.0}
KEDA_VERSION=${KEDA_VERSION:-v2.20.2}
KNATIVE_EVENTING_VERSION=${KNATIVE_EVENTING_VERSION:-knative-v1.22.2}
CERT_MANAGER_VERSION=${CERT_MANAGER_VERSION:-v1.17.2}
PROMETHEUS_OPERATOR_VERSION=${PROMETHEUS_OPERATOR_VERSION:-v0.91.0}
KFP_VERSION=${KFP_VERSION:-2.5.0}
MINIO_IMAGE=${MINIO_IMAGE:-quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z}
INSTALL_KFP=${INSTALL_KFP:-0}
KEEP=${KEEP:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
CONTEXT=kind-$CLUSTER
KUBECTL=(kubectl --context "$CONTEXT")
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  if [ "$KEEP" = 0 ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT
step() { printf '\n==> %s\n' "$*"; }

step "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
"${KUBECTL[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -

step "cert-manager $CERT_MANAGER_VERSION (KServe's webhooks need it)"
"${KUBECTL[@]}" apply -f "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml"
"${KUBECTL[@]}" -n cert-manager wait --for=condition=Available deployment --all --timeout=300s

step "KServe $KSERVE_VERSION (Standard mode: no Knative Serving, no Istio)"
"${KUBECTL[@]}" apply --server-side -f "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve.yaml"
"${KUBECTL[@]}" -n kserve wait --for=condition=Available deployment --all --timeout=300s
"${KUBECTL[@]}" apply --server-side -f "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve-cluster-resources.yaml"

step "KEDA $KEDA_VERSION"
"${KUBECTL[@]}" apply --server-side -f "https://github.com/kedacore/keda/releases/download/$KEDA_VERSION/keda-${KEDA_VERSION#v}.yaml"
"${KUBECTL[@]}" -n keda wait --for=condition=Available deployment --all --timeout=300s

step "Knative Eventing $KNATIVE_EVENTING_VERSION (in-memory channel, multi-tenant broker)"
for file in eventing-crds.yaml eventing-core.yaml in-memory-channel.yaml mt-channel-broker.yaml; do
  "${KUBECTL[@]}" apply -f "https://github.com/knative/eventing/releases/download/$KNATIVE_EVENTING_VERSION/$file"
done
"${KUBECTL[@]}" -n knative-eventing wait --for=condition=Available deployment --all --timeout=300s
# kfloop deploy refuses without OIDC: only the watch may post alarms to the Broker (EventPolicy), and
# the trigger service verifies the token each Trigger delivery carries (docs/cluster.md).
"${KUBECTL[@]}" -n knative-eventing patch configmap config-features --type merge \
  -p '{"data": {"authentication-oidc": "enabled", "default-authorization-mode": "deny-all"}}'

step "Prometheus operator $PROMETHEUS_OPERATOR_VERSION and one Prometheus in 'monitoring' that selects every PodMonitor"
"${KUBECTL[@]}" create -f "https://github.com/prometheus-operator/prometheus-operator/releases/download/$PROMETHEUS_OPERATOR_VERSION/bundle.yaml" 2>/dev/null \
  || "${KUBECTL[@]}" replace -f "https://github.com/prometheus-operator/prometheus-operator/releases/download/$PROMETHEUS_OPERATOR_VERSION/bundle.yaml"
"${KUBECTL[@]}" wait --for=condition=Available deployment/prometheus-operator --timeout=300s
"${KUBECTL[@]}" apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: monitoring}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kfloop-e2e-prometheus}
rules:
- apiGroups: [""]
  resources: [pods, services, endpoints]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kfloop-e2e-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kfloop-e2e-prometheus}
subjects: [{kind: ServiceAccount, name: prometheus, namespace: monitoring}]
---
apiVersion: monitoring.coreos.com/v1
kind: Prometheus
metadata: {name: prometheus, namespace: monitoring}
spec:
  serviceAccountName: prometheus
  podMonitorSelector: {}
  podMonitorNamespaceSelector: {}
  scrapeInterval: 15s
EOF

if [ "$INSTALL_KFP" = 1 ]; then
  step "Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
  "${KUBECTL[@]}" apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
  "${KUBECTL[@]}" wait --for condition=established --timeout=120s crd/applications.app.k8s.io
  "${KUBECTL[@]}" apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
  "${KUBECTL[@]}" -n kubeflow wait --for=condition=Available deployment --all --timeout=900s
fi

step "MinIO as the registry's bucket (credentials stay in a Secret; random per run)"
ACCESS_KEY=kfloop$RANDOM
SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
"${KUBECTL[@]}" create namespace kfloop-storage --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
"${KUBECTL[@]}" -n kfloop-storage create secret generic minio-root \
  --from-literal=MINIO_ROOT_USER="$ACCESS_KEY" --from-literal=MINIO_ROOT_PASSWORD="$SECRET_KEY" \
  --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
"${KUBECTL[@]}" -n kfloop-storage apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio}
spec:
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
      - name: minio
        image: $MINIO_IMAGE
        args: [server, /data]
        envFrom: [{secretRef: {name: minio-root}}]
        ports: [{containerPort: 9000}]
        volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: minio}
spec:
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000}]
EOF
"${KUBECTL[@]}" -n kfloop-storage rollout status deployment/minio --timeout=300s
# kfloop's pods read the registry through s3fs (AWS_ENDPOINT_URL); KServe's storage initializer
# reads the same Secret through the ServiceAccount, configured by the annotations.
"${KUBECTL[@]}" -n "$NAMESPACE" create secret generic kfloop-storage \
  --from-literal=AWS_ACCESS_KEY_ID="$ACCESS_KEY" --from-literal=AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
  --from-literal=AWS_ENDPOINT_URL=http://minio.kfloop-storage.svc.cluster.local:9000 \
  --from-literal=AWS_DEFAULT_REGION=us-east-1 --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
"${KUBECTL[@]}" -n "$NAMESPACE" annotate --overwrite secret kfloop-storage \
  serving.kserve.io/s3-endpoint=minio.kfloop-storage.svc.cluster.local:9000 \
  serving.kserve.io/s3-usehttps=0 serving.kserve.io/s3-region=us-east-1
# The client-facing pods (transformer, predictor) get kfloop-storage-readonly. On a real object store
# give it keys whose policy only reads (docs/cluster.md); MinIO's root keys stand in for them here.
"${KUBECTL[@]}" -n "$NAMESPACE" get secret kfloop-storage -o json \
  | python3 -c 'import json, sys; s = json.load(sys.stdin); m = s["metadata"]; print(json.dumps({"apiVersion": "v1", "kind": "Secret", "type": s.get("type", "Opaque"), "data": s["data"], "metadata": {"name": "kfloop-storage-readonly", "namespace": m["namespace"], "annotations": {k: v for k, v in m.get("annotations", {}).items() if k.startswith("serving.kserve.io/")}}}))' \
  | "${KUBECTL[@]}" apply -f -

step "the kfloop image $IMAGE, built here and loaded into kind (no registry push)"
docker build --network host -t "$IMAGE" "$ROOT"   # BASE_IMAGE defaults to python:3.11-slim
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "a first model: trained locally (builtin digits), uploaded to MinIO"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet "$ROOT" "s3fs==2026.9.0"
"$WORK/venv/bin/kfloop" train --registry "$WORK/registry" --home "$WORK/home"
VERSION=$("$WORK/venv/bin/kfloop" models show "$MODEL" --registry "$WORK/registry" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
"${KUBECTL[@]}" -n kfloop-storage port-forward svc/minio 19000:9000 >/dev/null 2>&1 & PIDS+=($!)
sleep 3
AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" "$WORK/venv/bin/python" - "$WORK/registry/$MODEL" <<'EOF'
import sys
import fsspec
fs = fsspec.filesystem("s3", endpoint_url="http://127.0.0.1:19000")
if not fs.exists("kfloop"):
    fs.mkdir("kfloop")
fs.put(sys.argv[1], "kfloop/registry/", recursive=True)
print("uploaded", fs.ls("kfloop/registry/classifier"))
EOF

step "kfloop deploy: render for this model version, server-side apply, wait until Ready"
"$WORK/venv/bin/kfloop" deploy --namespace "$NAMESPACE" --image "$IMAGE" --registry "$REGISTRY" \
  --storage-uri "$REGISTRY/$MODEL/$VERSION/" \
  --prometheus-url http://prometheus-operated.monitoring.svc.cluster.local:9090 \
  --context "$CONTEXT" --timeout 900

step "smoke request through the transformer (and so through KServe's payload logger)"
"${KUBECTL[@]}" -n "$NAMESPACE" port-forward "svc/$MODEL-transformer" 18080:80 >/dev/null 2>&1 & PIDS+=($!)
sleep 3
"$WORK/venv/bin/python" - <<'EOF' > "$WORK/request.json"
import json
from sklearn.datasets import load_digits
rows = load_digits().data[:2].tolist()
print(json.dumps({"inputs": [{"name": "input-0", "shape": [2, 64], "datatype": "FP64", "data": [v for r in rows for v in r]}]}))
EOF
curl -sf -H 'content-type: application/json' -d @"$WORK/request.json" \
  "http://127.0.0.1:18080/v2/models/$MODEL/infer" | python3 -c '
import json, sys
answer = json.load(sys.stdin)
labels = next(o["data"] for o in answer["outputs"] if o["name"] == "label")
print("smoke request answered:", labels, "model version", answer.get("model_version"))
assert len(labels) == 2
'
"${KUBECTL[@]}" -n "$NAMESPACE" get inferenceservice,scaledobject,broker,trigger,deployment,pod
echo "kind e2e: OK"
