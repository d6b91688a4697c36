"""What runs on the cluster for one trial: the Tune trial driver and the Ray Train worker.

Every trial starts fresh Ray processes (Tune's trial actor, Train's controller, one per worker),
and each one imports the module that defines the function it runs. This module therefore
imports only what those processes need: no MLflow, no Tune search algorithms, no spec
loading; torch is imported inside the worker. See :mod:`sdd_search.search` for the driver side.

Each worker also reports wall-clock timestamps of its start-up phases with its first epoch, so
the search can say where a trial's time outside the training loop goes
(:data:`sdd_search.overhead.PHASES`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdd_search.config import TrialConfig
from sdd_search.ray_compat import trainer_class
from sdd_search.space import config_of

_log = logging.getLogger(__name__)

TIMING_PREFIX = "timing/"  # result keys holding start-up timestamps (not logged as metrics)
# The result key (and the run's tag below) saying, in one line, how a restart found its
# checkpoints when the latest one was unreadable.
RESTORE_KEY = "worker/restore"
# Result keys with facts about where rank 0 trains (strings, sent with its first epoch), and the
# MLflow tags they become: the trial's Tune actor (and so Tune's own node_ip) is on the head.
WORKER_FACTS = {
    "worker/node_ip": "sys.node_ip",
    "worker/hostname": "sys.hostname",
    "worker/device": "sys.device",
    "worker/gpu_name": "sys.gpu_name",
    "worker/gpu_ids": "sys.gpu_ids",
    "worker/cuda_visible_devices": "sys.cuda_visible_devices",
    RESTORE_KEY: "sdd_search.restore",
}

# --------------------------------------------------------------------------------------------
# The Ray Train worker


def teacher_from_state(trial: TrialConfig, state: dict, num_classes: int):
    """The frozen teacher network from the numpy weights the driver put in the object store."""
    import torch

    from sdd_search.models import create_model

    teacher = create_model(trial.teacher.model, num_classes=num_classes)
    teacher.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _process_start_time() -> float:
    """Wall-clock time this process was created (NaN where that cannot be told)."""
    try:
        import psutil  # Ray puts its vendored copy on sys.path in its worker processes

        return float(psutil.Process().create_time())
    except Exception:
        pass
    try:  # Linux without psutil: start time in clock ticks after boot, plus the boot time
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        return math.nan


def _assigned_device():
    """The GPU Ray assigned this worker (``ray.train.torch.get_device()``), or None without one
    (run_trial then falls back to ``LOCAL_RANK`` among the visible GPUs)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from ray.train.torch import get_device

    try:
        return get_device()
    except (RuntimeError, ValueError):  # no GPU id for this worker, or none visible to it
        return None


def require_gpu(gpus_per_worker: float) -> None:
    """A trial that asked Ray for a GPU trains on one: where torch sees none (a torch built for a
    newer CUDA than the node's driver, no driver, no visible device), one line saying why, never
    a silent run on the CPU. ``train.device: cpu`` opts out (the caller skips this check)."""
    import socket

    import torch

    if torch.cuda.is_available():
        return
    try:
        torch.cuda.init()
        reason = "no CUDA device visible to this process"
    except Exception as error:  # torch's own words: "driver too old", "no NVIDIA driver" ...
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
    raise RuntimeError(
        f"resources.gpus_per_worker is {gpus_per_worker:g} but torch {torch.__version__} (CUDA "
        f"{torch.version.cuda or 'none'}) sees no usable GPU on {socket.gethostname()}: {reason}; "
        "install a torch build the node's NVIDIA driver supports (clusters/README.md) or set "
        "train.device: cpu"
    )


