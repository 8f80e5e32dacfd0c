"""Where shard bytes live: local paths, and object stores (`s3://`, `gs://`, `http(s)://`) through
fsspec. A sample is read as one byte range of its shard; no shard is ever copied whole. S3 ranges
skip s3fs: a GET URL signed locally per shard, then one plain HTTP request a range (`_S3Ranges`).

Credentials come from each store's own environment and configuration files (for S3 the AWS
chain: `AWS_ACCESS_KEY_ID`, `~/.aws/credentials`, instance roles, `AWS_ENDPOINT_URL` for
S3-compatible servers; for GCS the Google application-default credentials). They never pass
through Tessera's config, so they are never logged or written into a run directory; a URL that
carries a user or password is refused for that reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import fsspec.asyn
import urllib3  # a dependency of botocore, itself one of s3fs

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
log = logging.getLogger(__name__)


class ReadError(OSError):
    """A byte range that could not be read, after every retry."""


class RemoteError(OSError):
    """A store's answer other than the bytes asked for, with its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RetryPolicy:
    """When a failed remote read is tried again: exponential backoff with full jitter (each wait
    drawn uniformly below backoff_s * 2**attempt), from a generator seeded per reader, so that
    readers failing together do not retry together and a test can replay the waits. Throttling
    (429, 503 SlowDown) waits THROTTLED times longer; what asking again cannot heal (not found,
    forbidden, a bad request, a server that ignores ranges) is not retried."""

    NEVER = (400, 401, 403, 404, 405, 410, 416)
    THROTTLING, THROTTLED = (429, 503), 4.0

    def __init__(self, retries: int, backoff_s: float, seed: int = 0):
        self.retries, self.backoff_s, self.seed = retries, backoff_s, seed
        self.random = random.Random(seed)

    def reseed(self, stream: int) -> None:
        """A generator of its own for another reader made from this one (a forked worker)."""
        self.random = random.Random(f"{self.seed}/{stream}")

    def wait_s(self, attempt: int, error: Exception) -> float | None:
        """How long to wait before attempt `attempt + 1`; None: fail now."""
        status = getattr(error, "status", None)
        cannot_heal = isinstance(error, (RangeUnsupported, FileNotFoundError, PermissionError))
        if attempt >= self.retries or cannot_heal or status in self.NEVER:
            return None
        ceiling = self.backoff_s * 2**attempt
        if status in self.THROTTLING:
            ceiling *= self.THROTTLED
        return self.random.uniform(0.0, ceiling)


def is_remote(url: str) -> bool:
    return urlparse(url).scheme in REMOTE_SCHEMES


def local_path(url: str) -> str:
    """A local path for `url` (a plain path or a file:// URL)."""
    return urlparse(url).path if url.startswith("file://") else url


def checked_url(url: str) -> str:
    """`url` as given, unless it names a scheme this module cannot read or carries credentials."""
    parsed = urlparse(url)
    if "://" in url and parsed.scheme not in REMOTE_SCHEMES + ("file",):
        raise ValueError(
            f"{url}: unsupported scheme {parsed.scheme!r} (use one of s3, gs, http(s))"
        )
    if parsed.username or parsed.password:
        raise ValueError(
            f"{redact(url)}: the URL carries credentials; give them through the store's "
            "environment or configuration files, which are never written into a run directory"
        )
    return url


def redact(url: str) -> str:
    """`url` without any user or password, for messages."""
    parsed = urlparse(url)
    if parsed.username or parsed.password:
        return parsed._replace(
            netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")
        ).geturl()
    return url


def join(folder: str, name: str) -> str:
    """`name` inside `folder`; an absolute path or a URL is returned unchanged."""
    if "://" in name or name.startswith("/"):
        return name
    if "://" in folder:
        return posixpath.join(folder.rstrip("/"), name)
    return str(Path(folder) / name)


def parent(url: str) -> str:
    return posixpath.dirname(url.rstrip("/")) if "://" in url else str(Path(url).parent)


