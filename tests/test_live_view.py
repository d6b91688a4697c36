"""The live view: what a user sees while a search runs.

Fast: the plain lines (stdout not a terminal) and the rich picture, fed through the Tune
callback's own methods with stand-in trials. Slow: `sdd-search` in a real terminal (tmux),
killed mid-search and resumed, its screen read with `capture-pane`, and the Optuna study read
back as optuna-dashboard reads it after each run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from local_ray import OWNER
from mlflow import MlflowClient
from rich.console import Console

from sdd_search import chatter, tuning
from sdd_search.data import build_datasets_and_loaders
from sdd_search.live_view import LiveView, StageProgress, format_seconds, render
from sdd_search.space import FINAL_KEY, FINAL_ROLE, ROLE_KEY, TRIAL_KEY
from sdd_search.spec import load_spec

KNOBS = ["scales", "temperature", "complementary_weight"]
# What Ray's and Optuna's own output looks like; none of it may reach the user's screen.
LEAKS = (
    "== Status ==",
    "Logical resource usage",
    "driver_artifacts",
    "Tuner.restore",
    "(pid=",
    "(TrainController",
    "A new study created",
    "Token authentication",
    "Bracket:",
    "View run ",  # MLflow's per-run links (a tracking server's; test_mlflow_ui.py)
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def stand_in(trial_id: str, base: dict, **knobs) -> SimpleNamespace:
    """A Tune trial as the callback reads it: id, config, status, last result, error file."""
    config = {TRIAL_KEY: base, ROLE_KEY: "search", **knobs}
    return SimpleNamespace(
        trial_id=trial_id, config=config, status="RUNNING", last_result={}, error_file=None
    )


def search_view(write_spec, clock, terminal=False) -> tuple[LiveView, dict]:
    spec = load_spec(write_spec({"search": {"scheduler": "asha"}}))
    view = LiveView(
        terminal=terminal,
        stage="search",
        search="tiny",
        metric="val_top1",
        mode="max",
        knobs=KNOBS,
        epochs=2,
        asha=True,
        clock=clock,
    )
    return view, spec.search_trial.model_dump(mode="json")


def play_a_stage(view: LiveView, base: dict, clock: Clock, tmp_path: Path) -> list:
    """Three trials: one completes, one ASHA stops after its first epoch, one fails."""
    a = stand_in("aaaa0001", base, scales="1,2", temperature=4.0, complementary_weight=2.0)
    b = stand_in("bbbb0002", base, scales="1", temperature=5.2193, complementary_weight=2.6)
    c = stand_in("cccc0003", base, scales="1", temperature=1.5, complementary_weight=3.0)
    trials = [a, b]
    view.setup(total_num_samples=3)
    view.on_trial_start(0, trials, a)
    view.on_trial_start(0, trials, b)
    clock.now += 30
    view.on_trial_result(0, trials, a, {"epoch": 1, "val_top1": 50.0, "train_loss": 1.25})
    view.on_trial_result(0, trials, b, {"epoch": 1, "val_top1": 40.0, "train_loss": 1.5})
    clock.now += 10
    a.last_result = {"epoch": 2, "val_top1": 61.5}
    view.on_trial_result(0, trials, a, {"epoch": 2, "val_top1": 61.5, "train_loss": 1.0})
    view.on_trial_complete(0, trials, a)
    a.status = "TERMINATED"
    b.last_result = {"epoch": 1, "val_top1": 40.0}
    view.on_trial_complete(0, trials, b)
    b.status = "TERMINATED"
    trials.append(c)
    view.on_trial_start(0, trials, c)
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    c.error_file, c.status = str(error), "ERROR"
    view.on_trial_error(0, trials, c)
    return trials


def test_plain_lines_one_per_event(write_spec, tmp_path, capsys):
    clock = Clock()
    view, base = search_view(write_spec, clock)
    trials = play_a_stage(view, base, clock, tmp_path)
    view.on_experiment_end(trials)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[search] tiny: 3 trials",
        "[search] trial-aaaa0001 started: scales=[1, 2] temperature=4 complementary_weight=2",
        "[search] trial-bbbb0002 started: scales=[1] temperature=5.219 complementary_weight=2.6",
        "[search] trial-aaaa0001 epoch 1/2: val_top1 50.00% (best 50.00%), loss 1.25",
        "[search] trial-bbbb0002 epoch 1/2: val_top1 40.00% (best 40.00%), loss 1.5",
        "[search] trial-aaaa0001 epoch 2/2: val_top1 61.50% (best 61.50%), loss 1",
        "[search] trial-aaaa0001 completed: val_top1 61.50% (best 61.50%), loss 1 · 1/3 done, 40s",
        "[search] trial-bbbb0002 stopped by ASHA after epoch 1 of 2: val_top1 40.00% "
        "(best 40.00%), loss 1.5 · 2/3 done, 40s",
        "[search] trial-cccc0003 started: scales=[1] temperature=1.5 complementary_weight=3",
        "[search] trial-cccc0003 failed: RuntimeError: out of memory · 3/3 done, 40s",
        "[search] finished in 40s: 1 completed, 1 stopped, 1 failed; best val_top1 61.50% "
        "trial-aaaa0001 (scales=[1, 2] temperature=4 complementary_weight=2)",
    ]


@pytest.mark.parametrize("terminal", [False, True])
def test_a_trial_resumed_past_a_torn_checkpoint_says_so_in_one_line(write_spec, capsys, terminal):
    """The first result after a restart that found its newest checkpoint unreadable carries
    what the trial did about it: one line, plain or above the live view, never only a tag."""
    view, base = search_view(write_spec, Clock(), terminal=terminal)
    a = stand_in("aaaa0001", base, scales="1,2", temperature=4.0, complementary_weight=2.0)
    view.setup(total_num_samples=1)
    view.on_trial_restore(0, [a], a)
    note = (
        "checkpoint_2026-12-03_07-19-00.85 was unreadable (truncated or corrupt file); "
        "resumed from checkpoint_2026-12-03_07-19-00.24, epoch 1"
    )
    view.on_trial_result(0, [a], a, {"epoch": 1, "replayed": True, "worker/restore": note})
    view.on_trial_result(0, [a], a, {"epoch": 2, "val_top1": 50.0, "train_loss": 1.0})
    view.close()
    said = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert said == [f"[search] trial-aaaa0001 {note}"], said


def screen(progress: StageProgress, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=True)
    console.print(render(progress, 50, width))
    return console.file.getvalue()


def test_a_resumed_stage_shows_the_trials_that_ended_before_it(write_spec, tmp_path, capsys):
    """On --resume Tune says nothing more of a trial that had ended (no start, no result): its
    row comes from Tune's trial as it ended (last epoch and score, its best, how it ended), among
    the restored ones; no line is printed for it again. It showed "trials 2/2 done" over one
    row."""
    clock = Clock()
    view, base = search_view(write_spec, clock)
    done = stand_in("aaaa0001", base, scales="1,2", temperature=4.0, complementary_weight=2.0)
    done.status, done.last_result = "TERMINATED", {"epoch": 2, "val_top1": 61.5, "train_loss": 1.0}
    done.metric_analysis = {"val_top1": {"max": 63.25, "min": 50.0, "last": 61.5}}
    asha = stand_in("bbbb0002", base, scales="1", temperature=5.2193, complementary_weight=2.6)
    asha.status, asha.last_result = "TERMINATED", {"epoch": 1, "val_top1": 40.0}
    asha.metric_analysis = {"val_top1": {"max": 40.0}}
    failed = stand_in("cccc0003", base, scales="1", temperature=1.5, complementary_weight=3.0)
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\nValueError: bad\n")
    failed.status, failed.error_file, failed.metric_analysis = (
        "ERROR",
        str(tmp_path / "error.txt"),
        {},
    )
    running = stand_in("dddd0004", base, scales="1", temperature=2.0, complementary_weight=1.0)
    trials = [done, asha, failed, running]
    view.setup(total_num_samples=4)
    view.on_step_begin(0, trials)
    view.on_trial_restore(0, trials, running)
    progress = view.progress
    rows = {
        r.name: (r.epoch, f"{r.score:.2f}", f"{r.best:.2f}", r.state, r.note)
        for r in progress.shown_rows(9)
    }
    assert rows == {
        "trial-dddd0004": (0, "nan", "nan", "running", ""),
        "trial-aaaa0001": (2, "61.50", "63.25", "completed", ""),
        "trial-bbbb0002": (1, "40.00", "40.00", "stopped", "by ASHA"),
        "trial-cccc0003": (0, "nan", "nan", "failed", "ValueError: bad"),
    }
    assert [r.name for r in progress.shown_rows(9)][0] == "trial-dddd0004"  # running first
    assert (progress.done, progress.running, progress.total) == (3, 1, 4)
    assert progress.best_row().name == "trial-aaaa0001"
    picture = screen(progress)
    assert re.search(r"^trial-aaaa0001 .* 2/2 +61\.50% +63\.25% +1 +completed", picture, re.M)
    assert re.search(r"^trial-cccc0003 .* failed: ValueError: bad", picture, re.M), picture
    said = capsys.readouterr().out.splitlines()
    assert said == [
        "[search] tiny: 4 trials",
        "[search] trial-dddd0004 resumed: scales=[1] temperature=2 complementary_weight=1",
    ]
    # A stage that had ended whole before the resume: Tune runs no step, only its end.
    again, _ = search_view(write_spec, clock)
    again.setup(total_num_samples=4)
    running.status, running.last_result, running.metric_analysis = "TERMINATED", {"epoch": 2}, {}
    again.on_experiment_end(trials)
    assert len(again.progress.rows) == 4 and again.progress.done == 4


def test_time_left_counts_each_trials_start_up_once():
    """4 trials x 4 epochs, 2 at a time, 20 s start-up and 5 s an epoch: once a trial has two
    epochs timed, the time left is the epochs left at 5 s plus a start-up per waiting trial."""
    clock = Clock()
    stage = StageProgress("final", "tiny", "val_top1", "max", [], 4, total=4, clock=clock)
    stage.start("a", "a", {}, 4)
    stage.start("b", "b", {}, 4)
    clock.now += 25  # start-up + the first epoch
    stage.result("a", {"epoch": 1, "train_loss": 1.0})
    stage.result("b", {"epoch": 1, "train_loss": 1.0})
    assert stage.seconds_left() is None  # one epoch each: start-up and pace not separable
    clock.now += 5
    stage.result("a", {"epoch": 2, "train_loss": 1.0})
    stage.result("b", {"epoch": 2, "train_loss": 1.0})
    # left: 2 + 2 epochs of the running ones, 2 x (20 s + 4 epochs) waiting, over 2 at once
    assert stage.seconds_left() == pytest.approx((4 * 5 + 2 * (20 + 4 * 5)) / 2)
    clock.now += 10
    stage.result("a", {"epoch": 4, "train_loss": 1.0, "replayed": True})  # no fresh epoch
    stage.complete("a", {"epoch": 4})
    assert stage.seconds_left() == pytest.approx((2 * 5 + 2 * (20 + 4 * 5)) / 2)
    # c starts in a's place; 8 s on, no epoch yet: 12 s of its start-up are left, and its epochs.
    stage.start("c", "c", {}, 4)
    clock.now += 8
    assert stage.seconds_left() == pytest.approx((2 * 5 + (12 + 4 * 5) + (20 + 4 * 5)) / 2)


def test_the_terminal_picture(write_spec, tmp_path, capsys):
    clock = Clock()
    view, base = search_view(write_spec, clock)
    a = stand_in("aaaa0001", base, scales="1,2", temperature=4.0, complementary_weight=2.0)
    b = stand_in("bbbb0002", base, scales="1", temperature=5.2193, complementary_weight=2.6)
    view.setup(total_num_samples=4)
    view.on_trial_start(0, [a, b], a)
    view.on_trial_start(0, [a, b], b)
    clock.now += 60
    view.on_trial_result(0, [a, b], a, {"epoch": 1, "val_top1": 50.0, "train_loss": 1.25})
    b.last_result = {"epoch": 1, "val_top1": 40.0}
    view.on_trial_result(0, [a, b], b, b.last_result)
    view.on_trial_complete(0, [a, b], b)
    b.status = "TERMINATED"
    text = screen(view.progress)
    lines = text.splitlines()
    # The header: done / running / total, elapsed (no time left before some trial has timed
    # two epochs: the first one includes its start-up), then the best score and its knobs.
    assert lines[0].strip() == "search · tiny   trials 1/4 done · 1 running   elapsed 1m00s"
    assert lines[1].strip() == (
        "best val_top1 50.00%  trial-aaaa0001  scales=[1, 2] temperature=4 complementary_weight=2"
    )
    assert lines[2].split() == [
        "trial",
        *KNOBS,
        "progress",
        "epoch",
        "val_top1",
        "best",
        "loss",
        "state",
    ]
    row_a = next(line for line in lines if line.startswith("trial-aaaa0001"))
    assert "[1, 2]" in row_a and "━━━━━─────" in row_a and "1/2" in row_a
    assert "50.00%" in row_a and "running" in row_a
    row_b = next(line for line in lines if line.startswith("trial-bbbb0002"))
    assert "5.219" in row_b and row_b.endswith("stopped by ASHA")
    assert lines.index(row_a) < lines.index(row_b)  # running trials first
    assert len(capsys.readouterr().out.splitlines()) == 6  # start, 2 starts, 2 epochs, a stop


def test_a_narrow_terminal_cuts_the_reason_never_the_numbers():
    progress = StageProgress("search", "tiny", "val_top1", "max", KNOBS, epochs=2, total=2)
    knobs = {"scales": [1, 2], "temperature": 4.0, "complementary_weight": 2.0}
    progress.start("a", "trial-aaaa0001", knobs, 2)
    progress.start("b", "trial-bbbb0002", knobs, 2)
    progress.result("b", {"epoch": 1, "val_top1": 50.0, "train_loss": 1.0})
    progress.error("a", "ActorUnavailableError: " + "the actor is unavailable " * 8, retrying=True)
    for width in (160, 100):
        lines = screen(progress, width).splitlines()
        assert max(len(line.rstrip()) for line in lines[2:]) <= width
        header = " ".join(lines[2:4])  # the header may take two lines when narrow
        for column in ("trial", "epoch", "best", "loss", "state", "top1"):
            assert column in header, (width, lines)
        row = next(line for line in lines if line.startswith("trial-aaaa0001"))
        assert "0/2" in row and "retrying: Actor" in row and row.rstrip().endswith("…")
        assert "50.00%" in next(line for line in lines if line.startswith("trial-bbbb0002"))


def test_the_final_stage_shows_its_test_score_and_no_best(write_spec, capsys):
    spec = load_spec(write_spec())
    base = spec.final_trial.model_dump(mode="json")
    entry = {
        "entry": "finalist-1",
        "role": "finalist",
        "seed": 0,
        "source_trial": "aaaa0001",
        "selection_score": 61.5,
        "params": {"scales": "1,2", "temperature": 4.0, "complementary_weight": 2.0},
    }
    trial = SimpleNamespace(
        trial_id="ffff0001",
        config={TRIAL_KEY: base, ROLE_KEY: FINAL_ROLE, FINAL_KEY: entry},
        status="RUNNING",
        last_result={},
        error_file=None,
    )
    view = LiveView(
        terminal=False,
        stage="final",
        search="tiny",
        metric="val_top1",
        mode="max",
        knobs=KNOBS,
        epochs=2,
    )
    view.setup(total_num_samples=1)
    view.on_trial_start(0, [trial], trial)
    view.on_trial_result(0, [trial], trial, {"epoch": 1, "train_loss": 1.5})
    view.on_trial_result(0, [trial], trial, {"epoch": 2, "train_loss": 1.2, "test_top1": 58.25})
    text = screen(view.progress)
    assert text.splitlines()[0].startswith("final · tiny   trials 0/1 done · 1 running")
    assert "best" not in text and "test_top1" in text and "58.25%" in text
    assert "finalist-1-seed0" in text
    out = capsys.readouterr().out
    assert "[final] finalist-1-seed0 epoch 2/2: test_top1 58.25%, loss 1.2" in out


def test_the_references_stage_has_no_knob_columns(write_spec):
    progress = StageProgress("references", "tiny", "val_top1", "max", [], epochs=2)
    progress.start("r1", "baseline", {}, 2)
    progress.result("r1", {"epoch": 1, "val_top1": 55.0})
    header = screen(progress).splitlines()[2].split()
    assert header == ["trial", "progress", "epoch", "val_top1", "best", "loss", "state"]


def test_a_stage_that_stops_early_says_so(capsys):
    view = LiveView(
        terminal=False,
        stage="search",
        search="tiny",
        metric="val_top1",
        mode="max",
        knobs=[],
        epochs=2,
    )
    view.setup(total_num_samples=2)
    trial = SimpleNamespace(trial_id="aaaa0001", config={ROLE_KEY: "baseline"}, status="RUNNING")
    view.progress.start(trial.trial_id, "baseline", {}, 2, trials=[trial])
    view.close()  # Ctrl-C: Tune returns without ending the stage
    assert capsys.readouterr().out.splitlines()[-1] == (
        "[search] interrupted after 0s: 1 unfinished"
    )


def test_format_seconds():
    assert [format_seconds(s) for s in (7, 65, 3725)] == ["7s", "1m05s", "1h02m"]


def test_chatter_is_hidden_but_warnings_that_matter_stay_in_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    ray_logger = logging.getLogger("ray")
    before = ray_logger.level, optuna.logging.get_verbosity()
    ray_logger.addHandler(handler)
    try:
        chatter.hide_chatter()
        logging.getLogger("ray._private.authentication").warning("Token authentication is on")
        logging.getLogger("ray.tune.tune").info("Total run time: 3 s")
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed")
        logging.getLogger("ray._private.worker").error("listen_error_messages: gone")
        kept = logging.getLogger(chatter.KEPT_RAY_WARNINGS[0])
        kept.warning("No trial is running.\nYou asked for 4 CPUs per trial,\n  the cluster has 2.")
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    finally:
        ray_logger.removeHandler(handler)
        ray_logger.setLevel(before[0])
        logging.getLogger("ray.tune").setLevel(logging.NOTSET)
        optuna.logging.set_verbosity(before[1])
    assert stream.getvalue() == (
        "listen_error_messages: gone\n"
        "No trial is running. You asked for 4 CPUs per trial, the cluster has 2.\n"
    )


# --------------------------------------------------------------------------------------------
# In a real terminal


class Tmux:
    """One tmux server of its own (so this process's environment reaches the command)."""

    def __init__(self, name: str):
        self.socket, self.name = f"sdd-test-{os.getpid()}-{name}", name

    def _tmux(self, *args: str) -> str:
        # os.environ, not the C environment a library may have set COLUMNS=80 in (pytest's).
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        command = ["tmux", "-u", "-L", self.socket, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout

    def start(self, command: str, cwd: Path) -> None:
        shell = f"cd {cwd} && {command}; echo EXIT=$?; sleep 600"
        self._tmux("new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", shell)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def everything(self) -> str:
        """The screen with the lines scrolled above it."""
        return self._tmux("capture-pane", "-p", "-J", "-t", self.name, "-S", "-")

    def wait_for(self, pattern: str, everything: bool = False, timeout: float = 300) -> str:
        """The screen once a line matches ``pattern`` or the command has ended."""
        read = self.everything if everything else self.screen
        found = re.compile(f"{pattern}|^EXIT=", re.M)
        return wait_for(
            lambda: (lambda text: text if found.search(text) else None)(read()),
            timeout,
            pattern,
            self.everything,
        )

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def wait_for(condition, timeout: float, what: str, on_fail=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{on_fail()}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_a_search_stopped_by_ctrl_c_and_resumed_in_a_terminal(
    write_spec, teacher_cache, tmp_path, ray_owner
):
    """The whole loop as a user runs it. `sdd-search` writing to a file (one plain line per
    event), stopped by Ctrl-C mid-search (SIGINT to its process group, as a terminal sends
    it): nothing registered, the parent run marked interrupted, one line with the resume
    command, exit 130. A resume that changes the spec is refused; `--resume` in a real
    terminal (tmux) shows the live view (a header and one row per trial, nothing of Ray's
    log) and finishes: references, Optuna trials, ASHA, every epoch in MLflow once, two
    registered students, the champion loaded back; the Optuna study holds every trial."""
    from test_search import (
        assert_resume_refused,
        child_runs,
        logged_epochs,
        run_cli,
        start_driver,
    )

    spec_path = write_spec(
        {
            "train": {"epochs": 4},
            "search": {
                "num_trials": 2,
                "max_concurrent": 2,  # the references together, then the two trials together
                "scheduler": "asha",
                "grace_period": 3,  # one rung, at epoch 3: ASHA may stop the second trial there
                "references": True,
            },
        }
    )
    spec = load_spec(spec_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = ray_owner.env({"PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"})

    # 1. Not a terminal: plain lines. Ctrl-C once the references have finished and both
    # trials have trained, the one behind mid-training (after its first epoch, before ASHA's
    # rung at 3). The resumed trials replay the epochs their checkpoints hold; one that ASHA
    # stops on a replayed epoch must still be registered (the last replay names the checkpoint).
    def mid_second_trial(epochs: list[int]) -> bool:
        return len(epochs) == 2 and 1 <= epochs[0] < 3

    log_path = tmp_path / "first.log"
    driver = start_driver(spec_path, tmp_path, log_path, env)
    try:
        wait_for(
            lambda: mid_second_trial(logged_epochs(uri)) or driver.poll() is not None,
            400,
            "the second trial mid-training",
            log_path.read_text,
        )
        assert driver.poll() is None, log_path.read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log_path.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        ray_owner.stop()
    first = log_path.read_text()
    (line,) = [text for text in first.splitlines() if text.startswith("sdd-search: interrupted")]
    assert line.endswith(f"continue with: sdd-search {spec_path} --resume"), line
    assert "nothing registered" in line and "Leaderboard" not in first
    started = re.findall(r"^\[search\] trial-\w+ started: (.*)$", first, re.M)
    assert len(started) == 2, first[-3000:]
    assert all(
        re.fullmatch(r"scales=\S.* temperature=\S+ complementary_weight=\S+", s) for s in started
    )
    assert re.search(r"^\[search\] interrupted after \S+: .*[12] unfinished", first, re.M), first
    assert "\x1b[" not in first and "━" not in first  # no redrawing in a log
    assert not [leak for leak in LEAKS if leak in first], first[-3000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    interrupted, _ = child_runs(client, "sdd-search/tiny")
    assert interrupted.info.status == "KILLED"
    assert interrupted.data.tags["sdd_search.outcome"] == "interrupted"
    assert client.search_model_versions("name='tiny-student'") == []
    assert mid_second_trial(logged_epochs(uri)), logged_epochs(uri)
    assert logged_epochs(uri, "reference") == [4, 4]
    study = optuna.load_study(study_name="tiny", storage=tuning.optuna_storage_url(spec))
    assert len(study.trials) == 2 and all(t.intermediate_values for t in study.trials)

    # More trials on resume would be half one search, half another: refused before Ray starts.
    assert_resume_refused(spec_path, tmp_path, "search.num_trials", 3, 2)

    # 2. A terminal: the resumed search's live view, then what it printed at its end.
    terminal = Tmux("resume")
    try:
        marks = f"SDD_SEARCH_CACHE={teacher_cache} {OWNER}={ray_owner.token}"
        command = f"env {marks} {sys.executable} -m sdd_search"
        terminal.start(f"{command} {spec_path} --resume", tmp_path)
        # A running trial's row (one that had ended before the Ctrl-C shows from the first step)
        during = terminal.wait_for(r"^trial-\w+ .* running\s*$")
        done = terminal.wait_for(r"^EXIT=", everything=True, timeout=400)
    finally:
        terminal.close()
    (tmp_path / "during.txt").write_text(during)  # the screens, for a look after the test
    (tmp_path / "done.txt").write_text(done)
    assert "EXIT=" not in during, during
    assert re.search(r"^search · tiny   trials [01]/2 done · [12] running   elapsed ", during, re.M)
    lines = during.splitlines()
    search_at = next(i for i, line in enumerate(lines) if line.startswith("search · tiny"))
    # The references' table is above (finished before the Ctrl-C); the search's below its header.
    header = next(line for line in lines[search_at:] if line.startswith("trial "))
    assert header.split()[:4] == ["trial", *KNOBS] and "epoch" in header
    assert "━" in during or "─" in during
    assert "EXIT=0" in done, done[-3000:]
    assert re.search(r"^search · tiny   trials 2/2 done · 0 running   elapsed ", done, re.M)
    assert re.search(r"^best val_top1 \d+\.\d\d%  trial-\w+  scales=", done, re.M)
    assert len(re.findall(r"^trial-\w+ .* (completed|stopped by ASHA)", done, re.M)) == 2, done
    assert not [leak for leak in LEAKS if leak in done], done[-3000:]
    assert "Leaderboard" in done and "[baseline]" in done and "[kd]" in done
    assert "mlflow ui --backend-store-uri sqlite:///" in done
    assert "registered tiny-student v1 (run trial-" in done and "registered tiny-student v2" in done
    assert "Successfully registered model" not in done  # MLflow's own notice, hidden
    # Where the trials' time went outside their training loops: the share, and every phase.
    assert re.search(r"orchestration overhead: \d+\.\d% of trial time", done), done[-2000:]
    (phases,) = [line for line in done.splitlines() if "median per trial:" in line]
    for phase in ("trial actor start", "train workers start", "worker imports", "shutdown"):
        assert re.search(rf"{phase} \d+\.\ds", phases), phases

    # 3. What MLflow holds: every run once, every epoch once, from 1.
    parent, children = child_runs(client, "sdd-search/tiny")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sdd_search.outcome"] == "finished"
    metrics = parent.data.metrics
    assert 0.0 < metrics["orchestration_overhead_fraction"] < 1.0
    assert metrics["overhead_s/train_workers_start"] > 0.0, metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "leaderboard.csv", "leaderboard.txt", "search_space.json"} <= artifacts
    roles = sorted(r.data.tags["sdd_search.role"] for r in children)
    assert roles == ["reference", "reference", "trial", "trial"]
    trial_ids = [r.data.tags["sdd_search.trial_id"] for r in children]
    assert len(set(trial_ids)) == len(trial_ids)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == "4"
        # The interrupted trial continued from its checkpoint, and the epochs it replayed
        # were not logged again; a finished run was not rerun.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        status = run.data.tags["sdd_search.status"]
        expected = [1, 2, 3, 4] if status == "completed" else [1, 2, 3]  # ASHA's rung: 3
        assert steps == expected, (status, steps)
        assert status in ("completed", "stopped")
    trial_runs = [r for r in children if r.data.tags["sdd_search.role"] == "trial"]
    for run in trial_runs:
        assert "knob.scales" in run.data.params and "knob.temperature" in run.data.params
    # The first trial is the spec's own point (baseline_first).
    assert 4.0 in {float(r.data.params["knob.temperature"]) for r in trial_runs}

    # 4. The champion loads back from the registry and predicts with the accuracy it was
    # logged with; the pyfunc flavour serves the same logits from a numpy batch.
    assert len(client.search_model_versions("name='tiny-student'")) == 2
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    champion_run = client.get_run(champion.run_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pytorch.load_model("models:/tiny-student@champion")
    _, _, val = build_datasets_and_loaders(
        "digits", root=None, batch_size=128, device=torch.device("cpu"), image_size=8
    )
    correct = seen = 0
    with torch.no_grad():
        for images, labels in val:
            logits = model(images)
            assert logits.shape == (labels.shape[0], 10)
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.shape[0]
    assert 100.0 * correct / seen == pytest.approx(champion_run.data.metrics["val_top1"], abs=1e-6)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-student@champion")
    batch = next(iter(val))[0][:4].numpy()
    np.testing.assert_allclose(
        pyfunc.predict(batch), model(torch.from_numpy(batch)).detach().numpy(), rtol=1e-5
    )

    # 5. The study after the resume, as optuna-dashboard opens it: every trial, its value.
    study = optuna.load_study(study_name="tiny", storage=tuning.optuna_storage_url(spec))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value is not None and t.intermediate_values for t in study.trials)
    assert sorted(t.user_attrs["epochs"] for t in study.trials) in ([3, 4], [4, 4])

    # 6. The same search again without --resume is a clear error, not an overwrite; resuming
    # a search that does not exist is one too.
    again = run_cli([str(spec_path)], cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "already exists" in again.stderr and "--resume" in again.stderr
    missing = run_cli(
        [str(spec_path), "--resume", "--set", "name=nothing-here"], cwd=tmp_path, timeout=120
    )
    assert missing.returncode == 2 and "no search" in missing.stderr
