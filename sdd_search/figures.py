"""The search's figures: what it learned about SDD's knobs, and how its students trained.

    the Optuna study (its RDB storage) --optuna.visualization.matplotlib--> knob importances,
        optimization history, parallel coordinates, slices of the continuous knobs
    the MLflow runs --matplotlib--> learning curves (the best searched trial against plain KD
        and the baseline), the final stage's test top-1 per seed

Each figure is a PNG in ``<experiment path>/figures/`` (local storage) and an artifact of the
search's parent MLflow run under ``figures/``. A figure that cannot be made yet (too few
trials, no final stage) is skipped with a one-line note; a figure never fails a search.
Headless: matplotlib's Agg backend, no display needed. No Ray.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdd_search import final_stage, leaderboard
from sdd_search.spec import Spec
from sdd_search.tracking import TAG_ROLE, TAG_TRIAL, sqlite_file
from sdd_search.tuning import optuna_storage_url  # where the search keeps its study

FIGURE_FOLDER = "figures"  # under the experiment path, and in the parent run's artifacts
DPI = 120
CURVE_METRIC = "val_top1"  # the learning curves: top-1 on the selection split, each epoch
REFERENCE_STYLE = {"kd": ("tab:orange", "--"), "baseline": ("tab:gray", ":")}


class FigureSkipped(Exception):
    """A figure that cannot be made from what the search has logged so far (the message)."""


@dataclass
class Sources:
    """What the figures are drawn from: the spec, the study (None: not on disk), the search's
    MLflow child runs and their metric histories (read once, cached)."""

    spec: Spec
    study: Any
    runs: list
    client: Any
    _histories: dict = field(default_factory=dict)

    def history(self, run_id: str, key: str) -> list:
        if (run_id, key) not in self._histories:
            self._histories[(run_id, key)] = self.client.get_metric_history(run_id, key)
        return self._histories[(run_id, key)]

    def role(self, role: str) -> list:
        return [r for r in self.runs if r.data.tags.get(TAG_ROLE) == role]


def make_figures(spec: Spec, tracker, *, log: Callable[[str], None] = print) -> list[str]:
    """Draw every figure the search's logs allow, write them, log them to the parent run.

    ``tracker``: the search's MLflow side (anything with ``client``, ``experiment_id`` and
    ``parent_run_id``: a :class:`sdd_search.tracking.SearchTracker`, or the report's view of a
    search); ``log``: where the one-line notes go. Returns the PNG paths written (local
    storage) or the artifact paths logged (remote storage).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless, before pyplot is imported
    import matplotlib.pyplot as plt

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'",
        max_results=5000,
    )
    sources = Sources(spec, _load_study(spec, log), runs, tracker.client)
    local = "://" not in spec.experiment_path()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(spec.experiment_path()) / FIGURE_FOLDER if local else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        made = []
        for name, draw in FIGURES.items():
            with plt.rc_context(), warnings.catch_warnings():  # Optuna sets its own style
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning, layout hints
                try:
                    figure = draw(sources)
                except FigureSkipped as reason:
                    if str(reason):  # an empty reason: said once already (no study)
                        log(f"figure {name}: skipped ({reason})")
                    continue
                except Exception as error:  # a figure is a view: it never stops the search
                    log(f"figure {name}: not made ({type(error).__name__}: {error})")
                    plt.close("all")
                    continue
                path = folder / f"{name}.png"
                figure.savefig(path, dpi=DPI, bbox_inches="tight")
                plt.close("all")
            try:
                tracker.client.log_artifact(tracker.parent_run_id, str(path), FIGURE_FOLDER)
            except Exception as error:  # MLflow unreachable: the file is still there
                log(f"figure {name}: not logged to MLflow ({type(error).__name__}: {error})")
                continue
            made.append(str(path) if local else f"{FIGURE_FOLDER}/{path.name}")
    return made


