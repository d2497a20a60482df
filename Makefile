# Two commands do everything on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
DEMO_OUT ?= demo_out
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
endif

.PHONY: install demo test clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=10

# The embedded default end to end, offline, on a CPU: build DigitsDG-offline and look at it, sample the embedded LDM,
# train ERM and DomainFusion holding out mnist_m with one identical budget, print the DomainBed table, plot accuracy
# against steps and keep DomainFusion's pool-refresh grids.
DEMO_STEPS ?= 200
DEMO_FLAGS = --dataset DigitsDG --test-envs 1 --data-dir $(DATA) --steps $(DEMO_STEPS) --checkpoint-freq 100 \
	--no-eval-train-in --hparams '{"batch_size": 32}' --overwrite
demo: install
	mkdir -p $(DATA)
	$(BIN)/domainfusion datasets show DigitsDG --data-dir $(DATA) --out $(DEMO_OUT)/DigitsDG.png --per-class 2
	$(BIN)/domainfusion ldm sample "a photo of the digit 0" "a photo of the digit 1" "a photo of the digit 2" \
		"a photo of the digit 3" "a photo of the digit 4" "a photo of the digit 5" "a photo of the digit 6" \
		"a photo of the digit 7" "a photo of the digit 8" "a photo of the digit 9" --n-seeds 6 --steps 25 --guidance 4 \
		--out $(DEMO_OUT)/ldm_samples.png
	$(BIN)/domainfusion train --algorithm ERM $(DEMO_FLAGS) --output-dir $(DEMO_OUT)/runs/erm
	$(BIN)/domainfusion train --algorithm DomainFusion $(DEMO_FLAGS) --output-dir $(DEMO_OUT)/runs/domainfusion
	$(BIN)/domainfusion results $(DEMO_OUT)/runs --out $(DEMO_OUT)/results.md --plot $(DEMO_OUT)/accuracy.png
	cp $(DEMO_OUT)/runs/domainfusion/pool_grids/refresh-*.png $(DEMO_OUT)/
	@echo "demo outputs in $(DEMO_OUT)/: DigitsDG.png, ldm_samples.png, results.md, accuracy.png, refresh-*.png, runs/"

clean-demo:
	rm -rf $(DEMO_OUT)
