"""Faults, end to end on a real multi-node Ray cluster (no mocks).

One Ray cluster per module, all on this machine: a head with 0 CPUs (the driver connects there
and only the Tune/Train bookkeeping may run on it) and two worker nodes with 1 CPU and one
`trainer` resource each, as separate raylet processes. Specs ask for `resources.custom:
{trainer: 1}`, so every Train worker must land on a worker node. Storage is a local folder all
nodes see; every test logs into one MLflow sqlite store (one experiment per test).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TRAINER = {"trainer": 1}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One folder (storage + MLflow store) for the whole module: MLflow's schema is made once."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(teacher_cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources=dict(TRAINER))
    cluster.wait_for_nodes()
    yield cluster
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def two_workers(cluster):
    """The module's cluster with two live worker nodes (a test may have removed one)."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1, resources=dict(TRAINER))
    cluster.wait_for_nodes()
    return cluster


def make_spec(write_spec, shared: Path, name: str, updates: dict):
    from sdd_search.spec import load_spec

    base = {
        "name": name,
        "resources": {"custom": dict(TRAINER)},
        "tracking": {"uri": f"sqlite:///{shared}/mlflow.db", "registered_model": f"{name}-student"},
        "storage": str(shared / "runs"),
    }
    from conftest import deep_update

    path = write_spec(deep_update(base, updates), name=f"{name}.yaml")
    return load_spec(path)


def mlflow_client(shared: Path) -> MlflowClient:
    uri = f"sqlite:///{shared}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def child_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("sdd_search.role") in ("trial", "reference")]


def actors(cluster, class_name: str) -> list[dict]:
    table = cluster.global_state.actor_table(None)
    return [a for a in table.values() if a["ActorClassName"] == class_name]


def node_of(cluster, node_id: str):
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    return None


def test_node_loss_resumes_from_checkpoint(two_workers, write_spec, shared):
    """Kill the worker node under a training trial: Train restarts it on the other node from
    its last checkpoint, and MLflow still shows every epoch once."""
    from sdd_search.search import run_search

    cluster = two_workers
    epochs = 8
    spec = make_spec(
        write_spec,
        shared,
        "nodeloss",
        {
            "train": {"epochs": epochs},
            "search": {"num_trials": 1, "max_concurrent": 1, "top_k": 0},
        },
    )
    client = mlflow_client(shared)
    outcome: dict = {}

    def search():
        try:
            outcome["result"] = run_search(spec, address=cluster.address, log=lambda *_: None)
        except BaseException as error:  # surfaced by the assertions below
            outcome["error"] = error

    thread = threading.Thread(target=search, daemon=True)
    thread.start()

    def logged_steps() -> list:
        runs = child_runs(client, spec.experiment_name)
        if not runs:
            return []
        return client.get_metric_history(runs[0].info.run_id, "val_top1")

    # Wait for >= 2 reported epochs, then kill the node the Train worker runs on.
    deadline = time.time() + 240
    while time.time() < deadline and len(logged_steps()) < 2:
        assert thread.is_alive(), outcome
        time.sleep(0.2)
    before = logged_steps()
    assert 2 <= len(before) < epochs, [m.step for m in before]
    alive = [a for a in actors(cluster, "RayTrainWorker") if a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    victim = node_of(cluster, alive[0]["Address"]["NodeID"])
    assert victim is not None, "the Train worker is not on a worker node"
    drivers = {a["ActorClassName"]: a["Address"]["NodeID"] for a in actors(cluster, "ImplicitFunc")}
    print(f"trial driver on {drivers}, train worker on {victim.node_id}")
    last_before = max(m.step for m in logged_steps())
    killed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)

    thread.join(timeout=300)
    assert not thread.is_alive(), "search did not finish after the node loss"
    assert "error" not in outcome, outcome["error"]

    history = logged_steps()
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, epochs + 1)), steps  # every epoch exactly once
    after = sorted((m for m in history if m.timestamp / 1000 > killed_at), key=lambda m: m.step)
    first_after = after[0]
    resumed_from = first_after.step - 1
    redone = last_before - resumed_from
    epoch_seconds = {
        m.step: m.value for m in client.get_metric_history(child_runs(client, spec.experiment_name)[0].info.run_id, "epoch_seconds")
    }
    to_report = first_after.timestamp / 1000 - killed_at
    to_training = to_report - epoch_seconds.get(first_after.step, 0.0)
    print(
        f"\nNODE LOSS: killed after epoch {last_before} reported; resumed from checkpoint epoch "
        f"{resumed_from}; epochs redone: {redone}; node death -> next epoch reported: "
        f"{to_report:.1f}s (-> training again: {to_training:.1f}s)"
    )
    assert resumed_from >= 2 and redone <= 1
    run = child_runs(client, spec.experiment_name)[0]
    assert run.info.status == "FINISHED" and run.data.tags["sdd_search.status"] == "completed"
    workers = actors(cluster, "RayTrainWorker")
    survivor_nodes = {a["Address"]["NodeID"] for a in workers} - {victim.node_id}
    assert survivor_nodes, workers
