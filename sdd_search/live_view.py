"""The live view of a running search: what each stage is doing, instead of Ray Tune's table.

One :class:`LiveView` (a Tune callback) per Tune experiment (the ``references``, the
``search``, the ``final`` stage) follows its trials in a :class:`StageProgress`. In a
terminal it redraws, with rich, a header (trials done / running / total, the best selection
score so far and its knobs, elapsed and estimated time left) above one row per trial (its
knobs, an epoch progress bar, current and best score, how it ended)::

    search · tiny   trials 3/8 done · 2 running   elapsed 1m23s · ~2m10s left
    best val_top1 97.22%  trial-4b4d0205  scales=[1, 2] temperature=4.12 ...
    trial           scales  temperature  progress    epoch  val_top1    best   loss  state
    trial-56088443  [1, 2]  5.219        ━━━━━─────    2/4    95.31%  95.31%  0.412  running
    trial-4b4d0205  [1]     4.12         ━━━━━─────    2/4    91.04%  92.71%  0.533  stopped by ASHA

Anywhere else (CI, ``| tee``, a cluster log) it prints one plain line per event: a trial
started with its knobs, each epoch's score, a trial completed, stopped or failed.
:func:`sdd_search.chatter.hide_chatter` keeps Ray's, Optuna's and MLflow's informational logs
out of both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from ray.tune import Callback

from sdd_search.space import BASE_SPECIFIC, config_of, searched_params, trial_display_name
from sdd_search.trial import RESTORE_KEY

NAN = float("nan")
_FINISHED_STATES = ("completed", "stopped", "failed")


# --------------------------------------------------------------------------------------------
# What a stage is doing


@dataclass
class TrialRow:
    """One trial as the view shows it; ``state``: running, completed, stopped, failed or
    retrying; ``note``: why it stopped or failed, in one line."""

    name: str
    knobs: dict[str, Any]
    epochs: int
    epoch: int = 0
    score: float = NAN
    best: float = NAN
    loss: float = NAN
    state: str = "running"
    note: str = ""
    order: int = 0
    # For the time left: when this run (re)started here, its first and latest fresh epoch.
    started_at: float = NAN
    first_epoch_at: float = NAN
    last_epoch_at: float = NAN
    fresh_epochs: int = 0


@dataclass
class StageProgress:
    """The trials of one stage and what happened to them; each event method returns the plain
    line that reports it (None: nothing to say).

    ``stage``: "references", "search" or "final"; ``search``: the search's name;
    ``metric``/``mode``: the spec's (the final stage shows its test counterpart and no best:
    test numbers choose nothing); ``knobs``: the searched knobs shown, as the spec names them;
    ``epochs``: a trial's epochs, for trials not started yet; ``asha``: whether ASHA may stop
    trials early; ``clock``: seconds (time.time).
    """

    stage: str
    search: str
    metric: str
    mode: str
    knobs: list[str]
    epochs: int
    asha: bool = False
    total: int = 0
    clock: Any = time.time
    rows: dict[str, TrialRow] = field(default_factory=dict)
    done: int = 0
    running: int = 0
    started: float = 0.0
    trained_epochs: int = 0  # epochs trained (not replayed) since the stage started here
    peak_running: int = 0  # the most trials seen running at once: the stage's concurrency
    ended: bool = False

    def __post_init__(self):
        self.started = self.started or self.clock()

    @property
    def score_key(self) -> str:
        if self.stage == "final" and self.metric.startswith("val_"):
            return "test_" + self.metric.removeprefix("val_")
        return self.metric

    # ---- events

    def count(self, trials) -> None:
        """Done and running from Tune's trial list (it holds trials finished before a resume);
        a trial this view saw end counts as done whatever Tune's status says yet."""
        if trials is None:
            return
        ended = {tid for tid, row in self.rows.items() if row.state in _FINISHED_STATES}
        self.total = max(self.total, len(trials))
        self.done = sum(t.status in ("TERMINATED", "ERROR") or t.trial_id in ended for t in trials)
        self.running = sum(t.status == "RUNNING" and t.trial_id not in ended for t in trials)

    def _recount(self, trials, started: int = 0, finished: int = 0) -> None:
        if trials is not None:
            self.count(trials)
        else:
            self.running = max(0, self.running + started - finished)
            self.done += finished

    def start(
        self, trial_id: str, name: str, knobs: dict, epochs: int, trials=None, resumed=False
    ) -> str:
        row = self.rows.get(trial_id)
        already_running = row is not None and row.state == "running"
        if row is None:
            row = self.rows[trial_id] = TrialRow(name, knobs, epochs, order=len(self.rows))
        row.state, row.note = "running", ""
        if not already_running:
            row.started_at, row.first_epoch_at, row.fresh_epochs = self.clock(), NAN, 0
        self._recount(trials, started=0 if already_running else 1)
        self.peak_running = max(self.peak_running, self.running)
        verb = "resumed" if resumed else "started"
        return f"{self._prefix(row)} {verb}" + (f": {format_knobs(knobs)}" if knobs else "")

    def restored(self, trial_id: str, result: dict) -> str | None:
        """The line for a trial resumed past an unreadable checkpoint (torn, or not a trial's):
        which it fell back to, or that it restarted (the first result after the restart says)."""
        row, note = self.rows.get(trial_id), result.get(RESTORE_KEY)
        return f"{self._prefix(row)} {note}" if row is not None and note else None

    def result(self, trial_id: str, result: dict) -> str | None:
        row = self.rows.get(trial_id)
        if row is None:
            return None
        epoch = int(result.get("epoch") or 0)
        if result.get("nonfinite_loss"):
            row.note = str(result.get("stop_reason") or "non-finite loss")
            return None
        if not result.get("replayed"):
            self.trained_epochs += max(0, epoch - row.epoch)
            now = self.clock()
            if math.isnan(row.first_epoch_at):
                row.first_epoch_at = now
            row.last_epoch_at, row.fresh_epochs = now, row.fresh_epochs + 1
        row.epoch = max(row.epoch, epoch)
        row.loss = float(result.get("train_loss", row.loss))
        if self.score_key in result:
            row.score = float(result[self.score_key])
            row.best = _better(row.best, row.score, self.mode)
        if result.get("replayed"):
            return None
        return f"{self._prefix(row)} epoch {epoch}/{row.epochs}: {self._scores(row)}"

    def complete(self, trial_id: str, last: dict | None, trials=None) -> str | None:
        row = self.rows.get(trial_id)
        if row is None:
            return None
        self._settle(row, last or {})
        self._recount(trials, finished=1)
        said = "completed"
        if row.state == "stopped":
            why = row.note if row.note.startswith("by ") else f"({row.note})"
            said = f"stopped {why} after epoch {row.epoch} of {row.epochs}"
        return f"{self._prefix(row)} {said}: {self._scores(row)} · {self._tally()}"

    def _settle(self, row: TrialRow, last: dict) -> None:
        row.epoch = max(row.epoch, int(last.get("epoch") or 0))
        if last.get("nonfinite_loss"):
            row.state = "stopped"
            row.note = row.note or "non-finite loss"
        elif row.epoch >= row.epochs:
            row.state, row.note = "completed", ""
        else:
            row.state, row.note = "stopped", "by ASHA" if self.asha else "by the scheduler"

    def ended_before(self, trial_id, name, knobs, epochs, last: dict, best=NAN, failure=None):
        """A trial that ended before this run of the stage (a resume): its row as it ended,
        from Tune's trial (no line: it was said when it happened)."""
        row = self.rows[trial_id] = TrialRow(name, knobs, epochs, order=-len(self.rows) - 1)
        row.loss = float(last.get("train_loss", NAN))
        row.score = float(last.get(self.score_key, NAN))
        row.best = row.score if math.isnan(best) else best
        self._settle(row, last)
        if failure is not None:
            row.state, row.note = "failed", failure

    def error(self, trial_id: str, reason: str, trials=None, retrying=False) -> str | None:
        row = self.rows.get(trial_id)
        if row is None:
            return None
        row.state, row.note = ("retrying" if retrying else "failed"), reason
        if retrying:
            return f"{self._prefix(row)} failed, retrying: {reason}"
        self._recount(trials, finished=1)
        return f"{self._prefix(row)} failed: {reason} · {self._tally()}"

    def begin(self) -> str:
        return f"[{self.stage}] {self.search}: {self.total} trials"

    def end(self) -> str:
        self.ended = True
        states = [r.state for r in self.rows.values()]
        parts = [f"{states.count(s)} {s}" for s in _FINISHED_STATES if states.count(s)]
        unfinished = len(states) - sum(s in _FINISHED_STATES for s in states)
        if unfinished:  # Ctrl-C, or an error outside the trials: --resume continues them
            parts.append(f"{unfinished} unfinished")
        verb = "interrupted after" if unfinished else "finished in"
        line = f"[{self.stage}] {verb} {format_seconds(self.elapsed())}: " + (
            ", ".join(parts) or "no trial ran here"
        )
        best = self.best_row()
        if best is not None:
            line += f"; best {self.score_key} {format_score(self.score_key, best.score)} "
            line += f"{best.name}" + (f" ({format_knobs(best.knobs)})" if best.knobs else "")
        return line

    # ---- what the header says

    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.started)

    def seconds_left(self) -> float | None:
        """Time left at the pace measured so far: seconds per epoch (between a trial's own
        epoch reports, so start-up is not counted per epoch) and each trial's start-up (start
        to first epoch, less one epoch; what is left of it for a trial still starting), spread
        over the trials that run at once. None until some trial has reported two fresh epochs.
        An upper bound where ASHA stops trials."""
        paced = [r for r in self.rows.values() if r.fresh_epochs >= 2]
        if not paced:
            return None
        per_epoch = median(
            (r.last_epoch_at - r.first_epoch_at) / (r.fresh_epochs - 1) for r in paced
        )
        started = [r for r in self.rows.values() if not math.isnan(r.first_epoch_at)]
        startup = max(0.0, median(r.first_epoch_at - r.started_at for r in started) - per_epoch)
        unfinished = [r for r in self.rows.values() if r.state not in _FINISHED_STATES]
        work = sum(max(0, r.epochs - r.epoch) for r in unfinished) * per_epoch
        now = self.clock()
        for row in unfinished:  # started, no epoch yet: what is left of its start-up
            if math.isnan(row.first_epoch_at):
                work += max(0.0, startup - (now - row.started_at))
        waiting = max(0, self.total - self.done - len(unfinished))  # not started yet
        work += waiting * (startup + self.epochs * per_epoch)
        return work / max(1, self.peak_running, self.running)

    def best_row(self) -> TrialRow | None:
        """The trial with the best selection score so far (its latest value: the one the
        leaderboard ranks by); None in the final stage or before any score."""
        if self.stage == "final":
            return None
        scored = [r for r in self.rows.values() if not math.isnan(r.score)]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda r: r.score)

    def header(self) -> str:
        left = self.seconds_left()
        eta = f" · ~{format_seconds(left)} left" if left is not None and not self.ended else ""
        return (
            f"{self.stage} · {self.search}   trials {self.done}/{self.total} done · "
            f"{self.running} running   elapsed {format_seconds(self.elapsed())}{eta}"
        )

    def best_line(self) -> str | None:
        best = self.best_row()
        if best is None:
            return None
        knobs = f"  {format_knobs(best.knobs)}" if best.knobs else ""
        return (
            f"best {self.score_key} {format_score(self.score_key, best.score)}  {best.name}{knobs}"
        )

    def shown_rows(self, limit: int) -> list[TrialRow]:
        """Running trials first (in start order), then the latest finished; when the stage has
        ended, every trial by its score, best first."""
        rows = list(self.rows.values())
        if self.ended:
            sign = -1 if self.mode == "max" else 1
            rows.sort(
                key=lambda r: (math.isnan(r.score), sign * (0 if math.isnan(r.score) else r.score))
            )
            return rows[:limit]
        active = sorted((r for r in rows if r.state not in _FINISHED_STATES), key=lambda r: r.order)
        finished = sorted((r for r in rows if r.state in _FINISHED_STATES), key=lambda r: -r.order)
        return (active + finished)[:limit]

    # ---- plain wording

    def _prefix(self, row: TrialRow) -> str:
        return f"[{self.stage}] {row.name}"

    def _scores(self, row: TrialRow) -> str:
        key = self.score_key
        text = f"{key} {format_score(key, row.score)}"
        if self.stage != "final" and not math.isnan(row.best):
            text += f" (best {format_score(key, row.best)})"
        if not math.isnan(row.loss):
            text += f", loss {row.loss:.4g}"
        return text

    def _tally(self) -> str:
        return f"{self.done}/{self.total} done, {format_seconds(self.elapsed())}"


