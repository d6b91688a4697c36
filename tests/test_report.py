"""`sdd-search report`: a search's leaderboard, final report and champion read back from MLflow.

Fast tests log a search into a real sqlite MLflow store through the search's own Tune callback
(:class:`MlflowTrialCallback`, fed the trials and results Tune would feed it; no Ray cluster)
and compare what the report rebuilds with what the search computed from Tune's results. The
slow test runs a tiny search with the CLI, then the report in each format.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import TINY_SPEC, deep_update
from mlflow import MlflowClient

from sdd_search import report
from sdd_search.final_report import KD
from sdd_search.leaderboard import format_leaderboard, ranked, result_rows, rows_from_mlflow
from sdd_search.space import FINAL_KEY, FINAL_ROLE, ROLE_KEY, SEARCH_ROLE, TRIAL_KEY
from sdd_search.spec import spec_from_dict
from sdd_search.tracking import SearchTracker

NAN_LOSS = "training loss became nan at epoch 2 (lr 0.1); lower train.lr or distill weights"


def tiny_spec(tmp_path: Path, **updates):
    tree = deep_update(copy.deepcopy(TINY_SPEC), updates)
    tree["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    tree["storage"] = str(tmp_path / "runs")
    return spec_from_dict(tree, "tiny.yaml")


def _epochs(val_top1: list[float], **extra) -> list[dict]:
    """Tune results of a search-stage trial, one per epoch (what run_trial reports)."""
    rows = []
    for epoch, top1 in enumerate(val_top1, start=1):
        rows.append(
            {
                "epoch": epoch,
                "train_loss": 2.0 / epoch,
                "val_loss": 1.0 / epoch + (100 - top1) / 100,
                "val_top1": top1,
                "best_val_top1": max(val_top1[:epoch]),
                "epoch_seconds": 1.5,
                **extra,
            }
        )
    return rows


class LoggedSearch:
    """A search logged to MLflow as the search logs it: the parent run, then each trial fed to
    the search's MlflowTrialCallback (start, one result per epoch, complete or error)."""

    def __init__(self, spec):
        from sdd_search.mlflow_callback import MlflowTrialCallback

        self.spec = spec
        self.tracker = SearchTracker(
            spec.tracking.uri, spec.experiment_name, spec.experiment_path()
        )
        self.tracker.start_parent(spec.name, spec.model_dump(mode="json"), "name: tiny\n", "plan")
        report.write_record(spec, self.tracker.uri)
        self.callback = MlflowTrialCallback(
            self.tracker.uri, spec.experiment_name, spec.experiment_path()
        )
        self.results: dict[str, list] = {"search": [], "references": [], "final": []}

    def trial(self, trial_id: str, role, results: list[dict], error: str | None = None, **knobs):
        stage = {SEARCH_ROLE: "search", FINAL_ROLE: "final"}.get(role, "references")
        base = (self.spec.final_trial if stage == "final" else self.spec.search_trial).model_dump(
            mode="json"
        )
        config = {TRIAL_KEY: base, ROLE_KEY: role, **knobs}
        trial = SimpleNamespace(
            trial_id=trial_id,
            config=config,
            path=f"/runs/{trial_id}",
            last_result=None,
            error_file=None,
            get_error=lambda: error,
        )
        self.callback.on_trial_start(0, [], trial)
        for result in results:
            self.callback.on_trial_result(0, [], trial, {**result, "trial_id": trial_id})
            trial.last_result = result
        if error:
            self.callback.on_trial_error(0, [], trial)
        else:
            self.callback.on_trial_complete(0, [], trial)
        self.results[stage].append(
            SimpleNamespace(
                metrics={**results[-1], "trial_id": trial_id},
                config=config,
                metrics_dataframe=pd.DataFrame(results),
                error=RuntimeError(error) if error else None,
            )
        )

    def finish(self, registered: list | None = None) -> None:
        if registered is not None:
            self.tracker.set_tags(
                self.tracker.parent_run_id, {"sdd_search.registered": json.dumps(registered)}
            )
        self.tracker.finish_parent("FINISHED")

    def tune_rows(self) -> list[dict]:
        """The rows the search prints: searched trials ranked, then the references."""
        metric, mode = self.spec.search.metric, self.spec.search.mode
        searched = ranked(result_rows(self.results["search"], metric, mode), mode)
        return searched + result_rows(self.results["references"], metric, mode)


