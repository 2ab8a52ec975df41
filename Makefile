# The two commands of the README:  `make demo` (main job on the built-in default)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimtorch-installed
OUT ?= runs/demo

.PHONY: demo test env bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command so no other torch build is pulled in
	$(PY) -m pip install -q "torch==2.13.0" -e ".[test,onnx,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimtorch run recipes/digits-lsqplus-w4a4.yaml --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
