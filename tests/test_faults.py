"""Faults, end to end on a real multi-node Ray cluster (no mocks).

One Ray cluster for the module, all on this machine: a head with 0 CPUs (the driver, this test
process, connects there) and two worker nodes with 1 CPU and one ``trainer`` resource each, each
its own raylet and worker processes. Every spec asks for ``resources.custom: {trainer: 1}``, so a
Train worker can only run on a worker node. Storage is one local folder that all nodes see, and
every test logs into one MLflow sqlite store (one experiment per test; the schema is made once).

* one search through the CLI: its trials spread over both worker nodes; one trial raises and
  ends FAILED with its one-line reason, one diverges (NaN loss) and ends stopped with its reason,
  and the search finishes the others (three tests on one search, to keep the module fast);
* killing the node under a training trial: Train restarts it on the other node from its last
  checkpoint; the time to train again and the epochs redone are measured and printed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import threading
import time
from pathlib import Path

import fault_injection
import pytest
import yaml
from conftest import TINY_SPEC, deep_update
from mlflow import MlflowClient
from test_search import store_client

pytestmark = pytest.mark.slow

TRAINER = {"trainer": 1}
# The trial with lr 0.05 raises at the start of its second epoch (tests/fault_injection.py, a
# run_trial callback every worker process of this test's Ray job installs); every other trial
# trains normally.
FAILING_LR = fault_injection.FAILING_LR
DIVERGING_LR = 1.0e6


def add_worker(cluster):
    return cluster.add_node(num_cpus=1, resources=dict(TRAINER))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Storage and the MLflow store of every test in this module."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(teacher_cache):
    import ray
    from ray.cluster_utils import Cluster

    # run_search joins the Ray this process is connected to, if any: make that the cluster.
    if ray.is_initialized():
        ray.shutdown()
    # The dashboard, as `ray start --head` has it: Ray Train's placement-group cleaner needs its
    # state API to free the placement group of a controller lost with its node; without it the
    # retried trial waits forever for the trainer resource that group still holds.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": None},
    )
    try:
        for _ in range(2):
            add_worker(cluster)
        cluster.wait_for_nodes()
        # A job-level runtime_env (Ray's public API) reaches every worker process on every node,
        # nodes added later included; run_search then joins this connection. RAY_ADDRESS in it,
        # as run_search sets it where it joins a Ray itself: Train's placement-group cleaners
        # ask this cluster, whichever Ray on the machine is newer.
        from sdd_search.ray_compat import joined_ray_runtime_env

        runtime_env = {**fault_injection.RUNTIME_ENV, **joined_ray_runtime_env(cluster.address)}
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()  # run_search connected this process to the cluster
        cluster.shutdown()


@pytest.fixture
def two_workers(cluster):
    """The module's cluster with two live worker nodes (the node-loss test removes one)."""
    while len(cluster.worker_nodes) < 2:
        add_worker(cluster)
    cluster.wait_for_nodes()
    return cluster


def write_spec(shared: Path, name: str, updates: dict, space: dict | None = None) -> Path:
    """A tiny spec (conftest's TINY_SPEC) named ``name``, placed on the trainer nodes."""
    spec = deep_update(copy.deepcopy(TINY_SPEC), updates)
    spec["name"] = name
    spec["resources"]["custom"] = dict(TRAINER)
    spec["tracking"] = {"uri": f"sqlite:///{shared}/mlflow.db", "registered_model": f"{name}-m"}
    spec["storage"] = str(shared / "runs")
    if space is not None:
        spec["space"] = space
    path = shared / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def mlflow_client(shared: Path) -> MlflowClient:
    return store_client(f"sqlite:///{shared}/mlflow.db")  # a driver may be creating it now


def search_runs(client: MlflowClient, name: str) -> tuple[object, list]:
    """(parent run or None, child runs) of the search ``name``."""
    experiment = client.get_experiment_by_name(f"sdd-search/{name}")
    if experiment is None:
        return None, []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sdd_search.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sdd_search.role") in ("trial", "reference")]
    return (parents[0] if parents else None), children