def log_search(tmp_path: Path, *, final: bool = False, **updates) -> LoggedSearch:
    """A logged search with every kind of searched trial: completed, stopped by ASHA, stopped
    by a non-finite loss and failed; the two references; with ``final``, a final stage of
    one finalist and the references over two seeds."""
    spec_updates = {"search": {"references": True}, **updates}
    if final:
        spec_updates["final"] = {"top_k": 1, "seeds": 2}
    logged = LoggedSearch(tiny_spec(tmp_path, **spec_updates))
    knobs = {"scales": "1,2", "temperature": 4.0, "complementary_weight": 2.0}
    logged.trial("aaa01", SEARCH_ROLE, _epochs([70.0, 91.5]), **knobs)
    logged.trial(
        "bbb02",
        SEARCH_ROLE,
        _epochs([55.0]),
        **{**knobs, "scales": "1", "temperature": 1.7320508075688772},
    )
    diverged = [
        *_epochs([60.0]),
        {"nonfinite_loss": 1.0, "stop_reason": NAN_LOSS, "val_top1": math.nan},
    ]
    logged.trial("ccc03", SEARCH_ROLE, diverged, **{**knobs, "complementary_weight": 3.25})
    logged.trial("ddd04", SEARCH_ROLE, _epochs([65.0]), error="ValueError: worker died", **knobs)
    logged.trial("r0001", "baseline", _epochs([68.0, 88.0]))
    logged.trial("r0002", "kd", _epochs([72.0, 90.0]))
    if final:
        entries = [("finalist-1", "finalist", "aaa01", 91.5, knobs)]
        entries += [(name, name, "", None, {}) for name in ("baseline", "kd", "paper")]
        for index, (entry, role, source, score, params) in enumerate(entries):
            for seed in (0, 1):
                place = {"entry": entry, "role": role, "seed": seed, "source_trial": source}
                place |= {"selection_score": score, "params": params}
                test = {"test_top1": 80.0 + 2 * index + seed, "test_loss": 0.5}
                results = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5, **test}]
                logged.trial(f"f{index}{seed}", FINAL_ROLE, results, **{FINAL_KEY: place})
    return logged


def _plain(rows: list[dict]) -> list[dict]:
    """Rows with NaN as None (NaN != NaN) and without the checkpoint (MLflow has none)."""
    return [
        {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
            if k != "checkpoint"
        }
        for row in rows
    ]


def test_rows_from_mlflow_equal_result_rows_of_the_same_trials(tmp_path):
    logged = log_search(tmp_path)
    logged.finish()
    client = MlflowClient(tracking_uri=logged.tracker.uri)
    runs = client.search_runs([logged.tracker.experiment_id])
    spec = logged.spec
    from_mlflow = rows_from_mlflow(
        runs, spec.search.metric, spec.search.mode, client.get_metric_history
    )
    from_tune = result_rows(
        logged.results["search"] + logged.results["references"],
        spec.search.metric,
        spec.search.mode,
    )
    by_trial = {row["trial"]: row for row in _plain(from_mlflow)}
    assert by_trial == {row["trial"]: row for row in _plain(from_tune)}
    assert [by_trial[t]["status"] for t in ("aaa01", "bbb02", "ccc03", "ddd04")] == [
        "done",
        "done",  # stopped by the scheduler: a result, as Tune's rows say
        "nan",
        "error",
    ]
    assert by_trial["aaa01"]["params"]["scales"] == [1, 2]
    # The report prints the search's table, line for line (a knob order of its own is one).
    record = report.open_search(spec)
    rows = report.leaderboard_rows(record)
    assert format_leaderboard(rows) == format_leaderboard(logged.tune_rows())
    shuffled = [{**row, "params": dict(reversed(row["params"].items()))} for row in rows]
    assert format_leaderboard(shuffled) == format_leaderboard(rows)  # whatever a store's order


def test_rows_from_mlflow_with_a_min_metric_ranks_as_the_search_did(tmp_path):
    logged = log_search(tmp_path, search={"metric": "val_loss", "mode": "min", "references": True})
    logged.finish()
    rows = report.leaderboard_rows(report.open_search(logged.spec))
    assert _plain(rows) == _plain(logged.tune_rows())
    assert "val_loss" in format_leaderboard(rows).splitlines()[0]


