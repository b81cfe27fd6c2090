# Every target runs the project's own virtual environment.
PY := .venv/bin/python
# `make setup` installs torch first, so pip never picks a build while resolving the rest.
# The default pin takes the local CPU wheel on the course machines in seconds and the default
# (CUDA on Linux) build from PyPI elsewhere. GPU users with their own torch: TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test data flops
setup:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'

test:
	$(PY) -m pytest -q

# the default dataset (simulated; git-ignored). Your own file: --data PATH in train/evaluate
data:
	$(PY) data.py --out data/lotka_volterra_data.h5 --seed 0

# FLOPs per operation, per training step and for the experiment plan vs the 1e17 budget
flops:
	$(PY) flops.py
