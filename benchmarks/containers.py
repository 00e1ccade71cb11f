"""Benchmark: kfloop as containers and with its registry in object storage (issue 24).

Usage: python3 hack/containers.py run -- .venv/bin/python benchmarks/containers.py [--data URI] [--runs N]
(the daemon and the image come from hack/containers.py: DOCKER_HOST and KFLOOP_TEST_IMAGE; default data:
../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

Printed, each measured in this run:
1. the image: its size, a container's start (`docker run --rm --network none IMAGE --help`, wall) and the
   serving modules' import time inside it;
2. the training pipeline with the default policy, each task a subprocess (SubprocessRunner) against each
   task a container (DockerRunner, no network), alternated N times: wall medians, the ratio (target
   <= 2x), and whether the winner and its holdout accuracy are the same;
3. the S3 registry against a real SeaweedFS: sequential registrations, 4 concurrent writers x 3, and a
   writer killed midway -- versions acknowledged against versions listed;
4. KServe's storage initializer on version 1 with versions 1 and 10 in the bucket: which files land,
   for the URI kfloop renders and for the same URI without its final '/'.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SHARED_LEAF = ROOT.parent / "shared" / "data" / "kaggle_leaf_train.csv"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
WRITER = """
import json, sys
from kfloop.registry import ModelRegistry
registry = ModelRegistry(sys.argv[1])
for _ in range(int(sys.argv[2])):
    print(registry.register("m", json.loads(sys.argv[3]), {}), flush=True)
"""


def wall(command: list[str], **options) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, **options)
    return time.perf_counter() - started, completed


def image_rows(image: str) -> list[tuple[str, str]]:
    size = int(subprocess.run([DOCKER, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                              text=True, check=True).stdout)
    starts = [wall([DOCKER, "run", "--rm", "--network", "none", image, "--help"])[0] for _ in range(5)]
    probe = ("import time; t = time.perf_counter(); import kfloop.serving.predictor, kfloop.serving.transformer; "
             "print(time.perf_counter() - t)")
    imports = [float(wall([DOCKER, "run", "--rm", "--network", "none", "--read-only", "--user", "10001:10001",
                           "--entrypoint", "python3", image, "-c", probe])[1].stdout) for _ in range(3)]
    return [("image size", f"{size / 1e6:.0f} MB"),
            ("container start + kfloop --help (median of 5)", f"{statistics.median(starts):.2f} s"),
            ("import predictor + transformer in the container (median of 3)", f"{statistics.median(imports):.2f} s")]


def pipeline_rows(image: str, data: str, runs: int, work: Path) -> list[tuple[str, str]]:
    def train(runner: str, n: int) -> tuple[float, dict]:
        extra = ["--runner", "docker", "--image", image] if runner == "docker" else []
        seconds, completed = wall([sys.executable, "-m", "kfloop", "train", "--data", data, "--json", "--registry",
                                   str(work / f"{runner}-{n}"), "--home", str(work / "home"), *extra])
        if completed.returncode != 0:
            raise SystemExit(f"kfloop train --runner {runner} failed: {completed.stderr[-2000:]}")
        result = json.loads(completed.stdout)
        return seconds, {"params": result["best_params"], "accuracy": result["metrics"]["accuracy"]}

    times: dict[str, list[float]] = {"subprocess": [], "docker": []}
    winners: dict[str, list[dict]] = {"subprocess": [], "docker": []}
    for n in range(runs):
        for runner in ("subprocess", "docker"):
            seconds, winner = train(runner, n)
            times[runner].append(seconds)
            winners[runner].append(winner)
    same = all(w == winners["subprocess"][0] for w in winners["subprocess"] + winners["docker"])
    sub, dock = statistics.median(times["subprocess"]), statistics.median(times["docker"])
    return [("pipeline, SubprocessRunner (median)", f"{sub:.1f} s  {[round(t, 1) for t in times['subprocess']]}"),
            ("pipeline, DockerRunner, no network (median)", f"{dock:.1f} s  {[round(t, 1) for t in times['docker']]}"),
            ("DockerRunner / SubprocessRunner (target <= 2)", f"{dock / sub:.2f}"),
            ("same winner and holdout accuracy", f"{same}: {winners['docker'][0]}")]


def registry_rows(server, work: Path) -> list[tuple[str, str]]:
    from kfloop.registry import ModelRegistry

    os.environ.update(server.env)
    files = {}
    for name, size in (("model.joblib", 4_000_000), ("preprocessor.joblib", 2_000)):
        (work / name).write_bytes(os.urandom(size))
        files[name] = str(work / name)
    rows = []
    root = "s3://kfloop/bench-sequential/registry"
    started = time.perf_counter()
    acknowledged = [ModelRegistry(root).register("m", files, {}) for _ in range(10)]
    seconds = time.perf_counter() - started
    rows.append(("S3: 10 sequential registrations (4 MB each)",
                 f"{seconds:.2f} s, {seconds / 10:.2f} s each; acknowledged {acknowledged[0]}..{acknowledged[-1]}, "
                 f"listed {len(ModelRegistry(root).versions('m'))}"))
    root = "s3://kfloop/bench-concurrent/registry"
    started = time.perf_counter()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, root, "3", json.dumps(files)], stdout=subprocess.PIPE,
                                text=True) for _ in range(4)]
    acknowledged = [v for w in writers for v in w.communicate(timeout=300)[0].split()]
    seconds = time.perf_counter() - started
    listed = ModelRegistry(root).versions("m")
    rows.append(("S3: 4 concurrent writers x 3", f"{seconds:.2f} s; acknowledged {len(acknowledged)} "
                 f"({len(set(acknowledged))} distinct), listed {len(listed)}, equal: {sorted(acknowledged, key=int) == listed}"))
    root = "s3://kfloop/bench-killed/registry"
    ModelRegistry(root).register("m", files, {})
    fifo = work / "fifo"
    os.mkfifo(fifo)
    killed = subprocess.Popen([sys.executable, "-c", WRITER, root, "1", json.dumps({**files, "preprocessor.joblib": str(fifo)})])
    registry = ModelRegistry(root)
    deadline = time.monotonic() + 60
    while not registry.fs.exists(f"{registry._root_path}/m/2/model.joblib") and time.monotonic() < deadline:
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    listed_after_kill = registry.versions("m")
    swept = ModelRegistry(root, stale_seconds=0).sweep("m")
    after = registry.register("m", files, {})
    rows.append(("S3: a writer killed midway (SIGKILL after its first file)",
                 f"acknowledged 1, listed {listed_after_kill}; swept {len(swept)} folder; next version {after}, "
                 f"listed {registry.versions('m')}"))
    return rows


def initializer_rows(server, work: Path) -> list[tuple[str, str]]:
    from objectstore import INITIALIZER
    from kfloop.registry import ModelRegistry

    registry = ModelRegistry("s3://kfloop/bench-initializer/registry")
    for number in range(1, 11):
        (work / "model.joblib").write_text(f"version {number}")
        registry.register("classifier", {"model.joblib": str(work / "model.joblib")}, {})
    rows = []
    for label, uri in (("kfloop's storageUri", registry.uri("classifier", "1")),
                       ("the same without its final '/'", registry.uri("classifier", "1").rstrip("/"))):
        target = Path(tempfile.mkdtemp(dir=work)) / "models"
        env = {"PATH": os.environ["PATH"], "HOME": str(work), **server.env}
        seconds, completed = wall([sys.executable, "-c", INITIALIZER, uri, str(target)], env=env)
        assert completed.returncode == 0, completed.stderr
        landed = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
        rows.append((f"storage initializer, versions 1 and 10 in the bucket: {label}", f"{seconds:.1f} s: {landed}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--runs", type=int, default=2)
    arguments = parser.parse_args()
    image = os.environ.get("KFLOOP_TEST_IMAGE")
    if not image or not os.environ.get("DOCKER_HOST"):
        raise SystemExit("run under hack/containers.py run -- ... (DOCKER_HOST and KFLOOP_TEST_IMAGE)")
    from objectstore import SeaweedS3

    table = Table(title=f"kfloop in containers and on S3 (data: {arguments.data})")
    table.add_column("what")
    table.add_column("measured")
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-") as folder:
        work = Path(folder)
        for row in image_rows(image) + pipeline_rows(image, arguments.data, arguments.runs, work):
            table.add_row(*row)
        server = SeaweedS3(work / "s3").start()
        try:
            for row in registry_rows(server, work) + initializer_rows(server, work):
                table.add_row(*row)
        finally:
            server.stop()
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
