# Two commands: `make test` and `make demo`. Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

install: $(STAMP)

# Reinstall only when pyproject.toml changes; torch resolves from local disk where pip is capped.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet "torch>=2.3" "torchvision>=0.18"
	$(PY) -m pip install --quiet -e '.[test]'
	# k-diffusion, the second oracle of the k-style samplers (tests/test_kdiffusion_oracle.py): its sampling module
	# and what that imports, without its training dependencies (wandb, clean-fid, an older numpy)
	$(PY) -m pip install --quiet --no-deps "k-diffusion==0.1.1.post1" "torchdiffeq==0.2.5" "torchsde==0.2.6" \
		"trampoline==0.1.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m ldm.cli demo

clean:
	rm -rf $(VENV)
