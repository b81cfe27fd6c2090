# Every target runs the project's own virtual environment.
PY := .venv/bin/python
# `make setup` installs torch first, so pip never picks a build while resolving the rest.
# The default pin takes the local CPU wheel on the course machines in seconds and the default
# (CUDA on Linux) build from PyPI elsewhere. GPU users with their own torch: TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
# train/eval/sweep settings; anything else goes in ARGS, e.g. make train ARGS="--steps 500"
MODEL ?= Qwen/Qwen2.5-0.5B-Instruct
DATA ?= data/lotka_volterra_data.h5
RUN ?= runs/final
ADAPTER ?= $(RUN)/adapter
EVAL_OUT ?= $(RUN)/eval
ARGS ?=

.PHONY: setup browser test test-all data flops train eval baselines sweep report demo bench chat
setup:
	test -x $(PY) || python3 -m venv .venv
	if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'

# optional: Chromium for the report's browser test and README screenshot (Debian's package;
# needs apt and root). Without a browser that one test is skipped
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# the fast tier: every unit and oracle test (a few minutes on 2 CPU cores); the 10 slowest are
# listed at the end
test:
	$(PY) -m pytest -q -m "not slow"

# every test: the fast tier plus the slow end-to-end and fault-injection runs (sweeps, killed
# and resumed training, torchrun, the compiled train.py). CI runs this one
test-all:
	$(PY) -m pytest -q

# the default dataset (simulated; git-ignored). Your own file: --data PATH in train/evaluate
data:
	$(PY) data.py --out data/lotka_volterra_data.h5 --seed 0

# FLOPs per operation, per training step, and the published and fitted plans vs the 1e17 budget
flops:
	$(PY) flops.py

# LoRA fine-tuning with the published best setting (rank 8, lr 1e-4, context 768, 3000 steps);
# e.g. ARGS="--resume", ARGS="--eval-every 100 --early-stop 5", ARGS="--tensorboard".
# On CUDA the step is compiled (--compile auto). NPROC=N: N processes (GPUs) through torchrun,
# the global --batch-size split across them
NPROC ?= 1
train:
	$(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone \
		--nproc_per_node $(NPROC),$(PY)) train.py --model $(MODEL) --data $(DATA) --out $(RUN) $(ARGS)

# grammar-constrained greedy forecasts on all validation series; ADAPTER= (empty) evaluates the
# untrained model; sampled forecasts with intervals and CRPS: ARGS="--samples 20"
eval:
	$(PY) evaluate.py --model $(MODEL) --data $(DATA) $(if $(ADAPTER),--adapter $(ADAPTER)) \
		--out $(EVAL_OUT) $(ARGS)

# every baseline on the val and test splits (no language model, 0 FLOPs): runs/baselines/SPLIT/
# NAME, and runs/baselines/SPLIT/compare.md beside them; a second make baselines writes over them
baselines:
	for split in val test; do \
		for name in $$($(PY) -c "import baselines; print(*baselines.NAMES)"); do \
			$(PY) evaluate.py --baseline $$name --data $(DATA) --split $$split --force \
				--out runs/baselines/$$split/$$name $(ARGS) >/dev/null || exit 1; \
		done; \
		$(PY) evaluate.py --compare $$(ls -d runs/baselines/$$split/*/) \
			--out runs/baselines/$$split || exit 1; \
	done

# the coursework's plan: rank x lr grid, context study, final run, fitted to 98% of the budget
# (the grid shortened first; ARGS="--plan published" runs the published plan until the budget)
sweep:
	$(PY) sweep.py --model $(MODEL) --data $(DATA) $(ARGS)

# every table and figure of the coursework in one page: $(RUNS)/report/report.md and index.html
# (self-contained: images embedded). RUNS=runs/demo for the demo's runs
RUNS ?= runs
report:
	$(PY) report.py --runs $(RUNS) $(ARGS)

# talk to the model (MODEL= as for train): the Instruct chat format, the answer streamed, the
# history kept; /reset, Ctrl-D. One answer: ARGS='--prompt "hi" --greedy'
chat:
	$(PY) chat.py --model $(MODEL) $(ARGS)

# every part, offline, on a tiny random-weight model, with the baselines on the same series and
# the report at the end
demo:
	bash tools/demo.sh

# qwen-min against transformers + PEFT on this machine: training, evaluation, decoding at batch
# 1 against the memory-bandwidth bound, loading (about 17 min on 2 CPU cores; bench/results.md).
# QUICK=1: a 3-minute smoke run. ONLY=decode: the decoding rows and their bound alone (about
# 2 min; ONLY takes a comma-separated list of train,eval,decode,load,e2e). DEVICE=cuda: the GPU
# tables, eager and compiled (bench/results-gpu.md; bench/gpu.sh runs it without the venv)
ONLY ?=
bench:
	$(PY) bench/bench.py $(if $(QUICK),--quick) $(if $(DEVICE),--device $(DEVICE)) \
		$(if $(ONLY),--only $(ONLY)) $(ARGS)
