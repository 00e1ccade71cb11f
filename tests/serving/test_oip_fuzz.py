"""Schemathesis against the Open Inference Protocol's OpenAPI (``../shared/specs/oip``), on the live
transformer and on a live predictor replica: no generated request -- valid or broken -- gets a 5xx, and
every 4xx with a JSON body is the protocol's error object ``{"error": "..."}``.

The model name is pinned to the served ``leaf``; the version is one of a few sensible values (the
production version, the other registered one, one that does not exist, one that is not digits), so the
cases reach the model instead of stopping at "no such model". Each operation gets a bounded number of
examples per generation mode (positive: bodies the schema allows; negative: bodies and parameters it
does not), with no deadline. The summary line per server (cases, answers by status class, 5xx) is printed:
see it with ``-n 0 -s``, or with ``-rA`` under xdist (which keeps workers' output).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow

MODEL = "leaf"
VERSIONS = ["1", "2", "3", "latest"]  # production, registered but not served, not registered, not digits
EXAMPLES = 40  # per operation and mode: ~170 cases a server in ~12 s (drawing an infer body costs ~50 ms, the call ~5)


@pytest.fixture(scope="module")
def oip_schema(shared_specs) -> schemathesis.BaseSchema:
    """The OIP REST OpenAPI with its ``${NAME}`` path templates as OpenAPI ``{NAME}``, the version limited to
    :data:`VERSIONS` (the model name is fixed when cases are drawn)."""
    document = yaml.safe_load((shared_specs / "oip" / "open_inference_rest.yaml").read_text())
    paths = {}
    for path, item in document["paths"].items():
        for parameter in item.get("parameters", []):
            if parameter["name"] == "MODEL_VERSION":
                parameter["schema"] = {"type": "string", "enum": VERSIONS}
        paths[path.replace("${MODEL_NAME}", "{MODEL_NAME}").replace("${MODEL_VERSION}", "{MODEL_VERSION}")] = item
    document["paths"] = paths
    return schemathesis.openapi.from_dict(document)


@dataclass
class Outcome:
    """What one server answered to the fuzzed cases."""

    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    server_error_kinds: Counter = field(default_factory=Counter)  # (status, operation): count
    not_protocol_errors: list[str] = field(default_factory=list)

    def summary(self, name: str, seconds: float) -> str:
        classes = Counter(f"{status // 100}xx" for status in self.statuses.elements())
        kinds = "; ".join(f"{status} {operation}: {n}" for (status, operation), n in self.server_error_kinds.most_common())
        return (f"OIP fuzz {name}: {self.cases} cases in {seconds:.1f} s, answers {dict(sorted(classes.items()))}, "
                f"5xx {len(self.server_errors)}{f' ({kinds})' if kinds else ''}, "
                f"4xx not in the error format {len(self.not_protocol_errors)}")


def fuzz(schema: schemathesis.BaseSchema, base_url: str) -> Outcome:
    """Every operation of ``schema``, positive and negative cases, sent to ``base_url``; failures are
    collected (not raised) so that one run counts all of them."""
    outcome = Outcome()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        has_input = bool(list(operation.iter_parameters())) or bool(operation.body)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not has_input:
                continue  # nothing to break in a parameterless GET
            path_parameters = {"MODEL_NAME": MODEL} if "{MODEL_NAME}" in operation.path else None
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def send(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, session=session, timeout=30)
                outcome.cases += 1
                outcome.statuses[response.status_code] += 1
                where = f"{case.method} {response.request.url} body={case.body!r:.200} -> {response.status_code} {response.text[:200]}"
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except BaseExceptionGroup:
                    outcome.server_errors.append(where)
                    outcome.server_error_kinds[response.status_code, case.operation.label] += 1
                content_type = response.headers.get("content-type", [""])[0]  # schemathesis keeps every value of a header
                if 400 <= response.status_code < 500 and content_type.startswith("application/json"):
                    body = response.json()
                    if not (isinstance(body, dict) and isinstance(body.get("error"), str)):
                        outcome.not_protocol_errors.append(where)

            send()
    session.close()
    return outcome


def assert_protocol_answers(name: str, schema: schemathesis.BaseSchema, base_url: str) -> None:
    started = time.monotonic()
    outcome = fuzz(schema, base_url)
    print("\n" + outcome.summary(name, time.monotonic() - started))
    assert outcome.cases >= EXAMPLES
    assert (outcome.server_errors, outcome.not_protocol_errors) == ([], []), "\n".join(
        ["5xx:", *outcome.server_errors[:10], "4xx not in the error format:", *outcome.not_protocol_errors[:10]])


def test_no_fuzzed_oip_request_gets_a_5xx_from_the_transformer(stack, oip_schema):
    assert_protocol_answers("transformer", oip_schema, stack["runtime"].endpoints["rest"])


def test_no_fuzzed_oip_request_gets_a_5xx_from_a_predictor_replica(stack, oip_schema):
    replica = stack["runtime"].status()["traffic"][0]["replicas"][0]["address"]
    assert_protocol_answers("predictor", oip_schema, f"http://{replica}")