def _filesystem(url: str):
    """fsspec's filesystem for `url`; fsspec keeps one instance per process (and makes new ones
    after a fork, as its async clients do not survive one)."""
    return fsspec.core.url_to_fs(url)[0]


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs = _filesystem(url)
    if urlparse(url).scheme in ("http", "https"):
        # fsspec's HTTP exists() is a GET, which makes the server send the whole file (a whole
        # shard); info() asks with a HEAD (a GET only where HEAD gives no size or fails).
        try:
            fs.info(url)
        except FileNotFoundError:
            return False
        return True
    return fs.exists(url)


def read_bytes(url: str) -> bytes:
    """A whole file: a manifest, a source video to prepare."""
    if is_remote(url):
        return _filesystem(url).cat_file(url)
    return Path(local_path(url)).read_bytes()


def identity(url: str) -> str:
    """What changes when the file at `url` changes: size and modification time, or the ETag;
    the content's hash where a server gives neither."""
    if not is_remote(url):
        stat = os.stat(local_path(url))
        return f"{os.path.abspath(local_path(url))}:{stat.st_size}:{stat.st_mtime_ns}"
    info = _filesystem(url).info(url)
    fields = ("ETag", "etag", "LastModified", "Last-Modified", "mtime", "generation")
    version = next((info[field] for field in fields if info.get(field)), None)
    if version is None:
        version = hashlib.sha256(read_bytes(url)).hexdigest()
    return f"{url}:{info.get('size')}:{version}"


def missing(urls: list[str], threads: int = 16) -> list[str]:
    """The URLs of `urls` that do not exist: one listing per folder where the store can list
    (local, S3, GCS), one HEAD per file over HTTP."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(parent(url), []).append(url)
    absent: list[str] = []
    heads: list[str] = []
    for folder, members in by_folder.items():
        scheme = urlparse(folder).scheme
        if scheme in ("http", "https"):
            heads += members
            continue
        if scheme in REMOTE_SCHEMES:
            fs = _filesystem(folder)
            listed = (
                {posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)}
                if fs.exists(folder)
                else set()
            )
        else:
            path = local_path(folder)
            listed = set(os.listdir(path)) if os.path.isdir(path) else set()
        absent += [url for url in members if posixpath.basename(url) not in listed]
    if heads:
        with ThreadPoolExecutor(threads) as pool:
            found = list(pool.map(exists, heads))
        absent += [url for url, ok in zip(heads, found, strict=True) if not ok]
    return absent


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; when the block ends without an error, one rename
    puts it in place, so a reader sees the old file or the whole new one, never half of it. With
    `durable` the file is on disk (fsynced, and its folder) before and after the rename, as a
    checkpoint needs across a power loss. A failed block leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str, durable: bool = False) -> None:
    """Write a whole file through `atomic_path`."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskCache:
    """Byte ranges on local disk, shared by every process of a node, least recently used out.

    An entry is a file named by a hash of its URL and range; a read refreshes its time. A
    process rescans the folder (and evicts the oldest entries) when its own writes since the
    last scan reach 1/16 of the budget or the budget itself is passed, so the folder stays
    within the budget plus 1/16 of it per writing process."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._total = self._scan_and_evict()
        self._written = 0

    @staticmethod
    def entry_name(url: str, offset: int, size: int) -> str:
        return hashlib.sha1(f"{url}\0{offset}\0{size}".encode()).hexdigest()

    def get(self, name: str) -> bytes | None:
        path = self.folder / name
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:  # never cached, or evicted by another process meanwhile
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, name: str, data: bytes) -> None:
        write_atomic(self.folder / name, data)  # its temporary name starts with a dot: not listed
        with self._lock:
            self._total += len(data)
            self._written += len(data)
            if self._total > self.max_bytes or self._written * 16 >= self.max_bytes:
                self._total, self._written = self._scan_and_evict(), 0

    def _scan_and_evict(self) -> int:
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size
        return total


class RangeUnsupported(ReadError):
    """A server that answers a Range request with the whole file."""


def _cat_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a remote file, in one ranged GET."""
    scheme = urlparse(url).scheme
    if scheme == "s3" and not _proxied():
        return _s3_ranges().read(url, start, end)
    fs = _filesystem(url)
    if scheme not in ("http", "https"):
        return fs.cat_file(url, start=start, end=end)
    return fsspec.asyn.sync(fs.loop, _http_range, fs, url, start, end)


