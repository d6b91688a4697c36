"""Tracking that outlives a tracking server going away: calls retried with backoff, buffered in
order, and a bound on how long the server may stay away.

The search's MLflow callback (:mod:`sdd_search.mlflow_callback`) hands each tracking call to a
:class:`TrackingBuffer` as a small picklable operation. While the server answers, each one is
sent at once. When it does not (connection refused or reset, a timeout, a 5xx or 429 from it
or a proxy in front of it), the operation and every one after it wait in the buffer, in order,
and the trials go on training; the buffer tries again after 0.5 s, 1 s, 2 s ... (at most
:data:`MAX_RETRY_DELAY` apart) and sends everything, oldest first, once the server is back. A
server away for longer than ``tracking.outage_seconds`` is a :class:`TrackingUnavailableError`:
the search stops, resumable, and what was still buffered travels in Tune's experiment state
(``Callback.get_state``) to the resumed driver, which sends it first.

Sending an operation twice is harmless: the callback checks what the run already holds before
it logs an epoch, MLflow keeps one copy of a metric logged twice with the same step, timestamp
and value, and tags and params are set to the same values.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from sdd_search.environ import overridden

FIRST_RETRY_DELAY = 0.5  # seconds before the first retry; doubled after each failure
MAX_RETRY_DELAY = 10.0  # seconds, at most, between two tries
# MLflow's own retries (7, backing off to minutes) would stall Tune's loop, and with it every
# trial's reports: the buffer retries instead, and each request waits at most this long.
REQUEST_TIMEOUT_SECONDS = 10
HEALTH_TIMEOUT_SECONDS = 5.0

# MLflow's words (mlflow/utils/rest_utils.py) for a request the server never answered, and for
# an answer that says "not now" without a JSON body (a proxy's 502, a timeout, a rate limit).
_NO_ANSWER = re.compile(
    r"^API request to .* failed with (timeout )?exception"
    r"|^API request to endpoint .* failed with error code (408|429|5\d\d) "
)
_NOT_NOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server does not answer; ``str()`` is one line.

    ``resumable``: raised during a search, which stopped after the server stayed away longer
    than ``tracking.outage_seconds``; its trials keep their checkpoints and ``--resume`` sends
    what was buffered. False: raised at the start, before anything ran.
    """

    def __init__(self, message: str, *, resumable: bool):
        super().__init__(message)
        self.resumable = resumable


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error``, raised by an MLflow call, says the server did not answer (or answered
    "not now"), rather than that the call itself was wrong."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, requests.ConnectionError | requests.Timeout | ConnectionError):
        return True
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, RestException):
        return error.error_code in _NOT_NOW_CODES
    return isinstance(error, MlflowException) and bool(_NO_ANSWER.search(str(error)))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


_REQUEST = re.compile(r"API request to (?:endpoint )?(?:https?://[^/\s]+)?(/[^\s?]+)")
_WHY = [  # what an unanswered request's error says, in a few words
    (re.compile(r"Connection refused|NewConnectionError", re.I), "connection refused"),
    (re.compile(r"RemoteDisconnected|Connection aborted|reset by peer", re.I), "connection lost"),
    (re.compile(r"timed out|timeout", re.I), "no answer in time"),
    (re.compile(r"error code (\d{3})"), r"HTTP \1"),
]


def short_reason(error: BaseException) -> str:
    """Why a tracking call got no answer, in a few words, e.g.
    "/api/2.0/mlflow/runs/log-batch: connection refused"; MLflow's whole message otherwise."""
    text = " ".join(str(error).split())
    for pattern, words in _WHY:
        if found := pattern.search(text):
            why = found.expand(words)
            request = _REQUEST.search(text)
            return f"{request.group(1)}: {why}" if request else why
    return _one_line(error)


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """Raise :class:`TrackingUnavailableError` (not resumable) when ``uri`` is a tracking
    server (http or https) that does not answer ``GET <uri>/health`` within ``timeout``
    seconds; any other URI (a sqlite file, a folder) passes."""
    if not uri.startswith(("http://", "https://")):
        return
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        problem = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        problem = _one_line(getattr(error, "reason", None) or error)
    raise TrackingUnavailableError(
        f"tracking.uri: the MLflow server at {uri} does not answer (GET {url}: {problem}); "
        "start it, or point tracking.uri at one that runs",
        resumable=False,
    )


