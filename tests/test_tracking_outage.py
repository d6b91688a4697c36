"""A tracking server that goes away: the trials train on, their tracking calls wait in order and
are sent once it is back (every epoch exactly once); a server away too long stops the search,
resumable; an unreachable server at the start is one line before Ray starts.

Fast tests: the buffer against a closed port (nothing listens: connection refused) and a real
MLflow store. Slow: a real `mlflow server` killed and restarted (same port, same sqlite store)
in the middle of a real search.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from sdd_search.config import TrialConfig
from sdd_search.space import ROLE_KEY, SEARCH_ROLE, TRIAL_KEY
from sdd_search.tracking import SearchTracker
from sdd_search.tracking_buffer import (
    TrackingBuffer,
    TrackingUnavailableError,
    check_reachable,
    is_unreachable,
)


def closed_port_uri() -> str:
    """An http URI on 127.0.0.1 where nothing listens (a port bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_closed_port_is_unreachable_at_once_and_a_wrong_call_is_not(tmp_path):
    from mlflow.exceptions import MlflowException

    buffer = TrackingBuffer(outage_seconds=60)
    down = MlflowClient(tracking_uri=closed_port_uri())
    assert buffer.flush(lambda op: None)  # nothing waits: nothing to do
    buffer.submit("warm-up", lambda op: down.get_experiment_by_name("x"))  # MLflow's imports
    buffer.pending.clear()
    started = time.monotonic()
    buffer.submit("first", lambda op: down.get_experiment_by_name("x"))
    assert time.monotonic() - started < 10  # no MLflow retries (7, backing off to minutes)
    assert list(buffer.pending) == ["first"]
    assert buffer.last_error == "/api/2.0/mlflow/experiments/get-by-name: connection refused"

    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(MlflowException) as missing:
        store.get_run("0" * 32)
    assert not is_unreachable(missing.value)  # the call was wrong, not the server away


def test_waiting_calls_are_sent_in_order_once_the_server_is_back(tmp_path):
    """What the buffer holds while the server is away goes out oldest first, each once; until
    the backoff delay has passed nothing is tried again."""
    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    server = {"uri": closed_port_uri()}
    sent: list[int] = []

    def send(step: int) -> None:
        client = MlflowClient(tracking_uri=server["uri"])
        client.log_batch(run_id, metrics=[Metric("val_top1", float(step), 1000 + step, step)])
        sent.append(step)

    buffer = TrackingBuffer(outage_seconds=60, uri="http://mlflow:5000")
    for step in (1, 2, 3):
        buffer.submit(step, send)
    assert list(buffer.pending) == [1, 2, 3] and sent == []
    # One line as it goes away (not one per call), one as it is back.
    (away,) = buffer.take_notices()
    assert away.startswith("tracking: the MLflow server at http://mlflow:5000 does not answer (")
    assert away.endswith(
        "; the search stops, resumable, if it stays away 60 s (tracking.outage_seconds)"
    )
    server["uri"] = f"sqlite:///{tmp_path}/mlflow.db"  # the server is back
    assert not buffer.flush(send)  # the next try is not due yet (backoff)
    assert buffer.take_notices() == []
    time.sleep(0.6)
    assert buffer.flush(send)
    assert sent == [1, 2, 3] and not buffer.pending
    (back,) = buffer.take_notices()
    assert re.fullmatch(
        r"tracking: the MLflow server at http://mlflow:5000 answers again after \d+ s; "
        r"sending the 3 tracking calls that waited, in order",
        back,
    ), back
    buffer.submit(4, send)
    assert sent == [1, 2, 3, 4] and buffer.take_notices() == []  # it answers: nothing to say
    # Sent again (an answer lost on the way back): the same metric, stored once.
    send(3)
    history = store.get_metric_history(run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


def test_a_server_away_past_the_bound_stops_with_one_resumable_line():
    down = MlflowClient(tracking_uri=closed_port_uri())
    buffer = TrackingBuffer(outage_seconds=0.3, uri="http://mlflow:5000")
    buffer.submit("epoch", lambda op: down.get_experiment_by_name("x"))
    buffer.check()  # not away long enough yet
    sleeps: list[float] = []
    started = time.monotonic()

    def sleep(seconds: float) -> None:  # no real waiting; but a drain that never stops fails
        sleeps.append(seconds)
        assert time.monotonic() - started < 20, "still waiting for the server after 20 s"

    with pytest.raises(TrackingUnavailableError) as stopped:
        buffer.drain(lambda op: down.get_experiment_by_name("x"), sleep=sleep)
    assert stopped.value.resumable
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("the MLflow server at http://mlflow:5000 has not answered for")
    assert "tracking.outage_seconds: 0.3" in message and "--resume" in message
    assert sleeps and all(0 <= s <= 10 for s in sleeps)
    assert list(buffer.pending) == ["epoch"]  # kept: it travels with Tune's state


def test_an_unreachable_tracking_uri_at_the_start_is_one_line():
    uri = closed_port_uri()
    with pytest.raises(TrackingUnavailableError) as error:
        check_reachable(uri, timeout=2)
    assert not error.value.resumable
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"tracking.uri: the MLflow server at {uri} does not answer")
    check_reachable("sqlite:///mlflow.db")  # a store, not a server: nothing to ask


def test_the_cli_refuses_an_unreachable_tracking_server_in_one_line_before_ray(
    write_spec, tmp_path
):
    uri = closed_port_uri()
    spec_path = write_spec({"tracking": {"uri": uri}})
    result = subprocess.run(
        [sys.executable, "-m", "sdd_search", str(spec_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith(
        f"sdd-search: error: {spec_path}: tracking.uri: the MLflow server at {uri} does not "
        "answer "
        f"(GET {uri}/health: "
    )
    assert "Connection refused" in line and line.endswith("point tracking.uri at one that runs")
    assert result.stdout == ""  # not even the plan: nothing started


def _trial(trial_id: str) -> SimpleNamespace:
    """A searched trial of two epochs, as Tune hands it to its callbacks."""
    base = TrialConfig().model_dump(mode="json")
    base["train"]["epochs"] = 2
    config = {TRIAL_KEY: base, ROLE_KEY: SEARCH_ROLE}
    return SimpleNamespace(
        trial_id=trial_id,
        config=config,
        path=f"/runs/{trial_id}",
        last_result={"epoch": 2},
        error_file=None,
        get_error=lambda: None,
    )


def test_the_callback_keeps_what_waits_in_tunes_state_and_a_resumed_driver_sends_it(tmp_path):
    """A driver whose server is away buffers its trial's run and first epoch, and Tune saves
    its state then; it trains on, then dies. The next driver sends what the state held, then
    hears the restarted trial replay both epochs and finish: one run, each epoch once."""
    from sdd_search.mlflow_callback import MlflowTrialCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri, "sdd-search/tiny", "/runs/tiny")
    tracker.start_parent("tiny", {}, "", "")
    trial = _trial("aaa01")
    epochs = [{"epoch": e, "train_loss": 1.0 / e, "val_top1": 50.0 + e} for e in (1, 2)]

    away = MlflowTrialCallback(closed_port_uri(), "sdd-search/tiny", "/runs/tiny", 60)
    away.on_trial_start(0, [], trial)
    away.on_trial_result(0, [], trial, epochs[0])
    saved = pickle.dumps(away.get_state())  # Tune's periodic save of the experiment state
    assert [operation[0] for operation in pickle.loads(saved)["pending"]] == [
        "run",
        "tags",
        "epoch",
    ]
    away.on_trial_result(0, [], trial, epochs[1])  # then the driver dies

    back = MlflowTrialCallback(uri, "sdd-search/tiny", "/runs/tiny", 60)
    back.set_state(pickle.loads(saved))
    back.on_step_begin(0, [])
    back.on_trial_start(0, [], trial)  # the restarted trial replays its checkpoint's epochs
    for result in epochs:
        back.on_trial_result(0, [], trial, {**result, "replayed": 1.0})
    back.on_trial_complete(0, [], trial)
    back.on_experiment_end([])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(
        [tracker.experiment_id], "tags.`sdd_search.trial_id` = 'aaa01'", max_results=10
    )
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 51.0), (2, 52.0)]
    assert run.data.params["train.epochs"] == "2"
    assert run.info.status == "FINISHED" and run.data.tags["sdd_search.status"] == "completed"


def test_the_callback_stops_the_search_in_tunes_loop_once_the_bound_passes():
    from sdd_search.mlflow_callback import MlflowTrialCallback

    callback = MlflowTrialCallback(closed_port_uri(), "sdd-search/tiny", "/runs/tiny", 0.2)
    callback.on_trial_start(0, [], _trial("aaa01"))  # buffered: the server is away
    callback.on_step_begin(0, [])
    time.sleep(1.0)
    with pytest.raises(TrackingUnavailableError):
        callback.on_step_begin(1, [])
    callback.on_experiment_end([])  # Tune's clean-up after the raise: returns at once


def test_an_interrupted_fit_ends_without_waiting_for_the_server():
    """Ctrl-C while the server is away: Tune marks the running trials terminated as it cleans
    up; the callback saw no end of theirs, so it leaves what waits to Tune's saved state."""
    from sdd_search.mlflow_callback import MlflowTrialCallback

    callback = MlflowTrialCallback(closed_port_uri(), "sdd-search/tiny", "/runs/tiny", 600)
    trial = _trial("aaa01")
    trial.status = "RUNNING"
    callback.setup()
    callback.on_step_begin(0, [trial])
    callback.on_trial_start(0, [trial], trial)
    trial.status = "TERMINATED"
    started = time.monotonic()
    callback.on_experiment_end([trial])
    assert time.monotonic() - started < 15  # one quick try, not a wait of outage_seconds
    assert [operation[0] for operation in callback.get_state()["pending"]] == ["run", "tags"]


# --------------------------------------------------------------------------------------------
# The real thing, a search whose `mlflow server` is killed and restarted mid-trial, is
# tests/test_mlflow_ui.py::test_a_search_on_a_server_that_restarts_then_its_report_and_ui
# (one search shared with the report and UI checks).


def tune_epochs(search_folder: Path) -> dict[str, dict[int, dict]]:
    """Trial id -> epoch -> the result the trial reported for it (Tune's result.json), first
    report of each epoch."""
    reported: dict[str, dict[int, dict]] = {}
    for path in search_folder.glob("*/result.json"):
        for line in path.read_text().splitlines():
            result = json.loads(line)
            if "epoch" in result:
                epochs = reported.setdefault(result["trial_id"], {})
                epochs.setdefault(int(result["epoch"]), result)
    return reported


def test_whether_a_trial_ended_is_not_waited_for_when_the_server_is_away():
    """After Ctrl-C the search asks MLflow which trials ended; with the server away it must
    answer at once (not ended: the resume asks again), not after MLflow's minutes of retries."""
    from sdd_search.mlflow_callback import MlflowTrialCallback

    callback = MlflowTrialCallback(closed_port_uri(), "sdd-search/tiny", "/runs/tiny", 600)
    started = time.monotonic()
    assert callback.has_ended("aaa01") is False
    assert time.monotonic() - started < 15
    callback.ended.add("aaa01")  # ended in this driver: known without the server
    assert callback.has_ended("aaa01") is True


def test_why_a_call_got_no_answer_is_said_in_a_few_words(tmp_path):
    """A real refused request (a closed port) and MLflow's words for a server's 503."""
    from mlflow.exceptions import MlflowException

    from sdd_search.tracking_buffer import failing_fast, short_reason

    with pytest.raises(Exception) as refused, failing_fast():
        MlflowClient(tracking_uri=closed_port_uri()).search_experiments()
    assert short_reason(refused.value) == "/api/2.0/mlflow/experiments/search: connection refused"
    busy = MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 "
        "!= 200. Response body: '<html>Service Unavailable</html>'"
    )
    assert short_reason(busy) == "/api/2.0/mlflow/runs/log-batch: HTTP 503"
    assert short_reason(ValueError("something else")) == "something else"