def test_report_formats_of_a_finished_search(tmp_path):
    logged = log_search(tmp_path, final=True)
    logged.finish(registered=[["f00", "1", "finalist-1-seed0"]])
    record = report.open_search(logged.spec)
    assert record.status == "finished"

    table = report.render(record, "table")
    assert "Search 'tiny': finished" in table
    assert format_leaderboard(logged.tune_rows()) in table
    assert "finalist-1 *champion*" in table
    assert "registered tiny-student v1 (run finalist-1-seed0)" in table
    assert "alias 'champion' -> models:/tiny-student@champion" in table
    assert f"/#/experiments/{record.experiment_id}/runs" in table

    markdown = report.render(record, "markdown")
    assert markdown.startswith("# Search 'tiny': finished")
    board = [line for line in markdown.splitlines() if line.startswith("| 1 | trial-aaa01 |")]
    assert board and "| 91.50 |" in board[0] and "scales=[1, 2]" in board[0]
    assert "| finalist-1 *champion* |" in markdown

    document = json.loads(
        report.render(record, "json"), parse_constant=lambda c: pytest.fail(f"{c} in JSON")
    )
    assert set(document) == {"search", "leaderboard", "final", "champion"}
    assert [row["name"] for row in document["leaderboard"]] == [
        "trial-aaa01",
        "trial-ddd04",
        "trial-bbb02",
        "trial-ccc03",
        "baseline",
        "kd",
    ]
    assert document["leaderboard"][0]["rank"] == 1 and document["leaderboard"][-1]["rank"] is None
    assert document["leaderboard"][3]["metric_final"] is None  # NaN: null, valid JSON
    assert document["final"]["champion"] == "finalist-1"
    finalist = next(r for r in document["final"]["rows"] if r["name"] == "finalist-1")
    assert finalist["test_top1_per_seed"] == {"0": 80.0, "1": 81.0}
    assert document["champion"]["model_uri"] == "models:/tiny-student@champion"
    assert document["search"]["status"] == "finished"

    rows = list(csv.DictReader(io.StringIO(report.render(record, "csv"))))
    sections = [row["section"] for row in rows]
    assert sections == ["leaderboard"] * 6 + ["final"] * 4 + ["champion"]
    assert rows[-1]["model_uri"] == "models:/tiny-student@champion" and rows[-1]["version"] == "1"
    assert rows[0]["name"] == "trial-aaa01" and float(rows[0]["val_top1"]) == 91.5
    assert json.loads(rows[0]["params"])["scales"] == [1, 2]
    kd = next(r for r in rows if r["section"] == "final" and r["name"] == KD)
    assert float(kd["test_top1_mean"]) == pytest.approx(84.5)


def test_report_of_a_running_then_interrupted_search(tmp_path):
    from sdd_search import driver_lock

    logged = log_search(tmp_path)
    spec = logged.spec
    with driver_lock.hold(spec.experiment_path(), spec.name):  # as the search's driver does
        record = report.open_search(spec)
        assert record.status == "running"
        assert "Search 'tiny': running, last logged" in report.render(record)
        assert "champion: none registered yet" in report.render(record)
    # The driver is gone (killed: the parent run still says RUNNING): interrupted.
    record = report.open_search(spec)
    assert record.parent.info.status == "RUNNING" and record.status == "interrupted"
    assert "Search 'tiny': interrupted (no driver holds its lock; continue with --resume)" in (
        report.render(record)
    )
    logged.tracker.finish_parent("KILLED")  # Ctrl-C
    record = report.open_search(spec)
    assert record.status == "interrupted"
    assert json.loads(report.render(record, "json"))["champion"] is None


