"""MLflow: a parent run per search, a nested child run per trial, the best students registered.

Everything goes through one :class:`mlflow.MlflowClient` with explicit run ids, from the driver
process only (one writer, so a sqlite store is safe). Runs are found again by tags, so a
resumed search keeps one run per trial and never duplicates one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

TAG_SEARCH = "sdd_search.search"  # the search's experiment path: identifies the parent run
TAG_ROLE = "sdd_search.role"  # parent | trial | reference
TAG_TRIAL = "sdd_search.trial_id"
TAG_STATUS = "sdd_search.status"
TAG_REASON = "sdd_search.reason"
# A final-stage run: its configuration ("finalist-1", "kd", ...), that one's role, the seed,
# the search trial it came from and that trial's selection score (search metric).
TAG_FINAL_ENTRY = "sdd_search.final_entry"
TAG_FINAL_ROLE = "sdd_search.final_role"
TAG_SEED = "sdd_search.seed"
TAG_SOURCE_TRIAL = "sdd_search.source_trial"
TAG_SELECTION_SCORE = "sdd_search.selection_score"
TAG_OUTCOME = "sdd_search.outcome"  # parent: running | interrupted | finished
TAG_REGISTERED = "sdd_search.registered"  # parent: JSON [[trial id, version], ...] once done
# The experiment's kind, model training (not GenAI): MLflow 3's UI picks its views by it (3.17's
# by the link's workflowType first: runs_page).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite/file URI absolute so every process agrees on it."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    return uri


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///...`` URL; None for another database or an in-memory one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_sqlite_store(uri: str) -> None:
    """Make a new sqlite store whole before any other process can open it.

    MLflow creates a missing sqlite store in whichever process opens it first, by running its
    migrations in place; two processes doing it at once (two searches started together on one
    ``mlflow.db``, or ``mlflow ui`` opened as a search starts) both migrate and one fails
    (``table ... already exists``). So the store is built in a file beside it and linked into
    place only whole: another process sees no store, or a complete one. A store that exists
    already, or a URI that is not a sqlite file, is left alone."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = sqlite_file(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new"
    try:  # (sqlite makes the file, with the permissions MLflow's own store would have)
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow's migration chatter
            store = SqlAlchemyStore(f"sqlite:///{building}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        store.engine.dispose()
        try:
            os.link(building, path)  # fails if another process's store came first: it is
        except FileExistsError:  # whole too (made the same way), and it is the one
            pass
        except OSError:  # a file system without hard links: a move, unless one came first
            if not path.exists():
                os.replace(building, path)
    finally:
        building.unlink(missing_ok=True)


def runs_page(uri: str, experiment_id: str) -> str:
    """How to open an experiment's runs in the MLflow UI: the page itself for a tracking
    server (``uri`` http(s)), else the ``mlflow ui`` command on the store, then the page.

    The page asks for the UI's model-training views: MLflow 3.17's UI takes them from its
    GenAI / Model training switch (``workflowType``, GenAI unless set) over the experiment's
    ``mlflow.experimentKind`` tag, which earlier MLflow 3 UIs read."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open {LOCAL_UI}/{page}"


def system_info() -> dict[str, str]:
    """What a reader needs to compare trials across machines."""
    import ray
    import torch

    info = {
        "sys.hostname": socket.gethostname(),
        "sys.platform": platform.platform(),
        "sys.python": platform.python_version(),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.torch": torch.__version__,
        "sys.ray": ray.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.cuda": str(torch.version.cuda),
        "sys.gpus": str(torch.cuda.device_count()),
    }
    if torch.cuda.is_available():
        info["sys.gpu_name"] = torch.cuda.get_device_name(0)
    return info


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class LogitsOnly(torch.nn.Module):
    """Serving wrapper: images (B x 3 x H x W, normalised float32) -> logits (B x K).

    A DistillModel already returns logits alone; the wrapper stays so registered models keep
    one pickled class and a plain ``nn.Module`` interface.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class SearchTracker:
    """The MLflow side of one search."""

    def __init__(
        self, uri: str, experiment: str, search_id: str, artifact_location: str | None = None
    ):
        self.uri = resolve_tracking_uri(uri)
        create_sqlite_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location, tags=EXPERIMENT_TAGS
            )
        else:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            self.experiment_id = existing.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag
                if key not in existing.tags:
                    self.client.set_experiment_tag(self.experiment_id, key, value)
        self.experiment_name = experiment
        self.search_id = search_id
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}

    # -- parent ---------------------------------------------------------------------------

    def find_parent(self) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_SEARCH}` = '{self.search_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_parent(self, run_name: str, spec_dict: dict, spec_text: str, plan: str) -> str:
        """Create the parent run, or reopen the one of a search being resumed."""
        run_id = self.find_parent()
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={TAG_ROLE: "parent", TAG_SEARCH: self.search_id, **system_info()},
            )
            run_id = run.info.run_id
            params = {k: v for k, v in flatten(spec_dict).items() if k.split(".")[0] != "space"}
            self._log_params(run_id, params)
            self.client.log_text(run_id, spec_text, "spec.yaml")
            self.client.log_text(run_id, plan, "plan.txt")
            self.client.log_dict(run_id, spec_dict.get("space", {}), "search_space.json")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, TAG_OUTCOME, "running")
        self.parent_run_id = run_id
        for run in self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
            max_results=5000,
        ):
            trial_id = run.data.tags.get(TAG_TRIAL)
            if trial_id:
                self._trial_runs[trial_id] = run.info.run_id
        return run_id

    def parent_tag(self, key: str) -> str | None:
        """A tag of the parent run (None when unset)."""
        return self.client.get_run(self.parent_run_id).data.tags.get(key)

    def finish_parent(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- trials ---------------------------------------------------------------------------

    def trial_run(
        self,
        trial_id: str,
        run_name: str,
        role: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
    ) -> str:
        """The child run of a trial: created once (with ``tags`` besides the role's), found
        again on resume, or by its tags when an earlier try created it but got no answer (a
        tracking server that went away: its params are logged again, to the same values)."""
        run_id = self._trial_runs.get(trial_id)
        if run_id is None and (run_id := self.run_id_of(trial_id)) is not None:
            self._trial_runs[trial_id] = run_id
            self._log_params(run_id, params)
        if run_id is not None:
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                TAG_ROLE: role,
                TAG_TRIAL: trial_id,
                TAG_SEARCH: self.search_id,
                **(tags or {}),
            },
        )
        run_id = run.info.run_id
        self._trial_runs[trial_id] = run_id
        self._log_params(run_id, params)
        return run_id

    def run_id_of(self, trial_id: str) -> str | None:
        return self._trial_runs.get(trial_id) or next(
            (
                r.info.run_id
                for r in self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`{TAG_SEARCH}` = '{self.search_id}'",
                    max_results=1,
                )
            ),
            None,
        )

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int, timestamp_ms: int) -> None:
        rows = [
            Metric(key, float(value), timestamp_ms, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        if rows:
            self.client.log_batch(run_id, metrics=rows)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def end_trial(self, run_id: str, status: str, reason: str | None = None) -> None:
        tags = {TAG_STATUS: status.lower()}
        if reason:
            tags[TAG_REASON] = reason
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status="FAILED" if status == "FAILED" else "FINISHED")

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        rows = [
            Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v))
            for k, v in params.items()
        ]
        for start in range(0, len(rows), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=rows[start : start + 100])

    # -- artifacts and models -------------------------------------------------------------

    def log_leaderboard(self, rows: list[dict[str, Any]], text: str) -> None:
        if not self.parent_run_id:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "leaderboard.csv"
            keys = list(rows[0]) if rows else []
            lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
            path.write_text("\n".join(lines) + "\n")
            self.client.log_artifact(self.parent_run_id, str(path))
        self.client.log_text(self.parent_run_id, text, "leaderboard.txt")

    def register_student(
        self,
        run_id: str,
        model,
        example_input,
        registered_model: str,
    ) -> str:
        """Log ``model`` (logits only) as an MLflow PyTorch model in ``run_id`` and register it.

        Returns the new model version.
        """
        from mlflow.models import infer_signature

        wrapped = LogitsOnly(model).eval()
        with torch.no_grad():
            output = wrapped(torch.from_numpy(example_input)).numpy()
        signature = infer_signature(example_input, output)
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            with _registry_notices_hidden(), mlflow.start_run(run_id=run_id, nested=True):
                info = mlflow.pytorch.log_model(
                    wrapped,
                    name="student",
                    signature=signature,
                    input_example=example_input,
                    registered_model_name=registered_model,
                    await_registration_for=60,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "sdd-search"],
                )
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
        version = info.registered_model_version
        return str(version)

    def set_alias(self, registered_model: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_model, alias, version)


_REGISTRY_NOTICE = re.compile(
    r"^(Successfully registered model '|Created version '\d+' of model '|Registered model '.*' "
    r"already exists\. Creating a new version)"
)


@contextlib.contextmanager
def _registry_notices_hidden():
    """MLflow prints "Successfully registered model ..." and "Created version ..." to stderr
    itself (``eprint``, not its logger); the search prints its own line per version. Hidden
    unless MLflow's logger shows INFO (``sdd-search -v``); any other line still goes out."""
    if logging.getLogger("mlflow").getEffectiveLevel() <= logging.INFO:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [ln for ln in captured.getvalue().splitlines() if not _REGISTRY_NOTICE.match(ln)]
        if kept:
            print("\n".join(kept), file=sys.stderr)
