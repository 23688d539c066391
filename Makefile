# Two commands set up everything on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/tiny.yaml
STAMP  := $(VENV)/.installed

STANDIN := runs/standin/assets

.PHONY: setup reproduce standin test test-slow lab lint sync-notebooks clean-runs bench

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

setup: $(STAMP)  ## create .venv from the exact pins in requirements.txt

reproduce: $(STAMP)  ## run every notebook on the embedded default (PARAMS=... for another profile)
	$(VENV)/bin/nlsr reproduce --params $(PARAMS)

standin: $(STAMP)  ## the paper's profile on real-format stand-ins (random weights, CPU, no download; needs ../shared/data)
	test -f $(STANDIN)/standin.json || $(VENV)/bin/nlsr standin build $(STANDIN)
	$(VENV)/bin/nlsr reproduce --params params/standin.yaml

test: $(STAMP)  ## unit, property and notebook smoke tests (≤ 15 min on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

test-slow: $(STAMP)  ## the science on params/tiny.yaml, from scratch (CI runs it after `make test`)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

lab: $(STAMP)  ## open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)  ## notebooks carry no outputs and match their py:percent twins
	$(PY) -m pytest -q -p no:cacheprovider tests/test_notebooks_clean.py

sync-notebooks: $(STAMP)  ## regenerate each .ipynb from its py:percent twin (outputs stripped)
	$(VENV)/bin/jupytext --update --to ipynb --update-metadata '{"jupytext": {"formats": "ipynb,py:percent"}}' notebooks/*.py

bench: $(STAMP)  ## install the `bench` extra (mergekit, --no-deps: the pins stay) and run every benchmark
	$(PY) -m pip install -q --no-deps mergekit==0.1.5 immutables==0.21
	$(VENV)/bin/nlsr bench all

clean-runs:  ## delete the stage cache of every profile
	rm -rf runs/
