# `make default-model FLICKR8K=<folder>` regenerates models/default from Flickr8k in its authors'
# text format (Flickr8k.token.txt, the three split lists, the images; README: "The default model"),
# seeded: features -> training (chosen on validation CIDEr) -> a draft export -> decoding settings
# chosen on validation -> the final export (parity checks, then the one evaluation on the test split)
# -> the confidence calibration fitted on validation (docs/confidence.md).
PYTHON ?= .venv/bin/python
CAPTIONER ?= .venv/bin/captioner
WORK ?= work/default-model
SEED ?= 0
FLICKR8K ?=
# The default model's recipe (docs/model-card.md says how each choice was made, with its numbers):
# cross-entropy for XE_EPOCHS epochs, then self-critical CIDEr-D training from its best checkpoint.
XE_EPOCHS ?= 6
SCST_EPOCHS ?= 20
TRAIN_THREADS ?= 2
DATA_AND_SIZES = --format flickr8k --data $(FLICKR8K) --min-count 5 --val-count 0 --flip-augment 0.5 \
	--embed-dim 512 --hidden-dim 512 --attention-dim 512 --dropout 0.5 --seed $(SEED) --threads $(TRAIN_THREADS) \
	--cache $(WORK)/cache --no-progress
XE_RECIPE = --all-references --label-smoothing 0.1 --lr 5e-4 --lr-decay 0.9 --epochs $(XE_EPOCHS) --patience 3
SCST_RECIPE = --self-critical --init-checkpoint $(WORK)/xe/best.pt --sample-temperature 0.5 --lr 2e-5 --lr-decay 1.0 \
	--epochs $(SCST_EPOCHS) --patience 3 --label-smoothing 0.1
# 3.0.0: the label-prior decoder (docs/model-card.md, "The label prior"), started from the 2.0.0 model above:
# cross-entropy with label swaps, then self-critical training again.
PRIOR_INIT ?= $(WORK)/run/best.pt
PRIOR_XE_RECIPE = --all-references --label-smoothing 0.1 --label-prior --label-swap 0.3 --init-checkpoint $(PRIOR_INIT) \
	--lr 2e-4 --lr-decay 0.8 --epochs 2 --patience 2
PRIOR_SCST_RECIPE = --self-critical --label-prior --init-checkpoint $(WORK)/prior-xe/best.pt --sample-temperature 0.5 \
	--lr 2e-5 --lr-decay 1.0 --epochs $(PRIOR_SCST_EPOCHS) --patience 3 --label-smoothing 0.1
PRIOR_SCST_EPOCHS ?= 8
NAME ?= flickr8k-sat-lite0
VERSION ?= 3.0.0

.PHONY: default-model scenes-model install install-serve serve test test-fast lint node-client policy-tools kserve-client

# Everything: serving (CPU onnxruntime), training (CPU torch 2.13), Ray Data for bulk runs, test tools.
install:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[cpu,train,ray,test]'

# The serving side only: no torch.
install-serve:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[cpu]'

# Serve models/default on http://127.0.0.1:8000 (settings: CAPTIONER_* variables, see README).
serve: install-serve
	$(CAPTIONER) serve

# Install everything and run every test: the three tiers (unit, service, system; tests/conftest.py) on
# PYTEST_WORKERS pytest-xdist workers, each module whole on one worker (--dist loadgroup).
PYTEST_WORKERS ?= 2
test: install node-client policy-tools kserve-client
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

# The unit tier only (no subprocess, no server): the check to run while you work. Installs first on a
# fresh clone; says how long it took.
test-fast:
	@test -x .venv/bin/pytest -a -x .venv/bin/captioner || $(MAKE) install
	@start=$$(date +%s); $(PYTHON) -m pytest -q -m unit -n $(PYTEST_WORKERS) --dist loadgroup --durations=5; \
	status=$$?; echo "make test-fast: the unit tier took $$(( $$(date +%s) - start )) s"; exit $$status

# checkov, the policy scanner of tests/test_kubernetes.py, in a virtualenv of its own (.checkov/): its
# pins would downgrade packaging, networkx and python-dateutil in .venv.
policy-tools:
	test -x .checkov/bin/checkov || { python3 -m venv .checkov && .checkov/bin/pip install -q checkov==3.3.30; }

# The kserve SDK, whose REST client tests/test_open_inference.py runs against the /v2 routes, in a virtualenv of
# its own (.kserve/): its pins would downgrade protobuf, pandas and python-dateutil in .venv (docs/deploy.md).
kserve-client:
	test -x .kserve/bin/python || { python3 -m venv .kserve && .kserve/bin/pip install -q kserve==0.21.0; }

# The TypeScript client's pinned generator and compiler (tests/test_typescript_client.py; Node >= 20.19).
node-client:
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix clients/typescript --no-audit --no-fund --silent; \
	else echo "npm not found: tests/test_typescript_client.py will skip (docs/typescript-client.md)"; fi

# ruff (pyflakes, pycodestyle, import order, pyupgrade) on the whole project; mypy on the serving side.
# Settings: pyproject.toml. `.venv/bin/ruff check --fix .` applies the mechanical fixes.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

default-model: install
	@test -n "$(FLICKR8K)" || { echo "usage: make default-model FLICKR8K=<folder with Flickr8k.token.txt, the split lists and the images>"; exit 2; }
	rm -rf $(WORK)
	$(CAPTIONER) train $(DATA_AND_SIZES) $(XE_RECIPE) --out $(WORK)/xe
	$(CAPTIONER) train $(DATA_AND_SIZES) $(SCST_RECIPE) --out $(WORK)/run
	$(CAPTIONER) train $(DATA_AND_SIZES) $(PRIOR_XE_RECIPE) --out $(WORK)/prior-xe
	$(CAPTIONER) train $(DATA_AND_SIZES) $(PRIOR_SCST_RECIPE) --out $(WORK)/prior-run
	$(CAPTIONER) export --checkpoint $(WORK)/prior-run/best.pt --format flickr8k --data $(FLICKR8K) --out $(WORK)/draft \
		--parity-split val --evaluate-split '' --no-progress
	$(CAPTIONER) tune-decoding --bundle $(WORK)/draft --format flickr8k --data $(FLICKR8K) --split val \
		--out $(WORK)/decoding.json --no-progress
	$(CAPTIONER) export --checkpoint $(WORK)/prior-run/best.pt --format flickr8k --data $(FLICKR8K) --out models/default \
		--name $(NAME) --version $(VERSION) --decoding $(WORK)/decoding.json --parity-split val --no-progress
	$(CAPTIONER) confidence --bundle models/default --format flickr8k --data $(FLICKR8K) --split val --write \
		--out $(WORK)/confidence.json --no-progress

# The scene model (the default until 2.0; a copy lives in tests/fixtures/scenes-sat-lite0), from
# generated data: no download needed.
scenes-model: install
	rm -rf $(WORK)-scenes
	$(CAPTIONER) generate-scenes $(WORK)-scenes/scenes --train 20000 --val 500 --test 1000 --seed $(SEED)
	$(CAPTIONER) train --data $(WORK)-scenes/scenes/dataset.json --images $(WORK)-scenes/scenes --out $(WORK)-scenes/run \
		--seed $(SEED) --epochs 20 --patience 3 --max-minutes 18 --first-reference-share 0.5 --no-progress
	$(CAPTIONER) export --checkpoint $(WORK)-scenes/run/best.pt --data $(WORK)-scenes/scenes/dataset.json \
		--images $(WORK)-scenes/scenes --out $(WORK)-scenes/bundle --name scenes-sat-lite0 --version 1.1.0 --no-progress
