# Regenerate the default model bundle from scratch, seeded: scenes -> features -> training ->
# export (parity checks) -> evaluation on the 1,000 held-out test images. Measured: 24 minutes on 2 CPU cores (training stops after an 18-minute budget).
PYTHON ?= .venv/bin/python
CAPTIONER ?= .venv/bin/captioner
WORK ?= work/default-model
SEED ?= 0
TRAIN_MINUTES ?= 18

.PHONY: default-model install install-serve serve test

# Everything: serving (CPU onnxruntime), training (CPU torch 2.13) and test tools.
install:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[cpu,train,test]'

# The serving side only: no torch.
install-serve:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[cpu]'

# Serve models/default on http://127.0.0.1:8000 (settings: CAPTIONER_* variables, see README).
serve: install-serve
	$(CAPTIONER) serve

# Install everything and run every test.
test: install
	$(PYTHON) -m pytest -q

default-model: install
	rm -rf $(WORK)
	$(CAPTIONER) generate-scenes $(WORK)/scenes --train 20000 --val 500 --test 1000 --seed $(SEED)
	$(CAPTIONER) train --data $(WORK)/scenes/dataset.json --images $(WORK)/scenes --out $(WORK)/run \
		--seed $(SEED) --epochs 20 --patience 3 --max-minutes $(TRAIN_MINUTES) --first-reference-share 0.5 --no-progress
	$(CAPTIONER) export --checkpoint $(WORK)/run/best.pt --data $(WORK)/scenes/dataset.json --images $(WORK)/scenes \
		--out models/default --name scenes-sat-lite0 --version 1.0.0 --no-progress
