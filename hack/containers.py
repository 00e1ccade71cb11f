#!/usr/bin/env python3
"""Containers on one machine: a private Docker daemon, the base image, the kfloop image, the container tests.

    hack/containers.py image            # build the kfloop image (make image), print its size
    hack/containers.py test [PYTEST...] # make test-containers: daemon, image, tests, clean-up
    hack/containers.py run -- CMD...    # CMD with DOCKER_HOST and KFLOOP_TEST_IMAGE set (benchmarks)

Each command installs Debian's docker.io and debootstrap where they are missing, starts its own
dockerd (overlay2; vfs only where overlay2 cannot mount, said out loud) on a unix socket in a
temporary folder with no iptables and no bridge, and at the end stops it by its PID, unmounts
what is left under its data root and removes it. Images outlive the daemon as `docker save`
archives in the cache folder (KFLOOP_IMAGE_CACHE, default ~/.cache/kfloop-images), named by a
hash of their inputs: an unchanged tree loads its image instead of building it. The base is
python:3.11-slim where a registry answers, else Debian bookworm made with debootstrap.
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KFLOOP_IMAGE_CACHE", Path.home() / ".cache" / "kfloop-images"))
IMAGE = "kfloop:local"
PULLED_BASE = "python:3.11-slim"
DEBIAN_BASE = "kfloop-base:bookworm-python3.11"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
UNREAD = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")  # left out of the base, as -slim does
# What the image is built from: a change to any of these builds it anew.
IMAGE_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "kfloop", "components", "pipelines",
                "serving", "policies", "manifests")
# Debian's client (docker.io, installed below where missing), never whatever `docker` is first on PATH: a newer
# client with DOCKER_BUILDKIT=1 wants its buildx plug-in, which Debian's daemon does not need.
DOCKER = "/usr/bin/docker"


def say(message: str) -> None:
    print(f"[containers] {message}", flush=True)


def run(*command: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **options)


def install_system_packages() -> None:
    """Debian's docker.io and debootstrap, where missing."""
    missing = [package for package, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists()]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing {' '.join(missing)}")
    run(*sudo, "apt-get", "update", "-qq")
    run(*sudo, "apt-get", "install", "-y", "-qq", *missing, stdout=subprocess.DEVNULL)


# --- the daemon ---------------------------------------------------------------------------------------


@contextmanager
def docker_daemon() -> Iterator[dict[str, str]]:
    """A private dockerd for the block; yields the environment its clients need (DOCKER_HOST)."""
    root = Path(tempfile.mkdtemp(prefix="kfloop-docker-"))
    process = None
    try:
        for driver in ("overlay2", "vfs"):
            process = _start_dockerd(root, driver)
            if process is not None:
                break
            say(f"dockerd did not start with the {driver} storage driver")
        if process is None:
            raise SystemExit(f"dockerd did not start (logs in {root})")
        yield {**os.environ, "DOCKER_HOST": f"unix://{root}/docker.sock", "DOCKER_BUILDKIT": "1"}
    finally:
        if process is not None:
            _stop(process)
        _remove_data_root(root)