def _worker_facts(device) -> dict[str, str]:
    """Where this worker trains: node, host, device, and the GPU ids Ray gave it (a fractional
    GPU shows as the same id in every trial packed on it)."""
    import socket

    import ray
    import torch

    facts = {
        "worker/node_ip": ray.util.get_node_ip_address(),
        "worker/hostname": socket.gethostname(),
        "worker/device": str(device),
        "worker/gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids()),
        "worker/cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    if device.type == "cuda":
        facts["worker/gpu_name"] = torch.cuda.get_device_name(device)
    return facts


class _Reporter:
    """run_trial's ``report``: sends each epoch's metrics (and checkpoint) to Ray Train.

    ``timing``: start-up timestamps and where this worker trains, sent once with the first
    epoch this process trains; later epochs carry the mean seconds a report took so far.
    """

    def __init__(self, timing: dict[str, Any]):
        self.timing = timing
        self.seconds, self.epochs = 0.0, 0  # time spent in report(): checkpoint + send

    def __call__(self, metrics: dict, write_checkpoint) -> None:
        import ray.train
        from ray.train import Checkpoint

        started = time.time()
        if self.timing:
            # The loop started one epoch (train + evaluation) before its first report.
            self.timing[f"{TIMING_PREFIX}loop_started"] = started - metrics["epoch_seconds"]
            metrics = {**metrics, **self.timing}
            self.timing = {}
        if self.epochs:
            metrics[f"{TIMING_PREFIX}report_seconds_per_epoch"] = self.seconds / self.epochs
        if write_checkpoint is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(Path(tmp))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        self.seconds += time.time() - started
        self.epochs += 1


def _replay(checkpoint, history: list[dict], note: str | None = None) -> None:
    """Report again the epochs ``checkpoint`` (Train's) holds, its metrics rows ``history``
    (the first one with ``note``, how the restart found its checkpoint, when there is one).

    A driver killed between Train saving a checkpoint and Tune recording its result would
    otherwise lose those epochs (or, for a finished trial, every result). The MLflow callback
    drops epochs it has. The last replayed epoch names the checkpoint again (rank 0), so that a
    trial whose last result is a replay (ASHA can stop it there) still has a student to register.
    """
    import ray.train

    rank0 = ray.train.get_context().get_world_rank() == 0
    for number, row in enumerate(history, start=1):
        again = checkpoint if rank0 and number == len(history) else None
        told = {RESTORE_KEY: note} if note and number == 1 else {}
        ray.train.report({**row, "replayed": 1.0, **told}, checkpoint=again)


def _newest_first(latest):
    """``latest`` (Train's checkpoint of this run), then, asked only if it is needed, the older
    ones Train still keeps (``CheckpointConfig(num_to_keep=2)``: the one before), newest first."""
    import ray.train

    yield latest
    try:
        reported = ray.train.get_all_reported_checkpoints(timeout_s=60)
    except Exception as error:  # an alpha API: without it the trial restarts from epoch 1
        _log.warning("sdd-search: Train's earlier checkpoints unknown (%s)", error)
        return
    yield from [r.checkpoint for r in reported if r.checkpoint.path != latest.path][::-1]


def _restore_point(latest, stack: contextlib.ExitStack):
    """(checkpoint, its file, its metrics rows, a one-line note) of the newest of this trial's
    checkpoints that loads, from ``latest`` (Train's) back; (None, None, [], note) when none
    does: the trial starts again from epoch 1. The note is None when the latest loads, else
    it says which were unreadable, why, and where the trial goes on from.

    An older checkpoint is resumed from a copy (in ``stack``'s temporary folder): the replay
    reports it again, and Train then deletes the original, the oldest of three it holds.
    """
    from sdd_search.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

    problems: list[str] = []
    for checkpoint in _newest_first(latest):
        name, path = Path(checkpoint.path).name, None
        try:
            path = Path(stack.enter_context(checkpoint.as_directory())) / CHECKPOINT_FILE
            state = load_checkpoint(path)
        except (CheckpointError, OSError) as error:
            reason = str(error).removeprefix(f"{path}: ") if path else str(error)
            problems.append(f"{name} was unreadable ({reason})")
            continue
        if not problems:
            return checkpoint, path, list(state["history"]), None
        copy = Path(stack.enter_context(tempfile.TemporaryDirectory())) / CHECKPOINT_FILE
        shutil.copyfile(path, copy)
        note = f"{'; '.join(problems)}; resumed from {name}, epoch {int(state['epoch'])}"
        return checkpoint, copy, list(state["history"]), note
    return None, None, [], f"{'; '.join(problems)}; restarted the trial from epoch 1"


def train_worker(loop_config: dict) -> None:
    """Ray Train worker: plain run_trial with a report callback; resumes from Train's checkpoint."""
    import ray
    import ray.train

    from sdd_search.train import NonFiniteLossError, resolve_device, run_trial

    imported = time.time()

    trial = TrialConfig.model_validate(loop_config["trial"])
    teacher = None
    if trial.distill.method == "sdd":
        state = ray.get(loop_config["teacher"]["ref"])
        teacher = teacher_from_state(trial, state, loop_config["num_classes"])

    # The device run_trial will train on (Ray's GPU for this worker, if it has one), so the
    # reported facts name it, not just what Ray assigned.
    if loop_config.get("gpus_per_worker", 0) > 0 and trial.train.device != "cpu":
        require_gpu(loop_config["gpus_per_worker"])
    device = resolve_device(trial.train, _assigned_device())
    report = _Reporter(
        {
            f"{TIMING_PREFIX}driver_created": loop_config.get("driver_created", math.nan),
            f"{TIMING_PREFIX}driver_entered": loop_config.get("driver_entered", math.nan),
            f"{TIMING_PREFIX}worker_created": _process_start_time(),
            f"{TIMING_PREFIX}worker_imported": imported,
            **_worker_facts(device),
        }
    )

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        resume_from = None
        if checkpoint is not None:
            checkpoint, resume_from, history, note = _restore_point(checkpoint, stack)
            if note:  # the worker's log, and the trial's run (with the first epoch reported)
                _log.warning(
                    "sdd-search: %s: %s", ray.train.get_context().get_experiment_name(), note
                )
                report.timing[RESTORE_KEY] = note
            _replay(checkpoint, history, note)
        try:
            run_trial(
                trial,
                teacher=teacher,
                report=report,
                resume_from=resume_from,
                device=device,
            )
        except NonFiniteLossError as error:
            # A diverged trial is an outcome, not a crash: retrying it would diverge again.
            # Tune rejects a result without the searched metric (it would end the whole search):
            # NaN, "no value" (Optuna records the trial as failed). No "epoch": nothing was
            # trained; ASHA skips a result without one.
            metric = loop_config.get("metric", "val_top1")
            ray.train.report({"nonfinite_loss": 1.0, "stop_reason": str(error), metric: math.nan})


# --------------------------------------------------------------------------------------------
# The Tune trial driver


def trial_driver(config: dict, teacher: dict | None = None, setup: dict | None = None) -> None:
    """Tune trainable: one trial = one Ray Train run (data-parallel over the spec's workers)."""
    entered = time.time()
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup = setup or {}
    trial = config_of(config)
    resources = setup["resources"]
    per_worker = {"CPU": resources["cpus_per_worker"], **resources["custom"]}
    if resources["gpus_per_worker"] > 0:
        per_worker["GPU"] = resources["gpus_per_worker"]
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = trainer_class(resources["workers"])(
        train_worker,
        train_loop_config={
            "trial": trial.model_dump(mode="json"),
            "teacher": teacher,
            "num_classes": setup["num_classes"],
            "metric": setup.get("metric", "val_top1"),
            "gpus_per_worker": resources["gpus_per_worker"],
            "driver_created": _process_start_time(),
            "driver_entered": entered,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources["workers"],
            use_gpu=resources["gpus_per_worker"] > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            # Same name + storage after a restart: Train restores its latest checkpoint.
            name=f"{setup['name']}-{trial_id}",
            storage_path=setup["train_storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=resources["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