def _load_study(spec: Spec, log):
    """The search's Optuna study from its storage, or None (with a note) when absent."""
    if not spec.space:
        log("figures from Optuna: skipped (the spec searches no knob)")
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = optuna_storage_url(spec)
    if (path := sqlite_file(url)) is not None and not path.is_file():
        log(f"figures from Optuna: skipped (no study at {url})")  # never create an empty one
        return None
    try:
        return optuna.load_study(study_name=spec.name, storage=url)
    except KeyError:
        log(f"figures from Optuna: skipped (no study {spec.name!r} in {url})")
        return None


# -- the Optuna figures: Optuna's own plots, titled and sized to read ------------------------


def _target_name(spec: Spec) -> str:
    metric = spec.search.metric
    return f"{metric} (%)" if "top" in metric else metric


def _complete(sources: Sources) -> list:
    if sources.study is None:
        raise FigureSkipped("")  # _load_study said why, once for the four
    import optuna

    trials = sources.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not trials:
        raise FigureSkipped("no completed trial in the study yet")
    return trials


def _retitle(ax) -> None:
    """Drop the title Optuna centres on its plots (ours goes on the left); colour maps that
    start at a blue dark enough to see on white (Optuna's Blues draws its lowest value white:
    that trial's line or dot disappears)."""
    ax.set_title("", loc="center")
    for collection in ax.collections:
        if collection.get_array() is None:
            continue
        collection.set_cmap(_visible_blues())
        if getattr(collection, "colorbar", None) is not None:
            collection.colorbar.update_normal(collection)


def _visible_blues():
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    blues = colormaps["Blues"]
    return LinearSegmentedColormap.from_list("visible_blues", blues(np.linspace(0.3, 1.0, 256)))


def _full_name(label: str, names: list[str]) -> str:
    if label.endswith("..."):
        return next((n for n in names if n.startswith(label.removesuffix("..."))), label)
    return label


def _figure_of(axes) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def param_importances(sources: Sources):
    """Which knobs mattered for the metric (Optuna's default evaluator, PED-ANOVA)."""
    from optuna.visualization.matplotlib import plot_param_importances

    trials = _complete(sources)
    varying = {
        name
        for name in {p for t in trials for p in t.params}
        if len({repr(t.params.get(name)) for t in trials}) > 1
    }
    if len(trials) < 2 or not varying:
        raise FigureSkipped(
            f"needs 2 or more completed trials whose knobs differ; the study has {len(trials)}"
        )
    spec = sources.spec
    ax = plot_param_importances(sources.study, target_name=_target_name(spec))
    if ax.get_legend() is not None:
        ax.get_legend().remove()  # one objective: the title names it
    _retitle(ax)
    ax.set_title(
        f"Knob importances for {spec.search.metric} ({spec.name}, {len(trials)} trials)", loc="left"
    )
    ax.set_xlabel("importance (share of the metric's variation, sums to 1)")
    ax.set_ylabel("knob")
    figure = ax.figure
    figure.set_size_inches(8, 1.6 + 0.45 * len(varying))
    return figure


def optimization_history(sources: Sources):
    from optuna.visualization.matplotlib import plot_optimization_history

    trials = _complete(sources)
    spec = sources.spec
    ax = plot_optimization_history(sources.study, target_name=_target_name(spec))
    _retitle(ax)
    ax.set_title(
        f"Optimization history ({spec.name}: {spec.search.mode} {spec.search.metric}, "
        f"{len(trials)} completed trials)",
        loc="left",
    )
    ax.set_xlabel("trial (in the order Optuna sampled it)")
    _whole_numbers(ax.xaxis)
    ax.set_ylabel(f"{_target_name(spec)} on the selection split")
    figure = ax.figure
    figure.set_size_inches(8, 4.5)
    return figure


