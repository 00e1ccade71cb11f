"""The retraining service: its training data is the base plus the labelled shards, each shard added once;
a run that fails on infrastructure is recorded and not charged to the daily budget; a corrupt state file is moved
aside and the service starts afresh; an alarm is answered 202 only once it is on disk, 503 otherwise, and its
redelivery is then admitted; a Kubeflow Pipelines run that outlasts its timeout is terminated."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
import urllib.parse
import uuid

import httpx
import numpy as np
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from testbed import DRIFT, register_version
from kfloop.credentials import bearer, local_token
from kfloop.data import LabelledData, load_dataset, save_csv
from kfloop.policies import Policy
from kfloop.local.supervisor import free_port
from kfloop.registry import ModelRegistry

pytestmark = pytest.mark.slow


def test_retraining_data_is_the_base_plus_labelled_shards_in_one_schema_and_shards_are_not_added_twice(tmp_path):
    from kfloop.policies.retraining import LocalRetrainer, RetrainingConfig, RetrainingService

    registry = tmp_path / "registry"
    register_version(registry, "digits", "builtin:digits", n_estimators=5, work=tmp_path / "v1")
    base = load_dataset("builtin:digits")
    shard_folder = registry / "digits" / "captures" / "20261201"
    shard_folder.mkdir(parents=True)
    shifted = LabelledData(base.features[:30] + 1.0, base.labels[:30], base.feature_names, "labeller",
                           ids=np.array([f"cap:{i}" for i in range(30)]))
    save_csv(shifted, str(shard_folder / "labelled-1.csv"))
    (shard_folder / "unlabelled.csv").write_text("id\n")  # captures without labels are not training data
    policy = Policy.model_validate({"model": "digits"})
    service = RetrainingService(RetrainingConfig("digits", str(registry), policy, tmp_path / "state"),
                             LocalRetrainer(policy, str(registry), tmp_path, model="digits"), None)

    uri, target = service.training_data("run1")
    data = load_dataset(uri, target=target)
    assert (target, data.rows, data.feature_names) == ("label", base.rows + 30, base.feature_names)
    np.testing.assert_allclose(data.features[: base.rows], base.features)
    np.testing.assert_allclose(data.features[base.rows:], base.features[:30] + 1.0)
    assert list(data.labels) == list(base.labels) + list(base.labels[:30])

    # Once a version trained on that folder serves, the next run starts again from the base, not base + old shards.
    register_version(registry, "digits", uri, n_estimators=5, work=tmp_path / "v2", target="label")
    again_uri, again_target = service.training_data("run2")
    assert load_dataset(again_uri, target=again_target).rows == base.rows + 30


def test_a_run_that_fails_on_infrastructure_does_not_use_up_the_daily_budget(tmp_path, registry_with_weak_v1):
    """A Kubeflow Pipelines API that does not answer is an infrastructure failure: the run is recorded as failed
    and uncharged, so the next alarm still starts a run with a budget of one a day."""
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies.retraining import ClusterRetrainer, RetrainingConfig, RetrainingService

    registry, _, full = registry_with_weak_v1
    policy = Policy.model_validate({"model": "digits", "retraining": {"base_data": full, "cooldown_seconds": 0, "max_runs_per_day": 1}})
    down = KfpEndpoint(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    service = RetrainingService(RetrainingConfig("digits", str(registry), policy, tmp_path / "state", target="digit"),
                                ClusterRetrainer(policy, down, str(registry), model="digits", image="kfloop:test"), None)
    service.start()
    try:
        outcomes = []
        for attempt in range(2):
            outcomes.append(service.admit(f"alarm-{attempt}", DRIFT))
            deadline = time.time() + 60
            while time.time() < deadline and (service.status()["pending"] or any(r["outcome"] == "running" for r in service.status()["runs"])):
                time.sleep(0.2)
        runs = service.status()["runs"]
        assert outcomes == ["started", "started"]
        assert [(r["outcome"], r["charged"]) for r in runs] == [("failed", False), ("failed", False)]
        assert "ClusterError" in runs[0]["error"]
    finally:
        service.stop()


def _service(tmp_path, registry=None, retrainer=None, policy=None):
    from kfloop.policies.retraining import Retrainer, RetrainingConfig, RetrainingService

    policy = policy or Policy.model_validate({"model": "digits", "retraining": {"cooldown_seconds": 0, "max_runs_per_day": 10}})
    config = RetrainingConfig("digits", str(registry or tmp_path / "registry"), policy, tmp_path / "state", target="digit")
    return RetrainingService(config, retrainer or Retrainer(), None)


@pytest.mark.parametrize("content", [b'{"seen": ["a", "b"], "pend', b"", b"\xff\xfe\x00", b"[]", b'{"seen": "abc"}',
                                     b'{"runs": [{"id": "r1", "outcome": "running", "started": "yesterday"}]}', None],
                         ids=["torn", "empty", "not-utf8", "a-list", "seen-not-a-list", "run-with-a-bad-time", "a-folder"])
def test_a_corrupt_state_file_is_moved_aside_with_an_error_line_and_the_service_starts_afresh(tmp_path, caplog, content):
    state = tmp_path / "state" / "trigger-state.json"
    state.parent.mkdir()
    if content is None:
        state.mkdir()  # not even a file: unreadable
    else:
        state.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="kfloop.policies.retraining"):
        service = _service(tmp_path)
    moved = list(state.parent.glob("trigger-state.json.corrupt-*"))
    assert len(moved) == 1
    if content is not None:
        assert moved[0].read_bytes() == content  # kept for a post-mortem, byte for byte
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(moved[0]) in errors[0] and "started afresh" in errors[0]
    assert service.status()["pending"] == [] and service.status()["runs"] == []
    assert service.admit("after", DRIFT) == "started"
    assert json.loads(state.read_text())["seen"] == ["after"]


def test_the_state_file_is_written_whole_and_its_memory_of_alarm_ids_is_bounded(tmp_path, monkeypatch):
    from kfloop.policies import retraining

    monkeypatch.setattr(retraining, "SEEN_IDS", 5)
    state = tmp_path / "state" / "trigger-state.json"
    state.parent.mkdir()
    (state.parent / ".trigger-state.json.tmp-dead1234").write_text("{")  # left by a write a crash cut short
    service = _service(tmp_path)
    outcomes = [service.admit(f"alarm-{i}", DRIFT) for i in range(8)]
    assert outcomes == ["started"] + ["coalesced"] * 7
    assert json.loads(state.read_text())["seen"] == [f"alarm-{i}" for i in range(3, 8)]
    before = state.stat().st_mtime_ns
    assert service.admit("alarm-7", DRIFT) == "duplicate"
    assert state.stat().st_mtime_ns == before  # a duplicate changes nothing, so nothing is written
    restarted = _service(tmp_path)
    assert list(restarted.state.seen) == [f"alarm-{i}" for i in range(3, 8)]
    assert sorted(p.name for p in state.parent.iterdir()) == ["trigger-state.json"]


def _alarm(event_id: str, token: str) -> tuple[dict[str, str], bytes]:
    headers, body = to_binary(CloudEvent({"type": DRIFT, "source": "kfloop/watch/digits", "id": event_id},
                                         {"model": "digits", "kind": "drift"}))
    return {**headers, **bearer(token)}, body


def test_an_alarm_that_cannot_be_recorded_is_answered_503_and_its_redelivery_is_admitted(tmp_path):
    from kfloop.serving.auth import LocalToken
    from kfloop.serving.trigger import create_app

    service = _service(tmp_path)
    token = local_token(tmp_path / "home")
    app = create_app(service, LocalToken(token))
    state = tmp_path / "state" / "trigger-state.json"

    async def deliver(event_id: str) -> httpx.Response:
        headers, body = _alarm(event_id, token)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.post("/", headers=headers, content=body)

    state.mkdir(parents=True)  # a folder where the file goes: the rename into place fails, as on a broken disk
    refused = asyncio.run(deliver("alarm-1"))
    assert refused.status_code == 503
    assert refused.json()["error"].startswith("the trigger could not record alarm 'alarm-1' (IsADirectoryError")
    assert refused.json()["error"].endswith("it was not taken: send it again")
    assert service.status()["pending"] == [] and "alarm-1" not in service.state.seen
    state.rmdir()  # the disk is back
    again = asyncio.run(deliver("alarm-1"))
    assert (again.status_code, again.headers["x-kfloop-outcome"]) == (202, "started")
    on_disk = json.loads(state.read_text())
    assert on_disk["seen"] == ["alarm-1"] and [r["event_id"] for r in on_disk["pending"]] == ["alarm-1"]
    assert asyncio.run(deliver("alarm-1")).headers["x-kfloop-outcome"] == "duplicate"


class _PipelinesApi(http.server.BaseHTTPRequestHandler):
    """A stand-in Kubeflow Pipelines API (v2beta1) on loopback whose runs never finish; records what it is asked
    and the runs created (with their bodies). Lists runs with a ``display_name`` EQUALS filter, as the API does."""

    requests: list[str]
    runs: dict[str, dict]
    created: list[dict]

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(f"GET {self.path.split('?')[0]}")
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._send({"experiments": [{"experiment_id": "e1", "display_name": "kfloop"}], "total_size": 1})
        elif self.path.startswith("/apis/v2beta1/runs/"):
            self._send(self.runs[self.path.rsplit("/", 1)[-1]])
        elif self.path.startswith("/apis/v2beta1/runs?"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            [predicate] = json.loads(query["filter"][0])["predicates"]
            assert (predicate["key"], predicate["operation"]) == ("display_name", "EQUALS")
            named = [r for r in self.runs.values() if r["display_name"] == predicate["string_value"]]
            self._send({"runs": named, "total_size": len(named)})
        else:
            self._send({})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.requests.append(f"POST {self.path}")
        if self.path == "/apis/v2beta1/runs":
            run_id = uuid.uuid4().hex
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.runs[run_id] = {"run_id": run_id, "display_name": body.get("display_name"), "state": "RUNNING", "created_at": created}
            self.created.append(body)
            self._send(self.runs[run_id])
        elif self.path.endswith(":terminate"):
            self.runs[self.path.split("/")[-1].split(":")[0]]["state"] = "CANCELING"
            self._send({})
        else:
            self._send({})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def pipelines_api():
    handler = type("PipelinesApi", (_PipelinesApi,), {"requests": [], "runs": {}, "created": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")  # kfp.Client's, on every client
def test_a_pipeline_run_that_outlasts_its_timeout_is_terminated_and_the_run_fails_uncharged_and_its_gate_only_approves(
        tmp_path, registry_with_weak_v1, pipelines_api):
    """The wait is bounded; at its end the KFP run is terminated (it would otherwise go on), the run is an
    infrastructure failure; the run was created with a gate that cannot move the production pointer."""
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies.retraining import ClusterRetrainer

    registry, _, full = registry_with_weak_v1
    host, api = pipelines_api
    policy = Policy.model_validate({"model": "digits", "retraining": {"base_data": full, "cooldown_seconds": 0}})
    retrainer = ClusterRetrainer(policy, KfpEndpoint(host), str(registry), model="digits", image="kfloop:test",
                                 timeout_seconds=1, poll_seconds=0.1)
    service = _service(tmp_path, registry, retrainer, policy)
    assert service.admit("alarm-1", DRIFT) == "started"
    started = time.monotonic()
    run = service.run_next()
    assert time.monotonic() - started < 10
    [kfp_run] = api.runs
    assert (run["outcome"], run["charged"], run["pipeline_run"]) == ("failed", False, kfp_run)
    assert run["error"] == f"ClusterError: pipeline run {kfp_run} did not finish within 1 s (state RUNNING): terminated it"
    assert f"POST /apis/v2beta1/runs/{kfp_run}:terminate" in api.requests
    assert api.runs[kfp_run]["display_name"] == f"kfloop-retrain-{run['id']}"
    [created] = api.created
    parameters = created["runtime_config"]["parameters"]
    assert parameters["move_production"] is False
    # warm-started from the serving version 1 (one hand-picked set, not on the policy's grid: no neighbours)
    v1_params = {"n_estimators": 40, "max_features": "sqrt"}
    assert parameters["search_batches"] == [[v1_params]]
    assert parameters["lineage"] == {"search": "warm", "candidates": 1, "parent_version": "1", "seed_params": v1_params,
                                     "pinned": [], "evaluation": "oob"}
    assert parameters["evaluation"] == "oob"
    assert run["search"] == parameters["lineage"]
    assert ModelRegistry(registry).production_version("digits") == "1"
    assert json.loads((tmp_path / "state" / "trigger-state.json").read_text())["runs"][-1]["outcome"] == "failed"


class _StoppedAfterSubmit(BaseException):
    """The trigger process ends here (as on SIGKILL): nothing after it runs, not even ``except Exception``."""


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_a_trigger_stopped_after_creating_a_pipeline_run_finds_that_run_by_name_instead_of_creating_another(
        tmp_path, registry_with_weak_v1, pipelines_api):
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies.retraining import ClusterRetrainer

    class StopsAfterSubmit(ClusterRetrainer):
        def submit(self, data_uri, target, run_name, search):
            super().submit(data_uri, target, run_name, search)
            raise _StoppedAfterSubmit  # the run exists; its id was never recorded

    registry, _, full = registry_with_weak_v1
    host, api = pipelines_api
    policy = Policy.model_validate({"model": "digits", "retraining": {"base_data": full, "cooldown_seconds": 0}})
    options = dict(model="digits", image="kfloop:test", timeout_seconds=1, poll_seconds=0.1)
    first = _service(tmp_path, registry, StopsAfterSubmit(policy, KfpEndpoint(host), str(registry), **options), policy)
    assert first.admit("alarm-1", DRIFT) == "started"
    with pytest.raises(_StoppedAfterSubmit):
        first.run_next()
    [interrupted] = json.loads((tmp_path / "state" / "trigger-state.json").read_text())["runs"]
    assert (interrupted["step"], interrupted.get("pipeline_run")) == ("training", None)

    restarted = _service(tmp_path, registry, ClusterRetrainer(policy, KfpEndpoint(host), str(registry), **options), policy)
    run = restarted.run_next()
    [kfp_run] = api.runs  # still one: the restarted trigger waited for it (and, past the timeout, terminated it)
    assert (run["id"], run["pipeline_run"], run["restarts"]) == (interrupted["id"], kfp_run, 1)
    assert len(api.created) == 1 and f"POST /apis/v2beta1/runs/{kfp_run}:terminate" in api.requests
