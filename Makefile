.PHONY: install quickstart test lint bench

install:  ## install the package and its test tools (torch from the local wheels where present)
	python3 -m pip install "torch==2.14.1" "torchvision==0.29.1"
	python3 -m pip install -e ".[dev]"

quickstart: install  ## the main job on the embedded default: a search on digits, CPU, local Ray + MLflow
	sdd-search search_spaces/quickstart.yaml

# The fast tests two at a time (none starts Ray), then the end-to-end ones one at a time: each
# starts its own Ray and stops only that one (tests/local_ray.py); they time their kills by the
# epochs a search logged. Two of them at once gain nothing on 2 cores (the CPU is the limit).
test: install  ## the whole suite (real Ray, MLflow, Optuna, S3, tmux, Chromium; ~14 min on 2 cores)
	python3 -m pytest -q -p no:cacheprovider -m "not slow" -n 2
	python3 -m pytest -q -p no:cacheprovider -m slow

lint:
	ruff check . && ruff format --check .

bench:  ## CPU benchmarks (ratios measured in one run each)
	for script in benchmarks/bench_*.py; do python3 $$script || exit 1; done
