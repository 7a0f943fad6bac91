# `make run`:       create .venv, install the pinned requirements, run the pipeline (dvc repro).
# `make test`:      the same environment plus the development tools, then the whole test suite (CI runs it).
# `make test-fast`: the unit tests only (no dvc, MLflow or HTTP processes): the edit loop.
# `make lint`:      ruff's checks and its formatting, as CI runs them before the tests.
VENV ?= .venv
# The interpreter that creates the venv, found before the venv goes first on PATH.
PYTHON ?= $(shell command -v python3)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test test-fast lint format venv clean

# params.yaml is checked first: DVC would expand a chain of YAML aliases in it before any stage refused it.
run: $(VENV)/.installed
	python -m imgclf.config --params params.yaml
	dvc repro

# pytest exits 5 when it collects no tests: say so, and fail.
test: $(VENV)/.dev-installed
	python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$status

test-fast: $(VENV)/.dev-installed
	python -m pytest -m "not integration"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$status

lint: $(VENV)/.dev-installed
	ruff check .
	ruff format --check .

# Rewrite the code as `make lint` wants it.
format: $(VENV)/.dev-installed
	ruff check --fix .
	ruff format .

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# The development tools, and the extras kfp (python -m imgclf.kfp), s3 (a DVC remote on S3) and server (the
# tracking server's basic-auth app) so that the tests and CI run their tests.
$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet -e ".[kfp,s3,server]"
	touch $@

clean:
	rm -rf $(VENV)
