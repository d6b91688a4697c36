"""Registering a student in a real MLflow sqlite registry: MLflow's own notices stay hidden."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdd_search.models import create_model
from sdd_search.tracking import SearchTracker


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_registering_prints_no_mlflow_notice_unless_verbose(tmp_path, capfd, level):
    mlflow_logger = logging.getLogger("mlflow")
    previous = mlflow_logger.level
    mlflow_logger.setLevel(level)  # WARNING: `sdd-search`; INFO: `sdd-search -v`
    try:
        tracker = SearchTracker(f"sqlite:///{tmp_path}/mlflow.db", "sdd-search/t", "/runs/t")
        tracker.start_parent("t", {}, "name: t\n", "plan")
        run = tracker.client.create_run(tracker.experiment_id, run_name="finalist-1-seed0")
        model = create_model("resnet8", num_classes=10)
        example = np.zeros((2, 3, 8, 8), dtype=np.float32)
        capfd.readouterr()
        versions = [
            tracker.register_student(run.info.run_id, model, example, "t-student") for _ in "ab"
        ]
        err = capfd.readouterr().err
    finally:
        mlflow_logger.setLevel(previous)
    assert versions == ["1", "2"]
    notices = ("Successfully registered model", "Created version", "already exists")
    if level == logging.WARNING:
        assert not [n for n in notices if n in err], err
    else:
        assert "Successfully registered model 't-student'" in err