def steps(client: MlflowClient, run, metric: str = "val_top1") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


def actors(cluster, class_name: str) -> dict[str, dict]:
    """GCS's actor table (alive and dead) for one actor class: actor id -> info."""
    table = cluster.global_state.actor_table(None)
    return {k: a for k, a in table.items() if a["ActorClassName"] == class_name}


def node_names(cluster) -> dict[str, str]:
    names = {cluster.head_node.node_id: "head"}
    for i, node in enumerate(sorted(cluster.worker_nodes, key=lambda n: n.node_id)):
        names[node.node_id] = f"worker-{i}"
    return names


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search(cluster, teacher_cache, shared):
    """One search through the CLI (in this process, ``--address`` the cluster): three trials, two
    at a time. Random sampler, seed 9: lr 0.1 (the spec's point) and 0.05 (raises at epoch 2)
    together, then 1e6 (diverges) once one of them has ended."""
    from sdd_search.cli import main

    while len(cluster.worker_nodes) < 2:
        add_worker(cluster)
    cluster.wait_for_nodes()
    path = write_spec(
        shared,
        "faulty",
        {
            "resources": {"max_failures": 0},  # a deterministic error: retries would only repeat it
            "search": {
                "num_trials": 3,
                "max_concurrent": 2,
                "sampler": "random",
                "seed": 9,
                "max_failures": 0,
                "top_k": 1,
            },
        },
        space={"lr": {"choices": [0.1, FAILING_LR, DIVERGING_LR]}},
    )
    workers_before = set(actors(cluster, "RayTrainWorker"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(path), "--address", cluster.address])
    client = mlflow_client(shared)
    parent, children = search_runs(client, "faulty")
    by_lr: dict[float, list] = {}
    for run in children:
        by_lr.setdefault(float(run.data.params["knob.lr"]), []).append(run)
    out = out.getvalue()
    return {
        "code": code,
        "out": out,
        "err": err.getvalue(),
        "leaderboard": out[out.rindex("Leaderboard") :] if "Leaderboard" in out else "",
        "client": client,
        "parent": parent,
        "children": children,
        "by_lr": by_lr,
        "train_workers": {
            k: a for k, a in actors(cluster, "RayTrainWorker").items() if k not in workers_before
        },
    }


def leaderboard_rows(text: str) -> list[str]:
    """The ranked rows of the CLI's leaderboard: "   1  <trial id>  <epochs>  <top-1>% ..."."""
    return [line for line in text.splitlines() if re.match(r"\s*\d+  \S+\s+\d+\s+\S+%", line)]


def test_multi_node_search(search, cluster):
    """Every trial ran to its end on the worker nodes, both used, each one MLflow child run."""
    result = search
    assert result["code"] == 0, result["out"][-3000:] + result["err"][-3000:]
    assert result["parent"].info.status == "FINISHED"
    assert len(leaderboard_rows(result["leaderboard"])) == 3, result["leaderboard"]
    children = result["children"]
    assert len(children) == 3
    assert len({r.data.tags["sdd_search.trial_id"] for r in children}) == 3
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
    assert all(r.data.tags["sdd_search.status"] != "running" for r in children)
    # The head has no CPU: every Train worker (1 CPU + 1 trainer) ran on a worker node, one per
    # trial, and the two concurrent trials (one trainer per node) on both of them.
    nodes = [a["Address"]["NodeID"] for a in result["train_workers"].values()]
    assert len(nodes) == 3, result["train_workers"]
    assert cluster.head_node.node_id not in nodes
    assert set(nodes) == {node.node_id for node in cluster.worker_nodes}
    # Six processes per trial, not eight: no spot-preemption watcher is asked for (a local
    # search only), and no Ray Data dataset manager (no trial passes a Ray Dataset).
    assert not actors(cluster, "DatasetManager")