def _no_ranges(url: str, status: int, start: int, end: int) -> RangeUnsupported:
    return RangeUnsupported(
        f"{redact(url)} answered {status}, not 206, to a request for bytes {start}-{end - 1}: "
        "the server does not serve byte ranges, which remote shards need"
    )


async def _http_range(fs, url: str, start: int, end: int) -> bytes:
    """fsspec's HTTP cat_file reads whatever body comes back: from a server that ignores Range,
    the whole shard for every sample. Here a reply other than 206 fails before its body is
    read."""
    kwargs = dict(fs.kwargs)
    headers = {
        **kwargs.pop("headers", {}),
        "Range": f"bytes={start}-{end - 1}",
        "Accept-Encoding": "identity",  # byte ranges of the file itself, never of a gzip of it
    }
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 404:
            raise FileNotFoundError(f"{redact(url)}: 404 {response.reason}")
        if response.status >= 400:
            raise RemoteError(
                f"{redact(url)}: {response.status} {response.reason}", response.status
            )
        if response.status != 206:
            raise _no_ranges(url, response.status, start, end)
        return await response.read()


def _proxied() -> bool:
    """Whether an HTTP(S) proxy is configured: botocore (so s3fs) honours it with its NO_PROXY
    rules, the plain pool of `_S3Ranges` would not, so S3 reads then stay on s3fs."""
    proxies = urllib.request.getproxies()
    return "http" in proxies or "https" in proxies


class _S3Ranges:
    """Ranged GETs of S3 objects without s3fs, whose request path (aiobotocore signing and
    parsing each request, on the event loop thread) cost ~4.6 ms of CPU a read, over a
    third of decoding a clip: botocore signs a GET URL per shard locally (no request; the AWS
    credential chain, region and `AWS_ENDPOINT_URL` as for s3fs), then each range is one GET of
    that URL from a shared urllib3 pool, ~1.1 ms a read. One instance a process: neither the
    client nor the pool's sockets survive a fork.

    URLs are re-signed every `RESIGN_S`, well before they or the temporary credentials they
    were signed with expire (botocore refreshes those with 10-15 min left), and after a failed
    read. Their query is the signature: messages name the s3:// URL, never the signed one."""

    EXPIRES_S, RESIGN_S = 3600, 300

    def __init__(self):
        self.pid = os.getpid()
        # Imported on use: local shards need no botocore (the GPU image has none).
        import botocore.config
        import botocore.httpsession
        import botocore.session

        self.session = botocore.session.get_session()
        # SigV4: botocore still presigns with SigV2 in us-east-1, which newer regions refuse.
        self.config = botocore.config.Config(signature_version="s3v4")
        self.clients = {None: self.session.create_client("s3", config=self.config)}
        self.regions: dict[str, str] = {}  # bucket -> region, where S3 said it is elsewhere
        self.signed: dict[str, tuple[float, str]] = {}  # s3:// URL -> (when signed, URL)
        ca_bundle = self.session.get_config_variable("ca_bundle")
        self.pool = urllib3.PoolManager(
            maxsize=32,  # per host; each loader worker reads with `data.read_ahead` threads
            retries=False,  # RangeReader retries, with backoff
            timeout=urllib3.Timeout(connect=60, read=60),  # botocore's defaults
            ca_certs=ca_bundle or botocore.httpsession.get_cert_path(True),
        )

    def sign(self, url: str) -> str:
        signed_at, signed = self.signed.get(url, (0.0, ""))
        if time.monotonic() - signed_at < self.RESIGN_S:
            return signed
        bucket, key = urlparse(url).netloc, urlparse(url).path.lstrip("/")
        region = self.regions.get(bucket)
        if region not in self.clients:
            self.clients[region] = self.session.create_client(
                "s3", region_name=region, config=self.config
            )
        signed = self.clients[region].generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.EXPIRES_S
        )
        self.signed[url] = (time.monotonic(), signed)
        return signed

    def read(self, url: str, start: int, end: int) -> bytes:
        signed = self.sign(url)
        try:
            response = self.pool.request(
                "GET",
                signed,
                headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                preload_content=False,
                redirect=False,
            )
            if response.status == 206:
                data = response.read()
                response.release_conn()
                return data
            body = b"" if response.status == 200 else response.read(4096)
            response.close()  # a 200 is the whole object: never read, and not kept alive
        except urllib3.exceptions.HTTPError as error:  # their messages may quote the signed URL
            self.signed.pop(url, None)
            raise OSError(str(error).replace(urlparse(signed).query, "<signature>")) from None
        self.signed.pop(url, None)
        if response.status == 200:
            raise _no_ranges(url, 200, start, end)
        region = response.headers.get("x-amz-bucket-region")
        if region and response.status in (301, 400):  # the bucket is in another region
            self.regions[urlparse(url).netloc] = region
        code = re.search(rb"<Code>(\w+)</Code>", body)
        reason = f"{response.status} {code[1].decode() if code else response.reason}"
        if response.status == 404:
            raise FileNotFoundError(f"{redact(url)}: {reason}")
        raise RemoteError(f"{redact(url)}: {reason}", response.status)


