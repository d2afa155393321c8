# `make test` and `make demo` create .venv and install the tested pins on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: venv
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")} \
	$(PYTHON) tools/demo.py

clean:
	rm -rf $(VENV) runs *.egg-info
