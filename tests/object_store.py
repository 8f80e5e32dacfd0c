"""Object stores on 127.0.0.1 for tests: moto's S3 server and a plain HTTP server with byte
ranges, each logging every request it answers (method, path, Range, status, body bytes sent), so
tests can check what the data layer fetched from the server's own counters.

The HTTP server can also answer a seeded share of its GETs of matching paths with 503, and be
shut down mid-run (a store that goes away).
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUCKET = "tessera-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # URL path, unquoted: /bucket/prefix/shard-000000.tar or /prefix/shard-000000.tar
    range: tuple[int, int | None] | None  # (first, last) byte of the Range header, inclusive
    status: int
    sent: int  # body bytes sent
    client: str = ""  # host:port of the connection
    at: float = field(default_factory=time.monotonic)  # when it was answered


def parse_range(header: str | None) -> tuple[int, int | None] | None:
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
    if not match:
        return None
    return int(match[1]), int(match[2]) if match[2] else None


class RequestLog:
    """What a server answered; a request is logged after its body, and counted as open from the
    moment the server starts answering it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._open = 0

    def begin(self) -> None:
        with self._lock:
            self._open += 1

    def add(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)
            self._open -= 1

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once every request the server has begun to answer is logged: after a client
        that waited for its answers is done, the log is then complete."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._open == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._open} requests still being answered after {timeout} s")
            time.sleep(0.01)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def requests(self, suffix: str = "", method: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self._requests
                if r.path.endswith(suffix) and (method is None or r.method == method)
            ]

    def sent(self, suffix: str = "") -> int:
        return sum(r.sent for r in self.requests(suffix))

    def wait_for(self, count: int, suffix: str = "", timeout: float = 10.0) -> list[Request]:
        """The requests once `count` of them are logged (a server logs each after its body);
        TimeoutError naming how many came, after `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.requests(suffix)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests(suffix))} of {count} requests logged")
            time.sleep(0.01)
        return self.requests(suffix)


# --- S3 -------------------------------------------------------------------------------------


class _Counting:
    """WSGI middleware: logs each request with the body bytes the app returned."""

    def __init__(self, app, log: RequestLog):
        self.app, self.log = app, log

    def __call__(self, environ, start_response):
        self.log.begin()
        status = {}

        def start(line, headers, exc_info=None):
            status["code"] = int(line.split()[0])
            return start_response(line, headers, exc_info)

        body = self.app(environ, start)
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            self.log.add(
                Request(
                    environ["REQUEST_METHOD"],
                    urllib.parse.unquote(environ.get("PATH_INFO", "")),
                    parse_range(environ.get("HTTP_RANGE")),
                    status.get("code", 0),
                    sent,
                )
            )


class S3Server:
    """moto's S3 on a free local port; `env` is what a process needs to reach it."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.log = RequestLog()
        app = _Counting(DomainDispatcherApplication(create_backend_app), self.log)
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def upload(self, folder: Path, prefix: str, names: list[str] | None = None) -> str:
        """Put the files of `folder` (or only `names`) under `s3://BUCKET/prefix/`; returns
        that URL."""
        client = self.client()
        if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=BUCKET)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and (names is None or path.name in names):
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        return f"s3://{BUCKET}/{prefix}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# --- HTTP -----------------------------------------------------------------------------------


class HttpServer:
    """A folder over HTTP/1.0 on a free local port: GET with or without a single Range (206 with
    Content-Range, or 200; with `ranges` False always 200), HEAD with Content-Length, a link
    listing for folders. GETs of paths ending in `fail_suffix` are answered 503: the first
    `fail_first` attempts of every (path, range), and then a `fail_share` of attempts, chosen by
    a hash of (seed, path, range, attempt): the request itself decides, not the order in which
    requests from several threads arrive."""

    def __init__(
        self,
        root: Path,
        fail_share: float = 0.0,
        fail_suffix: str = ".tar",
        seed=0,
        fail_first: int = 0,
    ):
        self.root, self.log = Path(root), RequestLog()
        self.fail_share, self.fail_suffix = fail_share, fail_suffix
        self.fail_first, self.seed = fail_first, seed
        self.ranges = True  # False: ignore Range headers, as some servers do
        self._attempts: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _fails(self, path: str, requested) -> bool:
        if not path.endswith(self.fail_suffix):
            return False
        with self._lock:
            attempt = self._attempts.get((path, requested), 0)
            self._attempts[(path, requested)] = attempt + 1
        digest = hashlib.sha256(f"{self.seed}/{path}/{requested}/{attempt}".encode()).digest()
        drawn = int.from_bytes(digest[:8], "little") / 2**64
        return attempt < self.fail_first or drawn < self.fail_share

    def stop(self) -> None:
        """Go away: stop answering and close the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet; the RequestLog has it all
                pass

            def _answer(self, send_body: bool) -> None:
                server.log.begin()
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                requested = parse_range(self.headers.get("Range"))
                local = server.root / path.lstrip("/")
                status, body, headers = 200, b"", {}
                if send_body and server._fails(path, requested):
                    status, body = 503, b"busy"
                elif local.is_dir():
                    names = sorted(os.listdir(local))
                    body = "".join(
                        f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in names
                    ).encode()
                    headers["Content-Type"] = "text/html"
                elif local.is_file():
                    size = local.stat().st_size
                    first, last = 0, size - 1
                    headers["Accept-Ranges"] = "bytes"
                    if requested is not None and server.ranges:
                        first = requested[0]
                        last = min(size - 1, requested[1] if requested[1] is not None else size)
                        if first >= size:
                            status, first, last = 416, 0, -1
                            headers["Content-Range"] = f"bytes */{size}"
                        else:
                            status = 206
                            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
                    if send_body and last >= first:
                        with open(local, "rb") as f:
                            f.seek(first)
                            body = f.read(last - first + 1)
                    headers["Content-Type"] = "application/octet-stream"
                    headers["Content-Length"] = str(last - first + 1)
                else:
                    status, body = 404, b"not found"
                headers.setdefault("Content-Length", str(len(body)))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                sent = 0
                if send_body:
                    try:
                        self.wfile.write(body)
                        sent = len(body)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                client = "{}:{}".format(*self.client_address[:2])
                server.log.add(Request(self.command, path, requested, status, sent, client))

            def do_GET(self):
                self._answer(send_body=True)

            def do_HEAD(self):
                self._answer(send_body=False)

        return Handler


def copy_shards(source: Path, destination: Path, names: list[str] | None = None) -> Path:
    """The tars and manifest of a shard folder (or only `names`) in a new folder."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and (names is None or path.name in names):
            shutil.copy2(path, destination / path.name)
    return destination
