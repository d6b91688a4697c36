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

import optuna
import pytest
from rich.console import Console

from sdd_search import live_view, tuning
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


def screen(progress: StageProgress, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=True)
    console.print(render(progress, 50, width))
    return console.file.getvalue()


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
    # The header: done / running / total, elapsed and time left (2 epochs a minute: 1 epoch of
    # the running trial, 2 each for the two not started), then the best score and its knobs.
    assert lines[0].strip() == (
        "search · tiny   trials 1/4 done · 1 running   elapsed 1m00s · ~2m30s left"
    )
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
        live_view.hide_chatter()
        logging.getLogger("ray._private.authentication").warning("Token authentication is on")
        logging.getLogger("ray.tune.tune").info("Total run time: 3 s")
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed")
        logging.getLogger("ray._private.worker").error("listen_error_messages: gone")
        kept = logging.getLogger(live_view.KEPT_RAY_WARNINGS[0])
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
        return self._tmux("capture-pane", "-p", "-t", self.name, "-S", "-")

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
def test_a_search_seen_in_a_terminal_and_in_a_log(write_spec, teacher_cache, tmp_path):
    """`sdd-search` writing to a file (one plain line per event), killed mid-search, then
    resumed in a terminal: the header and one row per trial, and no line of Ray's own log;
    the Optuna study holds every trial with its values, before and after the resume."""
    spec_path = write_spec({"search": {"num_trials": 2, "max_concurrent": 2}})
    spec = load_spec(spec_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}

    # 1. Not a terminal: plain lines, until both trials have trained their first epoch.
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "sdd_search", str(spec_path)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    epoch_line = re.compile(r"^\[search\] trial-\w+ epoch 1/2: val_top1 \d+\.\d\d% ", re.M)
    try:
        wait_for(
            lambda: len(epoch_line.findall(log_path.read_text())) == 2 or driver.poll(),
            300,
            "both trials' first epoch",
            log_path.read_text,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):  # its Ray dies with it (fate-shared)
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first = log_path.read_text()
    assert driver.returncode == -signal.SIGKILL, first[-3000:]
    started = re.findall(r"^\[search\] trial-\w+ started: (.*)$", first, re.M)
    assert len(started) == 2, first[-3000:]
    assert all(
        re.fullmatch(r"scales=\S.* temperature=\S+ complementary_weight=\S+", s) for s in started
    )
    assert "\x1b[" not in first and "━" not in first  # no redrawing in a log
    assert not [leak for leak in LEAKS if leak in first], first[-3000:]
    study = optuna.load_study(study_name="tiny", storage=tuning.optuna_storage_url(spec))
    assert len(study.trials) == 2 and all(t.intermediate_values for t in study.trials)

    # 2. A terminal: the resumed search's live view, then its leaderboard.
    terminal = Tmux("resume")
    try:
        command = f"env SDD_SEARCH_CACHE={teacher_cache} {sys.executable} -m sdd_search"
        terminal.start(f"{command} {spec_path} --resume", tmp_path)
        during = terminal.wait_for(r"^trial-\w+ ")  # the first trial's row
        done = terminal.wait_for(r"^EXIT=", everything=True)
    finally:
        terminal.close()
    (tmp_path / "during.txt").write_text(during)  # the screens, for a look after the test
    (tmp_path / "done.txt").write_text(done)
    assert "EXIT=" not in during, during
    assert re.search(r"^search · tiny   trials [01]/2 done · [12] running   elapsed ", during, re.M)
    header = next(line for line in during.splitlines() if line.startswith("trial "))
    assert header.split()[:4] == ["trial", *KNOBS] and "epoch" in header
    assert "━" in during or "─" in during
    assert "EXIT=0" in done, done[-3000:]
    assert re.search(r"^search · tiny   trials 2/2 done · 0 running   elapsed ", done, re.M)
    assert re.search(r"^best val_top1 \d+\.\d\d%  trial-\w+  scales=", done, re.M)
    assert len(re.findall(r"^trial-\w+ .* completed", done, re.M)) == 2, done[-3000:]
    assert "Leaderboard" in done and "browse every trial" in done
    assert not [leak for leak in LEAKS if leak in done], done[-3000:]

    # 3. The study after the resume, as optuna-dashboard opens it: every trial, its value.
    study = optuna.load_study(study_name="tiny", storage=tuning.optuna_storage_url(spec))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value is not None and t.intermediate_values for t in study.trials)
    assert sorted(t.user_attrs["epochs"] for t in study.trials) == [2, 2]
