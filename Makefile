.PHONY: install quickstart test lint bench

install:  ## install the package and its test tools (torch from the local wheels where present)
	python3 -m pip install "torch==2.14.1" "torchvision==0.29.1"
	python3 -m pip install -e ".[dev]"

quickstart: install  ## the main job on the embedded default: a search on digits, CPU, local Ray + MLflow
	sdd-search search_spaces/quickstart.yaml

# One pytest, two workers (--dist loadgroup): the end-to-end tests (marked slow, one group:
# tests/conftest.py) run one at a time on one worker, in order, each with its own Ray that it
# alone stops (tests/local_ray.py), timing its kills by the epochs a search logged; the fast
# ones (no Ray) run on the other worker meanwhile. `-m slow` or `-m "not slow"` runs one half.
test: install  ## the whole suite (real Ray, MLflow, Optuna, S3, tmux, Chromium; ~9 min on 2 cores)
	python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

lint:
	ruff check . && ruff format --check .

bench:  ## CPU benchmarks (ratios measured in one run each)
	for script in benchmarks/bench_*.py; do python3 $$script || exit 1; done
