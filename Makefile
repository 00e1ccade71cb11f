# The commands a newcomer needs (see README): `make run`, `make test` and `make test-containers`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test test-containers image install install-test system-deps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# setuptools announces every editable install of a package mapped from several folders
# (package-dir) with an "Editable installation" notice; it is information, not a problem.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(VENV)/bin/pip install --quiet

install: $(VENV)/bin/pip
	$(PIP_INSTALL) -e '.[demo,explain]'

install-test: $(VENV)/bin/pip system-deps
	$(PIP_INSTALL) -e '.[test,alibi]'

# Debian's Prometheus server: the autoscaling tests start one (it is never left running).
system-deps:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus >/dev/null; }

# The main job: the demo of the whole loop on the built-in data set (report in ./report).
run: install
	$(VENV)/bin/kfloop demo

test: install-test
	$(VENV)/bin/pytest

# The kfloop image (hack/containers.py: Debian's docker.io and debootstrap where missing, a private dockerd,
# the base from python:3.11-slim or debootstrap); prints its size and where the saved image is cached.
image:
	$(PYTHON) hack/containers.py image

# The container tests: the image (cached by a hash of its inputs), a real S3 server, every container
# started as KServe starts it; the daemon is stopped by its PID and its data root removed at the end.
test-containers: install-test
	$(PYTHON) hack/containers.py test