def _start_dockerd(root: Path, driver: str) -> subprocess.Popen | None:
    data = root / driver
    data.mkdir(parents=True, exist_ok=True)
    log = open(root / f"dockerd-{driver}.log", "wb")
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    process = subprocess.Popen(
        [dockerd, f"--storage-driver={driver}", f"--data-root={data}", f"--host=unix://{root}/docker.sock",
         f"--exec-root={root}/exec", f"--pidfile={root}/dockerd.pid", "--iptables=false", "--bridge=none",
         "--ip-forward=false", "--ip-masq=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    env = {**os.environ, "DOCKER_HOST": f"unix://{root}/docker.sock"}
    while time.monotonic() < deadline and process.poll() is None:
        info = subprocess.run([DOCKER, "info", "--format", "{{.Driver}}"], env=env, capture_output=True, text=True)
        if info.returncode == 0:
            say(f"dockerd {process.pid} up: storage driver {info.stdout.strip()}, data root {data}")
            return process
        time.sleep(0.5)
    _stop(process)
    return None


def _stop(process: subprocess.Popen) -> None:
    """Stop dockerd by its PID (it stops its containerd and containers), then make sure."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    say(f"dockerd {process.pid} stopped")


def _remove_data_root(root: Path) -> None:
    """Unmount whatever is still mounted under ``root`` (deepest first), then remove it."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)


# --- images -----------------------------------------------------------------------------------------


def inputs_hash(paths: tuple[str, ...], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for name in paths:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _has_image(env: dict[str, str], tag: str) -> bool:
    return subprocess.run([DOCKER, "image", "inspect", tag], env=env, capture_output=True).returncode == 0


def _load_or(env: dict[str, str], archive: Path, tag: str) -> bool:
    """Load ``tag`` from ``archive`` if it is cached; whether it was."""
    if _has_image(env, tag):
        return True
    if not archive.exists():
        return False
    started = time.monotonic()
    run(DOCKER, "load", "-q", "-i", str(archive), env=env, stdout=subprocess.DEVNULL)
    say(f"{tag} loaded from {archive} in {time.monotonic() - started:.1f} s")
    return True


def base_image(env: dict[str, str]) -> str:
    """python:3.11-slim where a registry answers, else the Debian base (debootstrap), cached."""
    pulled = subprocess.run(["timeout", "60", DOCKER, "pull", "-q", PULLED_BASE], env=env, capture_output=True)
    if pulled.returncode == 0:
        return PULLED_BASE
    certificates = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    key = hashlib.sha256(f"{DEBIAN_SUITE}:{DEBIAN_PACKAGES}:{UNREAD}".encode() + b"".join(c.read_bytes() for c in certificates))
    archive = CACHE / f"base-{key.hexdigest()[:16]}.tar"
    if _load_or(env, archive, DEBIAN_BASE):
        return DEBIAN_BASE
    say(f"no registry for {PULLED_BASE}: making {DEBIAN_BASE} with debootstrap")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kfloop-rootfs-") as rootfs:
        run("debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", DEBIAN_SUITE, rootfs, _debian_mirror(),
            stdout=subprocess.DEVNULL)
        # This machine reaches the package index through TLS only its own CAs verify: the base trusts them too.
        for certificate in certificates:
            shutil.copy(certificate, Path(rootfs) / "usr/local/share/ca-certificates" / certificate.name)
        run("chroot", rootfs, "update-ca-certificates", stdout=subprocess.DEVNULL)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (Path(rootfs) / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        for unread in UNREAD:
            shutil.rmtree(Path(rootfs) / unread, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run(DOCKER, "import", "-", DEBIAN_BASE, stdin=tar.stdout, env=env, stdout=subprocess.DEVNULL)
        tar.wait()
    say(f"{DEBIAN_BASE} made in {time.monotonic() - started:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    run(DOCKER, "save", "-o", str(archive), DEBIAN_BASE, env=env)
    return DEBIAN_BASE


def _debian_mirror() -> str:
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in source.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def kfloop_image(env: dict[str, str], tag: str = IMAGE) -> str:
    """The kfloop image under ``tag``: loaded when its inputs are unchanged, else built and cached."""
    base = base_image(env)
    archive = CACHE / f"kfloop-{inputs_hash(IMAGE_INPUTS, base)}.tar"
    if _load_or(env, archive, tag) and _image_hash_label(env, tag) == archive.stem:
        return tag
    started = time.monotonic()
    run(DOCKER, "build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "--label",
        f"io.kfloop.inputs={archive.stem}", "-t", tag, str(ROOT), env=env, stdout=subprocess.DEVNULL)
    say(f"{tag} built on {base} in {time.monotonic() - started:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob("kfloop-*.tar"):
        stale.unlink()
    run(DOCKER, "save", "-o", str(archive), tag, env=env)
    return tag


def _image_hash_label(env: dict[str, str], tag: str) -> str:
    labels = subprocess.run([DOCKER, "image", "inspect", "--format", '{{index .Config.Labels "io.kfloop.inputs"}}', tag],
                            env=env, capture_output=True, text=True)
    return labels.stdout.strip()


def report_size(env: dict[str, str], tag: str) -> None:
    size = int(subprocess.run([DOCKER, "image", "inspect", "--format", "{{.Size}}", tag], env=env, check=True,
                              capture_output=True, text=True).stdout)
    say(f"{tag}: {size / 1e6:.0f} MB")


# --- commands ---------------------------------------------------------------------------------------


def image_command(arguments: argparse.Namespace) -> int:
    install_system_packages()
    with docker_daemon() as env:
        tag = kfloop_image(env, arguments.tag)
        report_size(env, tag)
    say(f"cached in {CACHE}; load it into another daemon with: docker load -i {CACHE}/kfloop-*.tar")
    return 0


def with_image(command: list[str]) -> int:
    """``command`` run with a private daemon holding the kfloop image (``DOCKER_HOST``, ``KFLOOP_TEST_IMAGE``)."""
    install_system_packages()
    started = time.monotonic()
    with docker_daemon() as env:
        tag = kfloop_image(env)
        report_size(env, tag)
        completed = subprocess.run(command, cwd=ROOT, env={**env, "KFLOOP_TEST_IMAGE": tag})
    say(f"{' '.join(command[:4])} ... with its daemon and image took {time.monotonic() - started:.0f} s")
    return completed.returncode


def test_command(arguments: argparse.Namespace) -> int:
    python = str(ROOT / ".venv" / "bin" / "python")
    return with_image([python, "-m", "pytest", "-p", "no:cacheprovider", "tests/containers", "-m", "containers",
                       "-n", "0", *arguments.pytest])


def run_command(arguments: argparse.Namespace) -> int:
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    return with_image(command)


def main() -> int:
    # SIGTERM (CI's end, `kill`) unwinds like Ctrl-C, so the daemon is stopped and its data root removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="build the kfloop image and print its size")
    image.add_argument("--tag", default=IMAGE)
    image.set_defaults(run=image_command)
    test = commands.add_parser("test", help="the container tests, with their own daemon")
    test.add_argument("pytest", nargs="*", help="more pytest arguments")
    test.set_defaults(run=test_command)
    run = commands.add_parser("run", help="a command with the daemon and the image (after --)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(run=run_command)
    arguments = parser.parse_args()
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
