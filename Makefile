# Two commands: `make lab` opens JupyterLab on the notebooks, `make test` runs every test.
# Both create .venv on first use and reinstall only when pyproject.toml changes: `make lab` installs
# flashkit with the notebooks extra only, `make test` adds the test extra to the same .venv.
PYTHON ?= python3
PORT   ?= 8888
VENV   := .venv
STUDENT ?= build/student

# BIN=/path/to/env/bin on the command line runs everything from an environment you already have, as it
# is: no .venv is created and nothing is installed (the test of `make lab` uses it).
ifeq ($(origin BIN),command line)
NOTEBOOKS_ENV :=
TEST_ENV      :=
else
BIN           := $(VENV)/bin
NOTEBOOKS_ENV := $(VENV)/.flashkit-notebooks
TEST_ENV      := $(VENV)/.flashkit-test
endif

# JupyterLab refuses to start as root without --allow-root; containers and cloud machines run as root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab lab-student test bench install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(VENV)/.flashkit-notebooks: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e ".[notebooks]"
	touch $@

$(VENV)/.flashkit-test: pyproject.toml $(VENV)/.flashkit-notebooks
	$(VENV)/bin/python -m pip install --quiet -e ".[notebooks,test]"
	touch $@

install: $(NOTEBOOKS_ENV)

# Localhost only, token kept: open the URL JupyterLab prints (with its token). The settings in jupyter/
# open it on 00_start_here.ipynb, turn off the news pop-up and save widget state with the notebook.
JUPYTER_LAB = JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter" $(BIN)/jupyter lab --no-browser $(ALLOW_ROOT) --ip=127.0.0.1 --port=$(PORT)
lab: $(NOTEBOOKS_ENV)
	$(JUPYTER_LAB) --notebook-dir=notebooks

# The student edition in the lab: `make student` first (rebuilt each time, from notebooks/exercises),
# then the same lab (localhost, token) rooted at it and opened on its file browser.
lab-student: student
	$(JUPYTER_LAB) --notebook-dir=$(STUDENT) --LabApp.default_url=/lab

# The linter first (seconds; the rule set and why: [tool.ruff] in pyproject.toml), then every test, on as
# many workers as cores (pytest-xdist, at most 4; TEST_WORKERS=1 runs them in one process). --dist loadfile
# keeps each test file, and so each notebook (its cells share one kernel), whole and in order on one worker.
TEST_WORKERS ?= auto
test: $(TEST_ENV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --maxprocesses=4 --dist loadfile

# The CPU benchmark. It unsets the OpenBLAS overrides of these machines in its own command only,
# and records the BLAS kernel in use with the results.
bench: $(NOTEBOOKS_ENV)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks.cpu_forward

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The student edition of the exercises (notebooks/exercises): solutions replaced by stubs that raise
# NotImplementedError, check cells kept, outputs cleared, written to build/student/ (ignored by git;
# STUDENT=folder writes elsewhere). `make lab-student` opens it in the lab.
.PHONY: student
student: $(NOTEBOOKS_ENV)
	$(BIN)/python tools/make_student.py --src notebooks/exercises --out $(STUDENT)

# A static site of the executed notebooks (nothing re-executed) in site/ (ignored by git): one page
# each, an index in series order, plotly figures interactive offline from one local plotly.min.js.
.PHONY: html
html: $(NOTEBOOKS_ENV)
	$(BIN)/python tools/build_site.py --out site
