"""Storage on S3: ``storage: s3://bucket/prefix`` against a real S3-compatible server (moto's
server mode on 127.0.0.1), pointed at the way a MinIO user points sdd-search at theirs:
``AWS_ENDPOINT_URL`` and credentials in the environment, ``MLFLOW_S3_ENDPOINT_URL`` for
MLflow's artifacts (``tracking.artifact_location: s3://bucket/mlflow``).

A real search is killed once its first epoch is in MLflow, its local folder deleted, and
``--resume`` run from a fresh one: everything it needs comes back from the bucket.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from object_store import s3_server
from test_search import logged_epochs, start_driver

pytestmark = pytest.mark.slow


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket="sdd", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_a_search_on_s3_resumes_from_the_bucket_in_a_fresh_folder(
    write_spec, teacher_cache, tmp_path, monkeypatch, ray_owner
):
    with s3_server() as s3:
        s3.bucket("sdd")
        env = {
            **ray_owner.env(),
            **s3.env,
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
        spec_path = write_spec(
            {
                "search": {
                    "num_trials": 2,
                    "max_concurrent": 2,
                    "references": False,
                    "top_k": 1,
                    # A database the resumed driver reaches too (as MLflow's), not ./tiny-optuna.db
                    "optuna_storage": f"sqlite:///{tmp_path}/optuna.db",
                },
                "tracking": {"artifact_location": "s3://sdd/mlflow"},
                "storage": "s3://sdd/searches",
            }
        )
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        first = tmp_path / "first"
        first.mkdir()
        driver = start_driver(spec_path, first, tmp_path / "first.log", env)
        deadline = time.time() + 400
        while time.time() < deadline and max(logged_epochs(uri), default=0) < 1:
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        # A scheduler's stop: SIGTERM, and again before the clean stop is done (the second
        # exits at once, 143, one line; nothing registered; still resumable from the bucket).
        driver.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        stopped = time.time()
        assert driver.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() - stopped < 60, time.time() - stopped
        ray_owner.stop()
        first_log = (tmp_path / "first.log").read_text()
        (line,) = [t for t in first_log.splitlines() if t.startswith("sdd-search: interrupted")]
        assert line.startswith("sdd-search: interrupted (SIGTERM); nothing registered; ")
        assert line.endswith(f"continue with: sdd-search {spec_path} --resume"), line
        assert client.search_model_versions("name='tiny-student'") == []
        (parent,) = client.search_runs(
            [client.get_experiment_by_name("sdd-search/tiny").experiment_id],
            "tags.`sdd_search.role` = 'parent'",
        )
        assert parent.data.tags["sdd_search.outcome"] == "interrupted", parent.data.tags
        logged = logged_epochs(uri)
        assert logged and min(logged) < 2, logged  # killed mid-search

        # Checkpoints and Tune's state are in the bucket, not on this machine.
        keys = _keys(s3, "searches/tiny/")
        assert any(k.startswith("searches/tiny/train/tiny-") for k in keys), keys
        assert any(k.endswith("/checkpoint.pt") for k in keys), keys
        assert any(k.startswith("searches/tiny/search/experiment_state-") for k in keys), keys
        shutil.rmtree(first)

        fresh = tmp_path / "fresh"
        fresh.mkdir()

        def resume(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "sdd_search", str(spec_path), "--resume", *args],
                cwd=fresh,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )

        # Without a study the resume cannot go on: one line, before Ray, saying what to do.
        for storage, expected in [
            ("null", "a search on object storage keeps its study where it started"),
            (f"sqlite:///{fresh}/elsewhere.db", "restore that database"),
        ]:
            refused = resume(f"--set=search.optuna_storage={storage}")
            assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
            (line,) = refused.stderr.strip().splitlines()
            assert line.startswith("sdd-search: error: --resume: the search's Optuna study is ")
            assert expected in line, line
        assert not list(fresh.iterdir())  # neither study file was created
        resumed = resume()
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "registered tiny-student v1" in resumed.stdout

        experiment = client.get_experiment_by_name("sdd-search/tiny")
        runs = client.search_runs([experiment.experiment_id], "tags.`sdd_search.role` = 'trial'")
        assert len(runs) == 2
        for run in runs:
            assert run.data.tags["sdd_search.status"] == "completed"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
            assert steps == [1, 2]  # every epoch once, across the kill
        # MLflow's artifacts went to the same server: the parent's spec and the model.
        assert experiment.artifact_location == "s3://sdd/mlflow"
        artifacts = _keys(s3, "mlflow/")
        assert any(k.endswith("/artifacts/spec.yaml") for k in artifacts), artifacts
        assert any(k.endswith("/MLmodel") for k in artifacts), artifacts
        # The champion loads back from the registry, its weights read from the bucket.
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        model = mlflow.pytorch.load_model("models:/tiny-student@champion")
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
        # Nothing of the search was written to the folder the resume ran in.
        assert not any(fresh.rglob("checkpoint*")), sorted(fresh.rglob("*"))