@contextlib.contextmanager
def failing_fast() -> Iterator[None]:
    """MLflow HTTP requests without MLflow's own retries and with a short timeout, in this
    block (MLflow reads both settings from the environment at each request)."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_SECONDS),
    }
    with overridden(settings):
        yield


class TrackingBuffer:
    """Operations waiting for the tracking server, oldest first.

    ``outage_seconds``: how long the server may stay away (from the first failed try since the
    last success) before :meth:`check` and :meth:`drain` raise; ``uri``: the server, for the
    message. Picklable: the operations are plain data, and ``send`` (the function that
    performs one) is passed to each call.
    """

    def __init__(self, outage_seconds: float, uri: str = ""):
        self.outage_seconds = float(outage_seconds)
        self.uri = uri
        self.pending: deque[Any] = deque()
        self.last_error = ""
        self._down_since: float | None = None  # time.monotonic() of the first failed try
        self._delay = FIRST_RETRY_DELAY
        self._next_try = 0.0
        self.notices: list[str] = []  # one line as the server goes away, one as it is back

    def __getstate__(self) -> dict:
        # A new process has a new monotonic clock: an outage is timed from its first try there.
        return {**self.__dict__, "_down_since": None, "_next_try": 0.0, "notices": []}

    def take_notices(self) -> list[str]:
        """The lines for the user since the last call (the server went away, or is back)."""
        notices, self.notices = self.notices, []
        return notices

    @property
    def down_for(self) -> float:
        """Seconds since the first failed try of the current outage (0 while the server answers)."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def submit(self, operation: Any, send: Callable[[Any], None]) -> None:
        """Queue ``operation`` behind what waits already, then send what is due."""
        self.pending.append(operation)
        self.flush(send)

    def restore(self, operations: list[Any]) -> None:
        """Put operations a previous driver could not send ahead of this one's."""
        self.pending = deque([*operations, *self.pending])

    def flush(self, send: Callable[[Any], None], *, now: bool = False) -> bool:
        """Send the waiting operations oldest first, until one fails because the server did
        not answer (it stays first, for the next try); True when none is left. Before the next
        try is due (backoff), nothing is sent unless ``now``. An operation that fails for any
        other reason is dropped and its error raised."""
        if not self.pending:
            return True
        if not now and time.monotonic() < self._next_try:
            return False
        with failing_fast():
            while self.pending:
                try:
                    send(self.pending[0])
                except Exception as error:
                    if not is_unreachable(error):
                        self.pending.popleft()
                        raise
                    self._failed(error)
                    return False
                self.pending.popleft()
                if self._down_since is not None:
                    self.notices.append(
                        f"tracking: the MLflow server at {self.uri or 'tracking.uri'} answers "
                        f"again after {self.down_for:.0f} s; sending the {len(self.pending) + 1} "
                        "tracking calls that waited, in order"
                    )
                self._down_since, self._delay = None, FIRST_RETRY_DELAY
        return True

    def _failed(self, error: BaseException) -> None:
        clock = time.monotonic()
        self.last_error = short_reason(error)
        if self._down_since is None:
            self._down_since, self._delay = clock, FIRST_RETRY_DELAY
            self.notices.append(
                f"tracking: the MLflow server at {self.uri or 'tracking.uri'} does not answer "
                f"({self.last_error}); the trials train on and their tracking calls wait, "
                f"retried with backoff; the search stops, resumable, if it stays away "
                f"{self.outage_seconds:g} s (tracking.outage_seconds)"
            )
        else:
            self._delay = min(2 * self._delay, MAX_RETRY_DELAY)
        self._next_try = clock + self._delay

    def check(self) -> None:
        """Raise :class:`TrackingUnavailableError` (resumable) once the server has been away
        for longer than ``outage_seconds`` with operations waiting."""
        if self.pending and self.down_for > self.outage_seconds:
            raise TrackingUnavailableError(
                f"the MLflow server at {self.uri or 'tracking.uri'} has not answered for "
                f"{self.down_for:.0f} s (tracking.outage_seconds: {self.outage_seconds:g}); "
                f"{len(self.pending)} tracking calls wait; the search stopped and resumes "
                f"with --resume once the server is back (last error: {self.last_error})",
                resumable=True,
            )

    def drain(self, send: Callable[[Any], None], sleep: Callable[[float], None] = time.sleep):
        """Block until every waiting operation is sent, trying again with backoff; raise as
        :meth:`check` does once the server has been away too long."""
        while not self.flush(send):
            self.check()
            sleep(max(0.0, min(self._next_try - time.monotonic(), MAX_RETRY_DELAY)))