def test_report_cli_reads_a_search_folder_and_never_imports_ray(tmp_path):
    logged = log_search(tmp_path)
    logged.finish()
    # The report in a subprocess, by the search's folder; it reports whether Ray was imported.
    probe = (
        "import sys, runpy; sys.argv = ['sdd-search', 'report', sys.argv[1], '--format', 'json'];"
        "from sdd_search.cli import main; code = main(sys.argv[1:]);"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', file=sys.stderr);"
        "sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, logged.spec.experiment_path()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().endswith("NO_RAY"), result.stderr[-3000:]
    assert json.loads(result.stdout)["leaderboard"][0]["name"] == "trial-aaa01"


def test_resume_of_a_finished_search_prints_its_report_without_ray(tmp_path):
    """`sdd-search SPEC --resume` on a search that ran to its end starts no Ray and trains
    nothing: its report and exit 0; with a changed spec, one line naming the file and the field.
    A search that did not run to its end is resumed as ever (no report here)."""
    from sdd_search import resume_check
    from sdd_search.tracking import TAG_OUTCOME

    logged = log_search(tmp_path)
    assert report.finished_search(logged.spec) is None  # still running: resume it
    logged.finish()
    assert report.finished_search(logged.spec) is None  # no outcome: not known to have ended
    logged.tracker.set_tags(logged.tracker.parent_run_id, {TAG_OUTCOME: "finished"})
    resume_check.record(logged.spec)
    tree = deep_update(copy.deepcopy(TINY_SPEC), {"search": {"references": True}})
    tree["tracking"]["uri"] = logged.spec.tracking.uri
    tree["storage"] = str(tmp_path / "runs")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(json.dumps(tree))
    probe = (
        "import sys; from sdd_search.cli import main; code = main(sys.argv[1:]);"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', file=sys.stderr);"
        "sys.exit(code)"
    )

    def resume(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", probe, str(spec_path), "--resume", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = resume()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "NO_RAY", done.stderr[-3000:]
    assert done.stdout.startswith("sdd-search: search 'tiny' ran to its end already; nothing")
    assert "Search 'tiny': finished" in done.stdout
    assert _leaderboard_block(done.stdout) == _leaderboard_block(
        report.render(report.open_search(logged.spec))
    )
    changed = resume("--set", "search.num_trials=5")
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert changed.stderr.strip().splitlines()[0] == (
        f"sdd-search: error: {spec_path}: --resume: search.num_trials is 5 here but the search "
        "started with 3; a resumed search keeps its spec (put it back, or --set name=... to "
        "start another search)"
    )


def test_report_errors_are_one_line_exit_2(tmp_path, capsys):
    from sdd_search.cli import main

    def report_errors(*args: str) -> list[str]:
        assert main(["report", *args]) == 2  # `sdd-search report ...`, in this process
        return capsys.readouterr().err.strip().splitlines()

    spec_path = tmp_path / "spec.yaml"
    spec = copy.deepcopy(TINY_SPEC)
    spec["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    spec["storage"] = str(tmp_path / "runs")
    spec_path.write_text(json.dumps(spec))
    assert report_errors(str(spec_path)) == [
        f"sdd-search: error: no search 'tiny': no MLflow store at {tmp_path}/mlflow.db "
        "(tracking.uri); run it first: sdd-search SPEC.yaml"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # the report created no store
    [folder] = report_errors(str(tmp_path))
    assert folder.startswith(f"sdd-search: error: {tmp_path}: not a search's folder")
    [bad] = report_errors(str(spec_path), "--set", "search.num_trials=0")
    assert bad.startswith(f"sdd-search: error: {spec_path}: search.num_trials:")
    # A store without this search (another one under another storage): still one line.
    log_search(tmp_path / "other").finish()
    spec["tracking"]["uri"] = f"sqlite:///{tmp_path}/other/mlflow.db"
    spec_path.write_text(json.dumps(spec))
    [other] = report_errors(str(spec_path))
    assert other.startswith(f"sdd-search: error: no search 'tiny' at {tmp_path}/runs/tiny"), other


def _leaderboard_block(text: str) -> list[str]:
    """The leaderboard as printed: its heading line and the table below it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Leaderboard ("))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def check_report_of_a_real_search(spec_path: Path, search_stdout: str, cwd: Path) -> None:
    """`sdd-search report` of a finished real search in each format, in subprocesses as a user
    runs them: the table is the search's own leaderboard (as it printed it in
    ``search_stdout``), csv and json parse. Called by the end-to-end test of a search on a real
    `mlflow server` (tests/test_mlflow_ui.py), which shares its search with this check."""
    from test_search import run_cli

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli(list(args), cwd=cwd)

    printed = _leaderboard_block(search_stdout)
    assert len(printed) == 2 + 2 + 1  # heading, header, rule, two trials
    assert "again, without Ray: sdd-search report " in search_stdout

    table = cli("report", str(spec_path), "--format", "table")
    assert table.returncode == 0, table.stderr[-3000:]
    assert _leaderboard_block(table.stdout) == printed
    assert "Search 'tiny': finished" in table.stdout
    assert "alias 'champion' -> models:/tiny-student@champion (v1, run trial-" in table.stdout

    markdown = cli("report", str(spec_path), "--format", "markdown")
    assert markdown.returncode == 0, markdown.stderr[-3000:]
    ranked_names = [line.split()[1] for line in printed[3:]]
    rows = [line for line in markdown.stdout.splitlines() if line.startswith("| 1 |")]
    assert rows and rows[0].split(" | ")[1] == ranked_names[0]

    document = cli("report", str(spec_path), "--format", "json")
    assert document.returncode == 0, document.stderr[-3000:]
    parsed = json.loads(document.stdout)
    assert [row["name"] for row in parsed["leaderboard"]] == ranked_names
    assert parsed["final"] is None and parsed["champion"]["version"] == "1"
    assert parsed["search"]["status"] == "finished"

    table_csv = cli("report", str(spec_path), "--format", "csv")
    assert table_csv.returncode == 0, table_csv.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(table_csv.stdout)))
    assert [r["name"] for r in rows if r["section"] == "leaderboard"] == ranked_names
    assert {r["section"] for r in rows} == {"leaderboard", "champion"}
