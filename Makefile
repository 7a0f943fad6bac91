# `make run`: create .venv, install the pinned requirements, run the pipeline (dvc repro).
# `make test`: the same environment, then the test suite (this is what .ci/run calls).
VENV ?= .venv
# The interpreter that creates the venv, found before the venv goes first on PATH.
PYTHON ?= $(shell command -v python3)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test venv clean

run: $(VENV)/.installed
	dvc repro

# pytest exits 5 when it collects no tests: say so, and fail.
test: $(VENV)/.installed
	python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$status

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV)
