# make report            the whole study (01-05) on the embedded default; prints the report's path
# make report PARAMS=params/course.yaml   the same study on the course data (GPU recommended)
# make test              the test suite CI runs (CPU, no GPU, no hub)
# make lab               JupyterLab on notebooks/
PARAMS ?= params/default.yaml
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# requirements.txt pins the CPU-tested set (torch 2.13.0); on a GPU machine keep your own torch:
	# pip install -e . uses ranges only.
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

report: venv
	$(PY) -m lib.pipeline $(PARAMS)

test: venv
	$(PY) -m pytest -q

lab: venv
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

.PHONY: venv report test lab
