"""The MLflow UI lists a search's trials: a real `mlflow server` on localhost, a tiny search
logged to it over HTTP, and the experiment's runs page rendered by headless Chromium; the link
the search prints opens the UI's model-training views, and the parent run's figures are listed
and load as images."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")  # Debian's package (.ci/run installs it)
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
# No huey job runners (GenAI scorers, trace rollups): seven fewer processes to start and stop.
SERVER_ENV = {**QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_START_TIMEOUT = 180  # an MLflow 3 server takes 30-80 s to come up on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM a process group, SIGKILL what is left of it after ``grace`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # stragglers, if the leader went first
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


class MlflowServer:
    """A real `mlflow server` (sqlite store, proxied artifacts), started but not yet waited for."""

    def __init__(self, root: Path):
        self.root, self.url = root, f"http://127.0.0.1:{free_port()}"
        self.log_path = root / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed by stop())
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root}/srv.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                self.url.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            cwd=self.root,
            env={**os.environ, **SERVER_ENV},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn worker goes with it
        )

    def kill_and_restart(self) -> None:
        """Killed at once (SIGKILL, no goodbye), then started again: same port, same store."""
        stop_group(self.process, grace=0)
        self.process = self._start()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not healthy(self.url):
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT}s")
            time.sleep(1)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        stop_group(self.process, grace=5)
        self._log.close()


@pytest.fixture
def mlflow_server(tmp_path: Path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


class DevTools:
    """Headless Chromium driven over its DevTools pipe (its fds 3 and 4, no extra dependency):
    open a page, evaluate JavaScript in it (what the page shows, not a file we wrote), take a
    screenshot."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1400, 900)):
        commands, self._commands = os.pipe()
        self._replies, replies = os.pipe()

        def wire():  # in the child: fd 3 reads our commands, fd 4 writes Chromium's replies
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, replies)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire,
            close_fds=False,  # fds 3 and 4 must reach Chromium (ours are close-on-exec)
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(commands)
        os.close(replies)
        self._id, self._buffer, self.session = 0, b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError(f"chromium: no reply to {method} in {timeout:.0f}s")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str, until: str, timeout: float = 90.0):
        """Navigate to ``url``; the value of JavaScript ``until`` once truthy (or its last)."""
        self.call("Page.navigate", url=url)
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.evaluate(until)
            if value:
                break
            time.sleep(0.5)
        return value

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        stop_group(self.process, grace=5)
        os.close(self._commands)
        os.close(self._replies)


def png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">I", data[16:20])[0]


def check_runs_listed(browser: DevTools, url: str, experiment, parent, trials, tmp_path):
    """The experiment's runs page lists the parent and every trial by name (sorted by run name,
    so nested runs are listed flat: sorted by date, the default, MLflow folds the trials under
    their collapsed parent)."""
    query = urllib.parse.urlencode(
        {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}, quote_via=urllib.parse.quote
    )
    page = f"{url}/#/experiments/{experiment.experiment_id}/runs?{query}"
    names = sorted(r.info.run_name for r in trials)
    assert all(name.startswith("trial-") for name in names), names
    wanted = [*names, parent.info.run_name, "sdd-search/tiny"]
    ready = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in wanted)
    browser.open(page, f"{ready} && document.body.innerText")
    text = browser.evaluate("document.body.innerText") or ""
    browser.screenshot(tmp_path / "mlflow-ui.png")
    missing = [name for name in wanted if name not in text]
    assert not missing, f"{missing} not listed at {page}; page text: {text[:3000]}"
    assert (tmp_path / "mlflow-ui.png").stat().st_size > 10_000


