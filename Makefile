# The two commands a newcomer needs (see README): `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test install install-test

$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

install: $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e .

install-test: $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e '.[test,alibi]'

# The main job: train on the built-in data set through the kfp.local pipeline.
run: install
	$(VENV)/bin/kfloop train

test: install-test
	$(VENV)/bin/pytest