def parallel_coordinate(sources: Sources):
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    trials = _complete(sources)
    spec = sources.spec
    ax = plot_parallel_coordinate(sources.study, target_name=_target_name(spec))
    _retitle(ax)
    names = [_target_name(spec), *spec.space]
    ax.set_xticks(  # Optuna cuts long knob names ("complementary_wei..."): the spec's names
        ax.get_xticks(), [_full_name(t.get_text(), names) for t in ax.get_xticklabels()]
    )
    ax.set_title(
        f"Parallel coordinates: each line one trial, coloured by {spec.search.metric} "
        f"({len(trials)} trials)",
        loc="left",
    )
    figure = ax.figure
    figure.set_size_inches(max(8, 1.8 * (len(spec.space) + 1)), 5)
    return figure


def continuous_slices(sources: Sources):
    """The metric against each continuous knob (a {low, high} range in the spec)."""
    from optuna.visualization.matplotlib import plot_slice

    trials = _complete(sources)
    spec = sources.spec
    sampled = {p for t in trials for p in t.params}
    knobs = [k for k, s in spec.space.items() if s.choices is None and k in sampled]
    if not knobs:
        raise FigureSkipped("the spec searches no continuous knob")
    axes = plot_slice(sources.study, params=knobs, target_name=_target_name(spec))
    figure = _figure_of(axes)
    for ax in axes.flat if hasattr(axes, "flat") else [axes]:
        _retitle(ax)
        ax.set_xlabel(ax.get_xlabel(), fontsize=11)  # Optuna names each axis by the knob
        if ax.get_xscale() == "log":  # minor labels (2x10^-2, 3x10^-2...) overlap: plain ticks
            _plain_log_ticks(ax)
    figure.suptitle(
        f"{spec.search.metric} against each continuous knob ({len(trials)} trials; "
        "colour: trial number)",
        x=0.02,
        ha="left",
    )
    figure.set_size_inches(max(6, 4.2 * len(knobs)), 4.5)
    return figure


def _plain_log_ticks(ax) -> None:
    """A log axis labelled at a few plain numbers (0.01, 0.02, 0.05...), no minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=6))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# -- the MLflow figures -----------------------------------------------------------------------


def _curve(sources: Sources, run) -> tuple[list[int], list[float]]:
    points = sorted((m.step, m.value) for m in sources.history(run.info.run_id, CURVE_METRIC))
    return [s for s, _ in points], [v for _, v in points]


def _best_searched(sources: Sources):
    """The run of the best searched trial: the final stage's champion's source trial when it
    ran (chosen by selection score), else the leaderboard's first."""
    searched = sources.role("trial")
    report = _final_report(sources)
    if report is not None and report.champion:
        source = report.summary(report.champion).entry.source_trial
        run = next((r for r in searched if r.data.tags.get(TAG_TRIAL) == source), None)
        if run is not None:
            return run
    spec = sources.spec
    rows = leaderboard.rows_from_mlflow(
        searched, spec.search.metric, spec.search.mode, sources.history
    )
    ranked = [
        r for r in leaderboard.ranked(rows, spec.search.mode) if not math.isnan(r["metric_final"])
    ]
    if not ranked:
        return None
    return next(r for r in searched if r.data.tags.get(TAG_TRIAL) == ranked[0]["trial"])