_s3_lock = threading.Lock()
_s3: _S3Ranges | None = None


def _s3_ranges() -> _S3Ranges:
    """This process's `_S3Ranges`, made on its first S3 read (a forked worker makes its own)."""
    global _s3
    with _s3_lock:
        if _s3 is None or _s3.pid != os.getpid():
            _s3 = _S3Ranges()
        return _s3


class RangeReader:
    """Byte ranges of files, local or remote: one request a range, retried as `RetryPolicy`
    says; remote ranges optionally go through a `DiskCache`. Counts its retries and the time
    they waited (`take_retry_counts`)."""

    def __init__(
        self,
        retries: int = 3,
        backoff_s: float = 0.5,
        cache: DiskCache | None = None,
        seed: int = 0,
    ):
        self.policy, self.cache = RetryPolicy(retries, backoff_s, seed), cache
        self._files: dict[str, int] = {}  # local path -> descriptor, opened in this process
        self._pid = os.getpid()
        self._lock = threading.Lock()  # read-ahead threads retry at once
        self._retries, self._waited_s = 0, 0.0

    def take_retry_counts(self) -> tuple[int, float]:
        """Retries and seconds waited for them since the last call."""
        with self._lock:
            counts = self._retries, self._waited_s
            self._retries, self._waited_s = 0, 0.0
        return counts

    def _in_this_process(self) -> None:
        """A forked loader worker opens its own descriptors and draws its own waits."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
            # Readers fork into torch's loader workers; importing torch up here would burden
            # every storage command (manifest indexing, shard writing) with it.
            from torch.utils.data import get_worker_info

            worker = get_worker_info()
            self.policy.reseed(worker.id if worker is not None else self._pid)

    def read(self, url: str, offset: int, size: int) -> bytes:
        if not is_remote(url):
            return self._read_local(local_path(url), offset, size)
        name = DiskCache.entry_name(url, offset, size) if self.cache else ""
        data = self.cache.get(name) if self.cache else None
        if data is None:
            data = self._read_remote(url, offset, size)
            if self.cache:
                self.cache.put(name, data)
        return data

    def _read_local(self, path: str, offset: int, size: int) -> bytes:
        self._in_this_process()
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ReadError(f"{path}: {len(data)} bytes at offset {offset}, {size} expected")
        return data

    def _read_remote(self, url: str, offset: int, size: int) -> bytes:
        self._in_this_process()
        attempt = 0
        while True:
            try:
                data = _cat_range(url, offset, offset + size)
                if len(data) != size:
                    raise ReadError(f"{len(data)} bytes returned for a range of {size}")
                return data
            except Exception as error:  # stores raise many types; the policy sorts them
                wait_s = self.policy.wait_s(attempt, error)
                if wait_s is None:
                    if isinstance(error, RangeUnsupported):
                        raise
                    raise ReadError(
                        f"{redact(url)} bytes {offset}-{offset + size - 1}: {error!r} "
                        f"(after {attempt + 1} attempts)"
                    ) from error
                log.debug("retrying %s in %.2f s: %r", redact(url), wait_s, error)
                with self._lock:
                    self._retries, self._waited_s = self._retries + 1, self._waited_s + wait_s
                time.sleep(wait_s)
                attempt += 1
