# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo

.PHONY: venv demo test check bench lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(DEMO_DATA)/train:
	$(PY) scripts/make_synthetic_dataset.py --out $(DEMO_DATA) --classes 10 --train-per-class 60 --val-per-class 20 --size 72

demo: venv $(DEMO_DATA)/train
	$(PY) train.py --config configs/demo.yaml
	$(PY) evaluate.py --config configs/demo.yaml --checkpoint runs/demo/checkpoints/best.pt \
		--crop-size 64 72 --output runs/demo/eval.json
	@echo "demo run folder: runs/demo (tensorboard --logdir runs/demo/tb)"

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2

# The developer loop: ruff and the tests that neither spawn runs nor start several processes.
check: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q -m "not slow and not dist"

bench: venv
	$(PY) scripts/benchmark.py model --model resnest50 --compare
	$(PY) scripts/benchmark.py model --model resnest50 --compare --channels-last
	$(PY) scripts/benchmark.py trainer --compare
	$(PY) -m pip install --quiet -e '.[bench]'
	test -d data/photos || $(PY) scripts/make_photo_dataset.py --out data/photos
	$(PY) scripts/benchmark.py data --root data/photos --backend dali --compare --color-jitter 0 --lighting 0
	$(PY) scripts/benchmark.py data --root data/photos --backend dali --compare
	$(PY) scripts/benchmark.py data --root data/photos --backend dali --compare --autoaugment imagenet --color-jitter 0 --lighting 0
	$(PY) scripts/benchmark.py data --root data/photos --backend dali --compare --autoaugment imagenet

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf runs/demo $(DEMO_DATA)