def check_figures_and_workflow(browser: DevTools, url: str, client, experiment, parent, tmp_path):
    """The parent run's figures in the UI (listed, one shown as a loaded image) and the runs
    link the search printed in the UI's model-training views, not its GenAI overview."""
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    figures = [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    assert "figures/learning_curves.png" in figures, figures
    local = client.download_artifacts(parent.info.run_id, "figures/learning_curves.png", tmp_path)
    width = png_width(Path(local).read_bytes())
    page = (
        f"{url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
        "/artifacts/figures/learning_curves.png"
    )
    loaded = "[...document.images].filter(i => i.complete && i.naturalWidth > 0)"
    shown = browser.open(
        page, f"JSON.stringify({loaded}.map(i => [i.naturalWidth, i.alt])).includes('learning')"
    )
    text = browser.evaluate("document.body.innerText")
    images = browser.evaluate(f"JSON.stringify({loaded}.map(i => [i.naturalWidth, i.alt]))")
    browser.screenshot(tmp_path / "mlflow-ui-figure.png")
    assert shown, f"no figure image loaded at {page}: {images}; page text: {text[:2000]}"
    # Every figure is listed; the selected one is drawn at the PNG's own width.
    assert all(Path(f).name in text for f in figures), text[:3000]
    assert [width, "figures/learning_curves.png"] in json.loads(images), images
    assert (tmp_path / "mlflow-ui-figure.png").stat().st_size > 10_000

    # The link the search printed: the UI's model-training views (its runs table, the
    # model registry), not the GenAI overview (Traces, Latency, Token Usage).
    runs = f"{url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    listed = len(client.search_runs([experiment.experiment_id], max_results=100))
    ready = f"document.body.innerText.includes('{listed} matching runs') && document.body.innerText"
    text = browser.open(runs, ready) or browser.evaluate("document.body.innerText")
    browser.screenshot(tmp_path / "mlflow-ui-runs.png")
    assert f"{listed} matching runs" in text, text[:3000]  # the table has loaded
    assert "Model registry" in text and "Token Usage" not in text, text[:3000]
    assert "Observability" not in text, text[:3000]  # the GenAI views' navigation


def test_a_search_on_a_server_that_restarts_then_its_report_and_ui(
    mlflow_server, write_spec, teacher_cache, tmp_path, ray_owner
):
    """One search on a real `mlflow server`, shared by three checks. (1) The server is killed
    once a first epoch is in it and started again (same port, same store) while the trials
    train: every epoch of every trial is in MLflow exactly once, as the trials reported it.
    (2) `sdd-search report` reads the search back through the server in each format. (3) The
    MLflow UI in headless Chromium lists the trials and the parent run's figures."""
    from test_live_view import LEAKS
    from test_report import check_report_of_a_real_search
    from test_tracking_outage import tune_epochs

    url = mlflow_server.url
    spec_path = write_spec(
        {
            "tracking": {"uri": url},
            "train": {"epochs": 3},
            "search": {"num_trials": 2, "max_concurrent": 2, "references": False, "top_k": 1},
        }
    )
    # The search checks that its tracking server answers before it starts anything.
    try:
        mlflow_server.wait_healthy()
    except RuntimeError as error:
        pytest.fail(f"{error}:\n{mlflow_server.log_tail()}")
    out, err = tmp_path / "cli.out", tmp_path / "cli.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        cli = subprocess.Popen(
            [sys.executable, "-m", "sdd_search", str(spec_path)],
            cwd=tmp_path,
            env=ray_owner.env(QUIET),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    try:
        # Away once a first epoch is in MLflow: the rest of the search trains without it.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert cli.poll() is None, out.read_text()[-3000:] + err.read_text()[-3000:]
            experiment = client.get_experiment_by_name("sdd-search/tiny")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if any(r.data.metrics.get("val_top1") is not None for r in runs):
                break
            time.sleep(0.5)
        mlflow_server.kill_and_restart()
        away_at = time.time()
        try:
            mlflow_server.wait_healthy()  # up again in 30-80 s on 2 cores
        except RuntimeError as error:
            pytest.fail(f"{error}:\n{mlflow_server.log_tail()}")
        back_at = time.time()
        returncode = cli.wait(timeout=600)
    finally:
        stop_group(cli, grace=20)  # a no-op once it has exited
        ray_owner.stop()
    stdout_text, stderr_text = out.read_text(), err.read_text()
    assert returncode == 0, stdout_text[-3000:] + stderr_text[-3000:]
    assert (
        f"browse every trial: open {url}/#/experiments/1/runs?workflowType=machine_learning"
        in stdout_text
    )
    assert "registered tiny-student v1" in stdout_text, stdout_text[-3000:]
    assert not [leak for leak in LEAKS if leak in stdout_text], stdout_text[-3000:]

    # (1) The trials trained while the server was away (Tune's own record of each epoch's
    # time), and MLflow holds each epoch they reported once, with the value reported.
    reported = tune_epochs(tmp_path / "runs" / "tiny" / "search")
    assert len(reported) == 2
    stamps = [r["timestamp"] for epochs in reported.values() for r in epochs.values()]
    assert any(away_at <= stamp <= back_at for stamp in stamps), (away_at, back_at, stamps)
    # The user was told, once each: the server away (the trials go on), then back.
    (away,) = [line for line in stdout_text.splitlines() if "does not answer" in line]
    assert away.startswith(f"tracking: the MLflow server at {url} does not answer ("), away
    (back,) = [line for line in stdout_text.splitlines() if "answers again" in line]
    assert re.match(rf"tracking: the MLflow server at {url} answers again after \d+ s;", back)
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`sdd_search.role` = 'trial'")
    assert sorted(r.data.tags["sdd_search.trial_id"] for r in runs) == sorted(reported)
    for run in runs:
        trial_id = run.data.tags["sdd_search.trial_id"]
        assert run.info.status == "FINISHED" and run.data.tags["sdd_search.status"] == "completed"
        for metric in ("val_top1", "train_loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            logged = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
            expected = [(e, r[metric]) for e, r in sorted(reported[trial_id].items())]
            assert logged == expected, (trial_id, metric)

    # (2) The same search read back by `sdd-search report` through the server, each format.
    check_report_of_a_real_search(spec_path, stdout_text, tmp_path)
    expected = {"learning_curves.png", "optimization_history.png", "param_importances.png"}
    assert expected <= {p.name for p in (tmp_path / "runs" / "tiny" / "figures").glob("*.png")}

    # Everything went through the server's REST API: runs, registry, proxied artifacts.
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sdd_search.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["sdd_search.role"] for r in trials) == ["trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all("val_top1" in r.data.metrics for r in trials)
    versions = client.search_model_versions("name='tiny-student'")
    assert [v.version for v in versions] == ["1"]
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    assert champion.run_id in {r.info.run_id for r in trials}
    assert list((tmp_path / "artifacts").rglob("MLmodel")), "model not stored via the server"

    # (3) The UI (Debian's chromium; .ci/run installs it).
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium): the UI part not run")
    # One Chromium, driven over its DevTools pipe, for every page.
    browser = DevTools(tmp_path / "chromium-profile")
    try:
        check_runs_listed(browser, url, experiment, parent, trials, tmp_path)
        check_figures_and_workflow(browser, url, client, experiment, parent, tmp_path)
    finally:
        browser.close()