def test_failing_trial_is_recorded_and_search_goes_on(search):
    result = search
    assert result["code"] == 0, result["out"][-3000:] + result["err"][-3000:]
    client, by_lr = result["client"], result["by_lr"]
    assert sorted(by_lr) == [FAILING_LR, 0.1, DIVERGING_LR], by_lr

    (failed,) = by_lr[FAILING_LR]
    tags = failed.data.tags
    assert failed.info.status == "FAILED" and tags["sdd_search.status"] == "failed", tags
    reason = tags["sdd_search.reason"]
    assert "\n" not in reason and len(reason) < 1000
    assert reason.startswith("RuntimeError") and "injected failure at epoch 2" in reason, reason
    assert steps(client, failed) == [1]  # epoch 1 was trained and logged before it raised
    (row,) = [r for r in leaderboard_rows(result["leaderboard"]) if r.endswith("(error)")]
    assert re.search(r"\s1\s+\d+\.\d+%", row), row  # 1 epoch trained

    # The search went on: it ran the next trial (the NaN one, see below), finished the healthy
    # one and registered it.
    (healthy,) = by_lr[0.1]
    assert healthy.info.status == "FINISHED"
    assert healthy.data.tags["sdd_search.status"] == "completed"
    assert steps(client, healthy) == [1, 2]
    assert healthy.data.tags["sdd_search.registered_version"] == "1"
    assert "registered faulty-m v1" in result["out"]


def test_nan_trial_is_stopped_with_reason(search):
    result = search
    assert result["code"] == 0, result["out"][-3000:] + result["err"][-3000:]
    (diverged,) = result["by_lr"][DIVERGING_LR]
    tags = diverged.data.tags
    assert diverged.info.status == "FINISHED", tags
    assert tags["sdd_search.status"] == "stopped", tags
    assert re.search(r"training loss became (nan|inf) at epoch 1", tags["sdd_search.reason"]), tags
    assert steps(result["client"], diverged) == []  # no epoch finished, no metrics logged
    # Ranked last: 0 epochs trained, no accuracy, marked (nan) rather than (error).
    last = leaderboard_rows(result["leaderboard"])[-1]
    assert last.endswith("(nan)") and re.match(r"\s*3  \S+\s+0\s+nan%", last), last


# --------------------------------------------------------------------------------------------


def test_data_parallel_trial_spans_two_nodes(two_workers, teacher_cache, shared):
    """One trial, two Ray Train workers (one trainer per node): DDP over gloo across the nodes;
    the logged accuracy is that of the one model the trial saved, on the whole validation set."""
    import torch

    from sdd_search.data import build_datasets_and_loaders
    from sdd_search.search import run_search
    from sdd_search.spec import load_spec
    from sdd_search.teacher import load_model_file
    from sdd_search.train import evaluate

    cluster = two_workers
    spec = load_spec(
        write_spec(
            shared,
            "ddp",
            {
                "resources": {"workers": 2, "cpus_per_worker": 1},
                "search": {"num_trials": 1, "top_k": 1},
            },
        )
    )
    workers_before = set(actors(cluster, "RayTrainWorker"))
    outcome = run_search(spec, address=cluster.address, log=lambda *_: None)
    (row,) = outcome.leaderboard
    assert row["status"] == "done" and row["epochs"] == 2, row
    new_workers = [
        a for k, a in actors(cluster, "RayTrainWorker").items() if k not in workers_before
    ]
    assert len(new_workers) == 2
    assert {a["Address"]["NodeID"] for a in new_workers} == {
        n.node_id for n in cluster.worker_nodes
    }

    client = mlflow_client(shared)
    _, (run,) = search_runs(client, "ddp")
    assert run.data.tags["sdd_search.status"] == "completed"
    assert run.data.tags["sys.world_size"] == "2"
    model = load_model_file(outcome.best_student_path, "resnet8", 10, field="best")
    _, _, val = build_datasets_and_loaders(
        "digits", root=None, batch_size=128, device=torch.device("cpu"), image_size=8
    )
    local = evaluate(model, val, torch.device("cpu"))
    assert local["val_top1"] == pytest.approx(run.data.metrics["val_top1"], abs=1e-6)