def learning_curves(sources: Sources):
    """Top-1 on the selection split per epoch: the best searched trial (bold), the other
    searched trials (thin), plain KD and the label-only baseline."""
    import matplotlib.pyplot as plt

    best = _best_searched(sources)
    if best is None:
        raise FigureSkipped("no searched trial has a selection score yet")
    figure, ax = plt.subplots(figsize=(8, 5))
    others = [r for r in sources.role("trial") if r.info.run_id != best.info.run_id]
    for index, run in enumerate(others):
        ax.plot(
            *_curve(sources, run),
            color="tab:blue",
            alpha=0.3,
            linewidth=1,
            marker=".",
            label="other searched trials" if index == 0 else None,
        )
    for run in sorted(sources.role("reference"), key=lambda r: r.info.run_name):
        colour, style = REFERENCE_STYLE.get(run.info.run_name, ("black", "-."))
        label = {"kd": "[kd] plain KD", "baseline": "[baseline] no teacher"}.get(run.info.run_name)
        ax.plot(
            *_curve(sources, run),
            color=colour,
            linestyle=style,
            linewidth=2,
            marker="s",
            markersize=4,
            label=label or f"[{run.info.run_name}]",
        )
    ax.plot(
        *_curve(sources, best),
        color="tab:blue",
        linewidth=2.5,
        marker="o",
        markersize=5,
        label=f"best searched: {best.info.run_name}",
    )
    spec = sources.spec
    ax.set_title(
        f"Learning curves on the selection split ({spec.name}, search schedule)", loc="left"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("selection top-1 (%)")
    _epoch_ticks(ax, [_curve(sources, run)[0] for run in [best, *others]])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure


def _epoch_ticks(ax, epochs: list[list[int]]) -> None:
    """Whole epochs on the x axis (a one-epoch search included: one tick, not 0.96 ... 1.04)."""
    last = max((max(steps) for steps in epochs if steps), default=1)
    ax.set_xlim(0.75, last + 0.25)
    _whole_numbers(ax.xaxis)


def _whole_numbers(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _final_report(sources: Sources):
    finals = sources.role("final")
    if not finals:
        return None
    entries = final_stage.entries_from_runs(finals)
    if not any(e.test_top1 for e in entries):
        return None
    from sdd_search import final_report, paper

    spec = sources.spec
    return final_report.summarise(
        entries,
        metric=spec.search.metric,
        mode=spec.search.mode,
        paper=paper.published_numbers(spec),
    )


def final_test_scores(sources: Sources):
    """The final stage: each configuration's test top-1 per seed (dots), mean +- std (bar)."""
    import matplotlib.pyplot as plt

    if not sources.spec.final:
        raise FigureSkipped("the spec has no final stage")
    report = _final_report(sources)
    if report is None:
        raise FigureSkipped("no final-stage run has finished yet")
    summaries = [s for s in report.summaries if s.entry.test_top1]
    figure, ax = plt.subplots(figsize=(max(6, 1.5 * len(summaries) + 2), 5))
    rng = np.random.default_rng(0)
    for x, s in enumerate(summaries):
        scores = [s.entry.test_top1[seed] for seed in s.entry.seeds]
        colour = REFERENCE_STYLE.get(s.entry.role, ("tab:blue", ""))[0]
        if s.entry.role == "paper":
            colour = "tab:green"
        jitter = rng.uniform(-0.08, 0.08, len(scores)) if len(scores) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), scores, color=colour, alpha=0.7, s=36, zorder=3)
        std = 0.0 if math.isnan(s.std) else s.std
        ax.errorbar(
            x + 0.25, s.mean, yerr=std, fmt="_", color="black", markersize=18, capsize=5, zorder=4
        )
        spread = f" ± {s.std:.2f}" if not math.isnan(s.std) else ""
        ax.annotate(
            f"{s.mean:.2f}{spread}",
            (x + 0.3, s.mean),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    names = [
        s.entry.name + ("\n(champion)" if s.entry.name == report.champion else "")
        for s in summaries
    ]
    ax.set_xticks(range(len(summaries)), names)
    ax.set_xlim(-0.5, len(summaries) - 0.2)
    seeds = max(s.n for s in summaries)
    spec = sources.spec
    ax.set_title(
        f"Final stage: test top-1 per seed ({spec.name}, {seeds} seed{'s' * (seeds > 1)} each, "
        "last epoch; bar: mean ± std)",
        loc="left",
    )
    ax.set_xlabel("configuration (finalists by selection score, then the references)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(axis="y", alpha=0.3)
    return figure


FIGURES: dict[str, Callable[[Sources], Any]] = {
    "param_importances": param_importances,
    "optimization_history": optimization_history,
    "parallel_coordinate": parallel_coordinate,
    "slice_continuous_knobs": continuous_slices,
    "learning_curves": learning_curves,
    "final_test_top1": final_test_scores,
}
