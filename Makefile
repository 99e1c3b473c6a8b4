# Dark Halo Scope: the two set-up commands of the README are `make demo` and `make test`.
# Both create .venv (Python 3.11) on first use and install the pinned set in requirements.lock.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dhs-installed
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYTHONWARNINGS ?= ignore::UserWarning:nbdev.doclinks
PRESET ?= mock

.PHONY: demo test env export lab clean-venv

$(STAMP): setup.py settings.ini requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools<81' wheel
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name dhs --display-name 'Python (dhs)' >/dev/null
	touch $@

env: $(STAMP)

## The main job: every phase of the pipeline on the built-in mock sky, into outputs/<run-id>/.
demo: $(STAMP)
	$(BIN)/dhs run --preset $(PRESET)

## The tests: notebooks and package agree, notebook tests, then pytest.
test: $(STAMP)
	bash tools/check_nbdev.sh
	$(BIN)/nbdev_test --n_workers 2 --skip_folder_re '^(runs|[_.].*)$$' --skip_file_re '^_'
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

lab: $(STAMP)
	$(BIN)/jupyter lab nbs/

clean-venv:
	rm -rf $(VENV)
