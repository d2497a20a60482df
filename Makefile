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
	$(BIN)/python -m pytest -q

# The embedded default end to end, offline, on a CPU: build DigitsDG-offline, look at it, train ERM holding out
# mnist_m, print the DomainBed table and plot accuracy against steps.
demo: install
	$(BIN)/domainfusion datasets show DigitsDG --data-dir $(DATA) --out $(DEMO_OUT)/DigitsDG.png --per-class 2
	$(BIN)/domainfusion train --dataset DigitsDG --algorithm ERM --test-envs 1 --data-dir $(DATA) \
		--steps 200 --checkpoint-freq 100 --no-eval-train-in --output-dir $(DEMO_OUT)/runs/erm --overwrite
	$(BIN)/domainfusion results $(DEMO_OUT)/runs --out $(DEMO_OUT)/results.md --plot $(DEMO_OUT)/accuracy.png
	@echo "demo outputs in $(DEMO_OUT)/: DigitsDG.png, results.md, accuracy.png, runs/"

clean-demo:
	rm -rf $(DEMO_OUT)
