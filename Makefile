# LensMiner developer and user targets. Every target that needs Python depends on `install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data
# Keep Prefect's database and settings inside the checkout unless the caller chose a home.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo demo-images test lint bench clean

install: $(STAMP)

# torch is installed first with an exact pin: that release is a CPU wheel, and pyproject's range
# then keeps pip from replacing it with a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install  ## Whole chain offline on a simulated sky of 2,000 galaxies (5% lenses)
	$(VENV)/bin/lensminer demo --run-dir runs/demo

demo-images: install  ## Whole chain on the real Galaxy Zoo DECaLS cutouts, probe on the ring label
	$(VENV)/bin/lensminer demo-images --images $(SHARED_DATA)/gz-decals/images \
		--catalog $(SHARED_DATA)/gz-decals/catalog.csv --label ring --run-dir runs/gz-decals

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

# Each benchmark measures against its baseline in the same run; docs/benchmarks.md has results.
# The whole set takes about 45 minutes on 2 cores.
bench: install
	$(PY) benchmarks/bench_sky.py --n 2000
	$(PY) benchmarks/bench_download.py throughput --n 200 --latency 0.2 --concurrency 32
	$(PY) benchmarks/bench_download.py memory --counts 1000 20000 --size 32
	$(PY) benchmarks/bench_bricks.py --per-brick 300 --bricks 2 --latency 0.2
	$(PY) benchmarks/bench_augment.py --batch 64 --repeats 9
	$(PY) benchmarks/bench_pretrain.py --rows 512 --batch 32 --steps 12 --rounds 5
	$(PY) benchmarks/bench_pretrain.py --skip-throughput --gz-decals $(SHARED_DATA)/gz-decals --gz-flux
	$(PY) benchmarks/bench_embed.py --rows 4096 --memory-rows 10000 100000

clean:
	rm -rf runs .pytest_cache .ruff_cache