def _better(best: float, value: float, mode: str) -> float:
    if math.isnan(best):
        return value
    if math.isnan(value):
        return best
    return max(best, value) if mode == "max" else min(best, value)


def format_score(metric: str, value: float) -> str:
    """A metric as the leaderboard shows it: accuracies (``*top1``, ``*top5``, in percent)
    with two decimals and a percent sign, others to 4 significant digits; "-" for none."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}%" if "top" in metric else f"{value:.4g}"


def format_value(value: Any) -> str:
    """A knob's value in short form: floats to 4 significant digits, lists as written."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_knobs(knobs: dict[str, Any]) -> str:
    """``scales=[1, 2] temperature=4.12 ...``: the knobs a trial uses (not another base's)."""
    base = knobs.get("base")
    return " ".join(
        f"{k}={format_value(v)}"
        for k, v in knobs.items()
        if k not in BASE_SPECIFIC or not base or BASE_SPECIFIC[k] == base
    )


def format_seconds(seconds: float) -> str:
    """1h02m, 4m05s, 37s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# --------------------------------------------------------------------------------------------
# The terminal's picture


BAR_WIDTH = 10  # characters of the epoch bar
STATE_STYLES = {"completed": "green", "stopped": "yellow", "failed": "red", "retrying": "red"}


def render(progress: StageProgress, height: int = 50, width: int = 160):
    """The rich renderable of ``progress``: the header lines over a table of trials, as many
    rows as ``height`` (the terminal's lines) leaves room for, fitted to ``width``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    key, final = progress.score_key, progress.stage == "final"
    names = ["trial", *progress.knobs, "progress", "epoch", key, *([] if final else ["best"])]
    names += ["loss", "state"]
    body = [_row_cells(progress, row) for row in progress.shown_rows(max(3, height - 7))]
    columns = zip(*body, strict=True) if body else [[] for _ in names]
    widths = [max((cell.cell_len for cell in column), default=0) for column in columns]
    heads, kept, state_width = _fit(names, widths, width)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for index in kept:
        name, widest = names[index], widths[index]
        numeric = index >= len(progress.knobs) + 2 and name != "state"
        longest = max(len(line) for line in heads[index].split("\n"))
        table.add_column(
            heads[index],
            no_wrap=True,
            overflow="ellipsis",
            justify="right" if numeric else "left",
            # values never shrink (their headers may); the state (a failure's reason) is cut
            min_width=max(widest, longest if numeric else 1) if name != "state" else None,
            max_width=state_width if name == "state" else None,
        )
    for cells in body:
        table.add_row(*(cells[index] for index in kept))
    lines = [Text(progress.header(), style="bold")]
    best = progress.best_line()
    if best:
        lines.append(Text(best, style="cyan"))
    if not body:  # e.g. a stage that had finished before a resume: its header says it all
        return Group(*lines)
    return Group(*lines, table)


def _fit(names: list[str], widths: list[int], width: int) -> tuple[list[str], list[int], int]:
    """(the column headers, the columns kept, the state column's width) for a table ``width``
    wide: the names as they are; else those longer than their values split after each
    underscore (``complementary_`` over ``weight``); else without the epoch bar too (``epoch``
    still says x/y). The state column (last) gets what is left, at least 9."""
    split = [n.replace("_", "_\n") if len(n) > w else n for n, w in zip(names, widths, strict=True)]
    everything = list(range(len(names)))
    for heads, kept in (
        (names, everything),
        (split, everything),
        (split, [i for i in everything if names[i] != "progress"]),
    ):
        longest = [max(len(line) for line in heads[i].split("\n")) for i in kept[:-1]]
        used = sum(max(h, widths[i]) for h, i in zip(longest, kept[:-1], strict=True))
        used += 2 * (len(kept) - 1)
        if used + min(widths[-1], 16) <= width:  # room for the state, cut first
            break
    return heads, kept, max(9, width - used)


def epoch_bar(epoch: int, epochs: int, width: int = BAR_WIDTH):
    """``━━━━━─────``: the epochs done out of ``epochs``, readable without colours too."""
    from rich.text import Text

    done = round(width * min(epoch, epochs) / max(epochs, 1))
    bar = Text("━" * done, style="green")
    bar.append("─" * (width - done), style="grey50")
    return bar


def _row_cells(progress: StageProgress, row: TrialRow) -> list:
    """One table row as rich Texts, in the columns' order."""
    from rich.text import Text

    key = progress.score_key
    texts = [
        row.name,
        *_row_knobs(row, progress.knobs),
        epoch_bar(row.epoch, row.epochs),
        f"{row.epoch}/{row.epochs}",
        format_score(key, row.score),
        *([] if progress.stage == "final" else [format_score(key, row.best)]),
        "-" if math.isnan(row.loss) else f"{row.loss:.4g}",
        Text(_state_text(row), style=STATE_STYLES.get(row.state, "")),
    ]
    return [Text(t) if isinstance(t, str) else t for t in texts]


def _state_text(row: TrialRow) -> str:
    if row.state in ("failed", "retrying") or (row.state == "stopped" and row.note[:3] != "by "):
        return f"{row.state}: {row.note}"
    return f"{row.state} {row.note}".strip()


def _row_knobs(row: TrialRow, knobs: list[str]) -> list[str]:
    base = row.knobs.get("base")
    unused = {k for k in knobs if k in BASE_SPECIFIC and base and BASE_SPECIFIC[k] != base}
    return ["-" if k not in row.knobs or k in unused else format_value(row.knobs[k]) for k in knobs]


# --------------------------------------------------------------------------------------------
# The Tune callback


class LiveView(Callback):
    """Tune callback: the live view of one stage (:class:`StageProgress`'s arguments).

    ``terminal``: redraw with rich (True), print plain lines (False), or decide by whether
    stdout is a terminal (None). Picklable (Tune keeps its callbacks in the experiment state):
    the console and the live display are made when the stage starts; :meth:`close` stops the
    display if the stage ends without Tune saying so (Ctrl-C, an error).
    """

    def __init__(self, terminal: bool | None = None, **progress: Any):
        self.terminal = terminal
        self.progress = StageProgress(**progress)
        self._settings = progress
        self._live = None
        self._console = None
        self._epochs: dict[str, int] = {}
        self._set_up = False  # setup() ran: Tune started the stage

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_live"] = state["_console"] = None
        state["progress"], state["_set_up"] = None, False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.progress = StageProgress(**self._settings)

    # ---- Tune's calls

    def setup(self, total_num_samples: int | None = None, **info):
        from rich.console import Console

        self.progress = StageProgress(**self._settings)
        self._set_up = True
        if total_num_samples:
            self.progress.total = total_num_samples
        self._console = Console()
        terminal = self.terminal
        if terminal is None:
            terminal = self._console.is_terminal and not self._console.is_dumb_terminal
        if terminal:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._renderable,
                console=self._console,
                refresh_per_second=2,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start()
        else:
            self._say(self.progress.begin())

    def on_step_begin(self, iteration, trials, **info):
        for trial in trials:  # ended before a resume: Tune says nothing more of them
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.progress.rows:
                scores = trial.metric_analysis.get(self.progress.score_key, {})
                failure = _error_line(trial) if trial.status == "ERROR" else None
                last, best = trial.last_result or {}, scores.get(self.progress.mode, NAN)
                self.progress.ended_before(*self._describe(trial), last, best, failure)
        self.progress.count(trials)

    on_step_end = on_step_begin

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(self.progress.start(*self._describe(trial), trials=trials))

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._say(self.progress.start(*self._describe(trial), trials=trials, resumed=True))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.progress.rows:  # restored without a start
            self._say(self.progress.start(*self._describe(trial), trials=trials, resumed=True))
        self._tell(self.progress.restored(trial.trial_id, result))
        self._say(self.progress.result(trial.trial_id, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(self.progress.complete(trial.trial_id, trial.last_result, trials))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(self.progress.error(trial.trial_id, _error_line(trial), trials))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(self.progress.error(trial.trial_id, _error_line(trial), trials, retrying=True))

    def on_experiment_end(self, trials, **info):
        self.on_step_begin(0, trials)  # a stage that had ended before the resume: no step
        self.close()

    def close(self) -> None:
        """End the stage's view: the last picture stays on the screen (or a closing line)."""
        if self.progress.ended or not self._set_up:
            return
        line = self.progress.end()
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
        else:
            self._say(line)

    # ---- helpers

    def _renderable(self):
        size = self._console.size
        return render(self.progress, size.height, size.width)

    def _describe(self, trial) -> tuple[str, str, dict, int]:
        config = trial.config
        if trial.trial_id not in self._epochs:
            self._epochs[trial.trial_id] = config_of(config).train.epochs
        name = trial_display_name(config, trial.trial_id)
        return trial.trial_id, name, searched_params(config), self._epochs[trial.trial_id]

    def _say(self, line: str | None) -> None:
        """A plain line per event where there is no live view (the view shows it otherwise)."""
        if line is None or self._live is not None:
            return
        print(line, flush=True)

    def _tell(self, line: str | None) -> None:
        """A line the user must read either way: above the live view (it redirects stdout
        there), or as a plain line."""
        if line is not None:
            print(line, flush=True)


def _error_line(trial) -> str:
    from sdd_search.mlflow_callback import error_summary

    return error_summary(trial)
