"""Robustness: what a curious user on this machine gets from a running local loop (issue 13's probe table).

Usage: python benchmarks/probes.py [--data URI] [--body-mb 129]
(default data: builtin:digits; the loop runs under a temporary home on free loopback ports and is stopped at the end)

A whole loop is started as ``kfloop up`` starts it (transformer + predictor, watch, trigger, admin
API, fault injection on), then every probe is sent twice where it matters -- as a stranger
(no token) and as the operator (HOME's token) -- and the answer, what it changed and the
transformer's peak RSS (VmHWM) are printed. Last row: the loop still serves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from kfloop.credentials import bearer, local_token
from kfloop.local.stack import LocalStack, StackPorts
from kfloop.local.supervisor import free_port
from kfloop.policies import load_policy


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:",)):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--body-mb", type=int, default=129)
    args = parser.parse_args()
    console = Console(width=150)
    with tempfile.TemporaryDirectory(prefix="kfloop-probes-") as work:
        home = Path(work)
        policy = load_policy(None).model_copy(update={"model": "digits"})
        stack = LocalStack(policy, None, home, str(home / "registry"), data_uri=args.data,
                           ports=StackPorts(*(free_port() for _ in range(5))))
        console.print("training a first version (kfp.local) ...")
        stack.ensure_model()
        stack.start()
        try:
            run_probes(stack, home, args.body_mb, console)
        finally:
            stack.stop()


def run_probes(stack: LocalStack, home: Path, body_mb: int, console: Console) -> None:
    runtime = stack.runtime
    assert runtime is not None and runtime.transformer is not None
    urls = stack.urls
    token = bearer(local_token(home))
    n = len(runtime.registry.preprocessor("digits", runtime.version).feature_names)
    v1_url, v2_url = runtime.endpoints["v1"], runtime.endpoints["v2"]
    row = [0.0] * n
    table = Table(title="probes against a local loop (kfloop up)")
    for column in ("probe", "answer", "what changed"):
        table.add_column(column)

    def replicas() -> int:
        return sum(len(s["replicas"]) for s in runtime.status()["traffic"])

    hijack = {"routes": [{"version": "1", "weight": 100, "upstreams": ["127.0.0.1:9"]}]}
    answer = httpx.put(urls["rest"] + "/kfloop/routes", json=hijack)
    table.add_row("PUT /kfloop/routes on the client port (routes to 127.0.0.1:9)", str(answer.status_code),
                  f"predict afterwards: {httpx.post(v1_url, json={'instances': [row]}).status_code}")
    control = f"http://127.0.0.1:{runtime.transformer_control_port}/kfloop/routes"
    answers = [httpx.put(control, json=hijack).status_code,
               httpx.put(control, json={"routes": [{"version": "../other/1", "upstreams": ["127.0.0.1:9"]}]},
                         headers=token).status_code]
    table.add_row("same on the control port: no token / with token, version ../other/1", " / ".join(map(str, answers)), "-")

    alarm = {"specversion": "1.0", "id": "forged-1", "source": "me", "type": "io.kfloop.drift.detected",
             "data": {"model": "digits"}}
    before_runs = len(httpx.get(urls["trigger"] + "/status").json()["runs"])
    answer = httpx.post(urls["trigger"] + "/", content=json.dumps(alarm).encode(), headers={"content-type": "text/plain"})
    after = httpx.get(urls["trigger"] + "/status").json()
    table.add_row("drift alarm to the trigger, no credentials, text/plain", str(answer.status_code),
                  f"outcome header: {answer.headers.get('x-kfloop-outcome', 'none')}; runs {before_runs} -> {len(after['runs'])}, "
                  f"pending {len(after['pending'])}")

    watch_before = httpx.get(urls["watch"] + "/status").json()
    answer = httpx.post(urls["watch"] + "/", json={"instances": [[99.0] * n] * 100}, headers={
        "ce-specversion": "1.0", "ce-id": "forged", "ce-source": "me", "ce-type": "org.kubeflow.serving.inference.request"})
    watch_after = httpx.get(urls["watch"] + "/status").json()
    table.add_row("100 forged payload rows to the watch, no credentials", str(answer.status_code),
                  f"rows in window {watch_before['rows_in_window']} -> {watch_after['rows_in_window']}")

    for path, body in (("/traffic", {"weights": {"1": 100}}), ("/replicas", {"replicas": 3}), ("/version", {"version": "1"})):
        answer = httpx.post(urls["admin"] + path, json=body)
        table.add_row(f"admin POST {path}, no credentials", str(answer.status_code), f"replicas {replicas()}")
    replica = runtime.shares[0].replicas[0]
    faults = f"http://127.0.0.1:{replica.control_port}/kfloop/faults"
    table.add_row("fault injection PUT /kfloop/faults (rate 1.0), no credentials",
                  str(httpx.put(faults, json={"failure_rate": 1.0}).status_code), "-")
    answer = httpx.post(urls["admin"] + "/replicas", json={"replicas": 10_000}, headers=token)
    table.add_row("admin POST /replicas 10000, with the token", str(answer.status_code), f"replicas {replicas()}")

    pid = runtime.transformer.pid
    body = b'{"instances": [' + b"[0.0]," * (body_mb * 1024 * 1024 // 6) + b"[0.0]]}"
    start = time.perf_counter()
    answer = httpx.post(v1_url, content=body, headers={"content-type": "application/json"}, timeout=120)
    seconds = time.perf_counter() - start
    table.add_row(f"{len(body) / 2**20:.0f} MiB JSON body to the transformer", str(answer.status_code),
                  f"{seconds:.2f} s; transformer peak RSS {peak_rss_mb(pid):.0f} MB")
    padded = httpx.post(v1_url, content=b"{}", headers={"content-type": "application/json", "x-pad": "x" * (64 << 20)},
                        timeout=120)
    table.add_row("64 MiB header to the transformer", str(padded.status_code), f"transformer peak RSS {peak_rss_mb(pid):.0f} MB")
    shape = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, n], "data": row * 5000}]}
    table.add_row('V2 "shape": [-1, n] with 5000 rows (batch limit 1024)', str(httpx.post(v2_url, json=shape).status_code), "-")
    answer = httpx.post(v1_url, json={"instances": [[1e39] + row[1:]]})
    table.add_row("V1 value 1e39", str(answer.status_code), answer.json().get("error", "")[:60])
    statuses = {httpx.post(f"{urls['rest']}/v2/models/made-up-{index}/infer", json={"inputs": []}).status_code
                for index in range(300)}
    series = [line for line in httpx.get(urls["rest"] + "/metrics").text.splitlines()
              if line.startswith("kfloop_requests_total{") and "made-up" in line]
    table.add_row("300 made-up model names in URLs", "/".join(map(str, sorted(statuses))),
                  f"new metric series naming them: {len(series)}")
    answer = httpx.post(v1_url, json={"instances": [row]})
    table.add_row("afterwards: a client's prediction", str(answer.status_code), f"transformer pid {runtime.transformer.pid} "
                  f"({'same' if runtime.transformer.pid == pid else 'restarted'})")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
