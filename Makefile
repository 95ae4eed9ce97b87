# Every target sets itself up from a fresh clone: a virtual environment in .venv that can see the system's
# packages (so a torch already installed, e.g. a CUDA build, is kept), the CPU build torch==2.13.0 only where
# no torch is importable (a bare `torch` requirement would pull a multi-GB CUDA build here), then emor3 itself
# with every other package at the version constraints.txt pins (the versions the suite last passed with).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test test-latest check-faults check-real train instruct bench ablation clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# the suite against the newest releases of every dependency but torch, in its own .venv-latest: a release that
# breaks a test shows as a failure or a named skip here, not in a newcomer's first `make test` (torch is kept as
# installed: an eager upgrade would pull a multi-GB CUDA build)
# (constraints.txt says how to move the pins)
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv --system-site-packages .venv-latest
	.venv-latest/bin/python -c "import torch" 2>/dev/null || .venv-latest/bin/pip install --quiet torch==2.13.0
	.venv-latest/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv-latest/keep-torch.txt
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -c .venv-latest/keep-torch.txt -e '.[test]'
	.venv-latest/bin/pip list 2>/dev/null | grep -iE '^(transformers|tokenizers|peft|safetensors|numpy|pillow) '
	EMOR3_UNPINNED=1 .venv-latest/bin/python -m pytest -q

# SIGKILL at 24 seeded points spread over a checkpoint save, each resumed and compared bit for bit with an
# uninterrupted run (make test runs 2 of them)
check-faults: setup
	EMOR3_FAULT_CASES=24 $(BIN)/python -m pytest -q tests/test_safety.py -k sigkill

# the published 3B / 7B widths at 2 layers against transformers, one bf16-compute GRPO step at the 3B width
# (about 8 minutes and 13 GB on one CPU thread)
check-real: setup
	$(BIN)/python -m pytest -q -m real tests/test_real_dims.py

# a second `make train` refuses the folder of the first (runs/default): ARGS=--overwrite replaces that run,
# ARGS="--resume runs/default" continues it
train: setup
	$(BIN)/python -m emor3.grpo.train $(ARGS)

# the default run's instruct checkpoint, shipped in emor3/assets/instruct/<key> (the key hashes the initial model and
# the stage's settings, so a change to either makes the run build its own): rebuilds it there (about 25 minutes on
# one CPU thread); remove the folder it replaces
instruct: setup
	$(BIN)/python -m emor3.sft instruct --sft.instruct-cache emor3/assets/instruct --overwrite $(ARGS)

# model and sampler against transformers; one GRPO step against TRL's GRPOTrainer (TRL only in the bench extra)
bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_train.py

# the main table: zero-shot, Cold-Start SFT, GRPO, DAPO, EMO-R3 on EmoScenes over 8 seeds at the settings chosen on
# validation (benchmarks/selection_runs/selection.json), paired intervals, sign tests and the preregistered
# comparisons; writes benchmarks/RESULTS.md (long: 24 runs of 150 GRPO steps and 8 Cold-Start SFTs of 1600 steps in
# two processes of one thread each, about 48 process-minutes a seed: 3.3 hours on a 2-core CPU)
ablation: setup
	$(BIN)/python benchmarks/ablation.py --benchmarks default --seeds 0,1,2,3,4,5,6,7 \
		--selection benchmarks/selection_runs/selection.json --jobs 2

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache
