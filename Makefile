# Two commands: `make lab` opens JupyterLab on the notebooks, `make test` runs every test.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flashkit-installed
PORT   ?= 8888
EXTRAS ?= notebooks,test

.PHONY: lab test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Localhost only, token kept: open the URL JupyterLab prints (with its token). The settings in jupyter/
# open it on 00_start_here.ipynb, turn off the news pop-up and save widget state with the notebook.
lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter" $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) --notebook-dir=notebooks

# The linter first (seconds; the rule set and why: [tool.ruff] in pyproject.toml), then every test.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=10

# The CPU benchmark. It unsets the OpenBLAS overrides of these machines in its own command only,
# and records the BLAS kernel in use with the results.
bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks.cpu_forward

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The student edition of the exercises (notebooks/exercises): solutions replaced by stubs that raise
# NotImplementedError, check cells kept, outputs cleared, written to build/student/ (ignored by git).
.PHONY: student
student: $(STAMP)
	$(BIN)/python tools/make_student.py --src notebooks/exercises --out build/student

# A static site of the executed notebooks (nothing re-executed) in site/ (ignored by git): one page
# each, an index in series order, plotly figures interactive offline from one local plotly.min.js.
.PHONY: html
html: $(STAMP)
	$(BIN)/python tools/build_site.py --out site