def test_fractional_gpus_pack_two_trials_on_one_gpu(cluster, teacher_cache, shared):
    """``resources.gpus_per_worker: 0.5`` packs two trials onto one GPU: on a node with one (Ray
    logical) GPU and two CPUs, both trials' Train workers are alive at once, and each trial's
    MLflow run names that node and GPU. torch sees no CUDA here, so these trials say
    ``train.device: cpu``; a trial that leaves it at auto fails with one line, never a silent
    CPU run (the last search here)."""
    from sdd_search.search import run_search
    from sdd_search.spec import load_spec

    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        path = write_spec(
            shared,
            "packed",
            {
                "resources": {"gpus_per_worker": 0.5, "cpus_per_worker": 1},
                "search": {"num_trials": 2, "max_concurrent": 2, "top_k": 0},
                "train": {"device": "cpu"},
            },
        )
        raw = yaml.safe_load(path.read_text())
        raw["resources"]["custom"] = {}  # the GPU, not the trainer resource, places these trials
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        spec = load_spec(path)
        workers_before = set(actors(cluster, "RayTrainWorker"))
        outcome: dict = {}

        def search():
            try:
                outcome["result"] = run_search(spec, address=cluster.address, log=lambda *_: None)
            except BaseException as error:  # re-raised below
                outcome["error"] = error

        thread = threading.Thread(target=search, daemon=True)
        thread.start()
        most_at_once, deadline = 0, time.time() + 300
        while thread.is_alive() and time.time() < deadline:
            alive = [
                a
                for a in actors(cluster, "RayTrainWorker").values()
                if a["State"] == "ALIVE" and a["Address"]["NodeID"] == gpu_node.node_id
            ]
            most_at_once = max(most_at_once, len(alive))
            time.sleep(0.2)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the packed search did not finish"
        if "error" in outcome:
            raise outcome["error"]

        assert [row["status"] for row in outcome["result"].leaderboard] == ["done", "done"]
        new_workers = [
            a for k, a in actors(cluster, "RayTrainWorker").items() if k not in workers_before
        ]
        assert {a["Address"]["NodeID"] for a in new_workers} == {gpu_node.node_id}
        # One GPU, 0.5 each: both trials trained at the same time (with a whole GPU each, the
        # second trial's worker could only start once the first had ended).
        assert most_at_once == 2
        _, runs = search_runs(mlflow_client(shared), "packed")
        assert len(runs) == 2
        for run in runs:
            tags = run.data.tags
            assert tags["sdd_search.status"] == "completed", tags
            assert tags["sys.gpu_ids"] == "0" and tags["sys.cuda_visible_devices"] == "0", tags
            assert tags["sys.device"] == "cpu" and tags["sys.world_size"] == "1", tags
            assert tags["sys.node_ip"] == gpu_node.node_ip_address, tags

        # The same GPU trial with train.device auto, on a node whose torch sees no CUDA.
        raw["name"], raw["train"]["device"], raw["train"]["epochs"] = "nogpu", "auto", 1
        raw["search"] = {**raw["search"], "num_trials": 1, "max_failures": 0}
        raw["resources"]["max_failures"] = 0
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        nogpu = run_search(load_spec(path), address=cluster.address, log=lambda *_: None)
        assert [row["status"] for row in nogpu.leaderboard] == ["error"]
        _, (run,) = search_runs(mlflow_client(shared), "nogpu")
        reason = run.data.tags["sdd_search.reason"]
        assert "\n" not in reason and "resources.gpus_per_worker is 0.5 but torch" in reason, reason
        assert reason.endswith("or set train.device: cpu"), reason
    finally:
        cluster.remove_node(gpu_node)
        cluster.wait_for_nodes()


