"""Shared fixtures: tiny but real specs (digits at 8 px, resnet8s, two epochs)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from local_ray import RayOwner

TINY_SPEC: dict = {
    "name": "tiny",
    "data": {"dataset": "digits", "image_size": 8},
    "teacher": {
        "model": "resnet8",
        "source": "train",
        "train": {
            "epochs": 2,
            "batch_size": 128,
            "lr": 0.1,
            "schedule": "cosine",
            "num_threads": 1,
        },
    },
    "student": {"model": "resnet8"},
    "distill": {"base": "kd", "scales": [1, 2], "temperature": 4.0},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "num_threads": 1},
    "resources": {"workers": 1, "cpus_per_worker": 1},
    "search": {
        "num_trials": 3,
        "max_concurrent": 2,
        "scheduler": "none",
        "top_k": 2,
        "references": False,
    },
    "space": {
        "scales": {"choices": [[1], [1, 2]]},
        "temperature": {"low": 1.0, "high": 8.0},
        "complementary_weight": {"low": 1.0, "high": 4.0},
    },
    "tracking": {"uri": "sqlite:///mlflow.db", "registered_model": "tiny-student"},
    "storage": "./runs",
}


# `make test` (pytest -n 2 --dist loadgroup): the end-to-end tests (marked slow) in two groups
# of about equal time, one per worker, each group's tests one at a time and in order; the fast
# tests (no Ray) fill in as a group runs out. Each end-to-end test starts and stops only its
# own Ray (tests/local_ray.py); a search's workers ask their own Ray, never the newest on the
# machine (sdd_search/ray_compat.py), so two at once do not disturb each other.
END_TO_END_GROUPS = {
    "test_faults.py": "end-to-end-1",  # the multi-node cluster, ~3.5 min
    "test_mlflow_ui.py": "end-to-end-1",
    "test_local_ray.py": "end-to-end-1",
    "test_search.py": "end-to-end-2",  # the final stage, ~2.5 min
    "test_live_view.py": "end-to-end-2",
    "test_s3_storage.py": "end-to-end-2",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow"):
            group = END_TO_END_GROUPS.get(item.path.name, "end-to-end-1")
            item.add_marker(pytest.mark.xdist_group(group))


def deep_update(tree: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec(**section_updates) -> path of a tiny spec in tmp_path (paths inside tmp_path)."""

    def write(updates: dict | None = None, name: str = "spec.yaml") -> Path:
        spec = deep_update(copy.deepcopy(TINY_SPEC), updates or {})
        spec["tracking"]["uri"] = spec["tracking"]["uri"].replace(
            "sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db"
        )
        if spec["storage"] == "./runs":
            spec["storage"] = str(tmp_path / "runs")
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """One teacher cache for the whole session: the tiny teacher is trained once."""
    path = tmp_path_factory.mktemp("teacher-cache")
    os.environ["SDD_SEARCH_CACHE"] = str(path)
    return path


@pytest.fixture
def ray_owner():
    """A token for the environment of the drivers this test starts (``ray_owner.env()``); at
    teardown, whatever Ray processes they left are stopped, and no other test's."""
    owner = RayOwner()
    yield owner
    owner.stop()
