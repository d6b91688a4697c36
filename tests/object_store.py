"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode, in a thread.

:func:`s3_server` starts it on a free port, points this process at it the way a user points
sdd-search at MinIO (``AWS_ENDPOINT_URL`` and credentials in the environment), and reads the
server's own access log, so a test can count how many times each object was downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from sdd_search.environ import overridden

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class AccessLog(logging.Handler):
    """The server's request lines (werkzeug's access log), as the server wrote them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def downloads(self, bucket: str) -> Counter:
        """Key -> how many times it was read (GET of the object, whole or a range; not a
        listing, which GETs the bucket)."""
        pattern = re.compile(rf'GET /{re.escape(bucket)}/([^ ?]+) HTTP[^"]*" 20[06]')
        return Counter(unquote(m.group(1)) for line in self.lines if (m := pattern.search(line)))


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # what a process (or a Ray node) needs to reach it
    log: AccessLog
    client: object = field(repr=False)  # boto3's S3 client, for setting buckets up

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file below ``folder`` to ``s3://bucket/prefix/...``; returns that URI."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}"


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port) with this process's environment pointed at it;
    everything restored afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    access = AccessLog()
    logger = logging.getLogger("werkzeug")
    logger.addHandler(access)
    level, logger.level = logger.level, logging.INFO
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    try:
        with overridden(env):
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            yield S3Server(endpoint, env, access, client)
    finally:
        logger.removeHandler(access)
        logger.level = level
        server.stop()