def test_node_loss_resumes_from_checkpoint(two_workers, teacher_cache, shared, capsys):
    """Kill the worker node under a training trial (its raylet and workers, not gracefully):
    the trial trains again on the other node from its last checkpoint; MLflow shows every
    epoch once."""
    from sdd_search.search import run_search
    from sdd_search.spec import load_spec

    cluster = two_workers
    epochs = 6
    spec = load_spec(
        write_spec(
            shared,
            "nodeloss",
            {"train": {"epochs": epochs}, "search": {"num_trials": 1, "top_k": 0}},
        )
    )
    client = mlflow_client(shared)
    outcome: dict = {}

    def search():
        try:
            outcome["result"] = run_search(spec, address=cluster.address, log=lambda *_: None)
        except BaseException as error:  # re-raised by the assertions below
            outcome["error"] = error

    thread = threading.Thread(target=search, daemon=True)
    thread.start()

    def history() -> list:
        _, children = search_runs(client, "nodeloss")
        return client.get_metric_history(children[0].info.run_id, "val_top1") if children else []

    # Once two epochs are logged, kill the node the trial's Train worker runs on.
    deadline = time.time() + 300
    while time.time() < deadline and len(history()) < 2:
        assert thread.is_alive(), outcome
        time.sleep(0.2)
    alive = [a for a in actors(cluster, "RayTrainWorker").values() if a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    names = node_names(cluster)
    victim_id = alive[0]["Address"]["NodeID"]
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    # The trial's Tune driver and its Train controller (on the driver's node) hold a sliver of
    # the head's own resource: losing a worker node costs a Train restart, not a Tune retry.
    drivers = {
        a["Address"]["NodeID"]
        for a in cluster.global_state.actor_table(None).values()
        if a["State"] == "ALIVE"
        and a["ActorClassName"].endswith(("ImplicitFunc", "TrainController"))
    }
    assert drivers == {cluster.head_node.node_id}, drivers
    last_before = max(m.step for m in history())
    assert 2 <= last_before < epochs
    workers_before = set(actors(cluster, "RayTrainWorker"))
    killed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)

    thread.join(timeout=400)
    assert not thread.is_alive(), "the search did not finish after the node loss"
    if "error" in outcome:
        raise outcome["error"]

    _, (run,) = search_runs(client, "nodeloss")
    assert run.info.status == "FINISHED" and run.data.tags["sdd_search.status"] == "completed"
    logged = client.get_metric_history(run.info.run_id, "val_top1")
    assert sorted(m.step for m in logged) == list(range(1, epochs + 1))  # each epoch once
    first_after = min((m for m in logged if m.timestamp / 1000 > killed_at), key=lambda m: m.step)
    resumed_from = first_after.step - 1  # the checkpoint the restarted workers loaded
    redone = last_before - resumed_from  # reported epochs trained again
    seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
    to_report = first_after.timestamp / 1000 - killed_at
    to_training = to_report - seconds[first_after.step]
    restarted_on = {
        names.get(a["Address"]["NodeID"], "?")
        for k, a in actors(cluster, "RayTrainWorker").items()
        if k not in workers_before
    }
    with capsys.disabled():
        print(
            f"\nnode loss: killed {names[victim_id]} (the Train worker's node; trial driver and "
            f"Train controller on the head) after epoch {last_before} was "
            f"reported; Train restarted on {', '.join(sorted(restarted_on)) or '?'} from the "
            f"epoch-{resumed_from} checkpoint; epochs redone: {redone}; node death -> training "
            f"again: {to_training:.1f}s, -> next epoch reported: {to_report:.1f}s"
        )
    assert restarted_on and names[victim_id] not in restarted_on
    assert resumed_from >= 2 and 0 <= redone <= 1


# --------------------------------------------------------------------------------------------


@pytest.fixture
def s3_nodes(cluster, tmp_path):
    """moto's S3 server on 127.0.0.1 and two more worker nodes that reach it as cloud nodes reach
    a bucket (credentials and AWS_ENDPOINT_URL in their environment), each with its own cache
    (SDD_SEARCH_CACHE) and one ``s3node`` resource, so only this test's workers land there."""
    from object_store import s3_server

    with s3_server() as server:
        caches = [tmp_path / f"node-{i}" for i in range(2)]
        nodes = [
            cluster.add_node(
                num_cpus=1,
                resources={"s3node": 1},
                env_vars={**server.env, "SDD_SEARCH_CACHE": str(cache)},
            )
            for cache in caches
        ]
        cluster.wait_for_nodes()
        try:
            yield server, list(zip(nodes, caches, strict=True))
        finally:
            for node in nodes:
                cluster.remove_node(node)
            cluster.wait_for_nodes()


def _tiny_image_folder(root: Path) -> Path:
    """Two classes of real 16x16 JPEGs: 4 per class in train/, 2 in val/."""
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for name, colour in (("ant", (200, 30, 30)), ("bee", (30, 200, 30))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (16, 16), colour).save(root / split / name / f"{i}.jpg")
    return root


def test_search_reads_data_and_teacher_from_s3_into_per_node_caches(
    s3_nodes, cluster, shared, tmp_path
):
    """One trial, two Train workers on two nodes, its image folder and its teacher checkpoint in
    a bucket: each node copies the folder once into its own cache (MANIFEST.json, the files), the
    driver downloads the teacher once into its cache, and the search finishes."""
    import hashlib
    import json

    import torch

    from sdd_search.models import create_model
    from sdd_search.remote import MANIFEST, copy_folder
    from sdd_search.search import run_search
    from sdd_search.spec import load_spec

    server, nodes = s3_nodes
    bucket = server.bucket("sdd-e2e")
    images = _tiny_image_folder(tmp_path / "images")
    uri = server.upload_folder(images, bucket, "images")
    buffer = io.BytesIO()
    torch.save({"model": create_model("resnet8", num_classes=2).state_dict()}, buffer)
    server.client.put_object(Bucket=bucket, Key="teachers/resnet8.pth", Body=buffer.getvalue())
    path = write_spec(
        shared,
        "s3data",
        {
            "data": {
                "dataset": "imagefolder",
                "root": uri,
                "image_size": 16,
                "num_workers": 0,
                "selection_fraction": 0.25,
            },
            "teacher": {
                "model": "resnet8",
                "source": "checkpoint",
                "checkpoint": f"s3://{bucket}/teachers/resnet8.pth",
                "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                "cache_dir": str(tmp_path / "driver"),
            },
            "train": {"epochs": 1, "batch_size": 2},
            "resources": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
            "search": {"num_trials": 1, "top_k": 0, "max_failures": 0},
        },
    )
    raw = yaml.safe_load(path.read_text())
    raw["resources"]["custom"] = {"s3node": 1}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))

    outcome = run_search(load_spec(path), address=cluster.address, log=lambda *_: None)
    (row,) = outcome.leaderboard
    assert row["status"] == "done" and row["epochs"] == 1, row

    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    for _, cache in nodes:  # each node's own copy, complete
        folder = copy_folder(uri, str(cache / "data"))
        manifest = json.loads((folder / MANIFEST).read_text())
        assert sorted(manifest["files"]) == names
        for name in names:
            assert (folder / "data" / name).read_bytes() == (images / name).read_bytes()
    downloads = server.log.downloads(bucket)
    # Every image once per node (two nodes), the teacher once (by the driver, into its cache).
    assert downloads == {**{f"images/{name}": 2 for name in names}, "teachers/resnet8.pth": 1}
    (teacher,) = (tmp_path / "driver" / "downloads").glob("*-resnet8.pth")
    assert teacher.read_bytes() == buffer.getvalue()
