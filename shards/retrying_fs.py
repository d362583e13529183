"""An S3 filesystem that rides out a short outage and fails fast on a wrong setting.

``RetryingS3`` is a ``pyarrow.fs.FileSystemHandler`` around ``pyarrow.fs.S3FileSystem``; wrapped
in ``pyarrow.fs.PyFileSystem`` it is an ordinary pyarrow filesystem, so Ray Data, Ray Train's
checkpoint storage, Ray Tune and our own reads and writes all use it unchanged.

* **Transient failures** (connection refused or reset, a request that gets no answer, HTTP 5xx,
  throttling) are retried with exponential backoff (0.5 s doubling to 4 s) as long as the next
  attempt starts within :data:`RETRY_BUDGET_S` of the first; an S3 server that restarts within
  that window is never noticed by the job. Writes are buffered in a local temporary file and
  uploaded whole (one PUT or multipart upload per attempt), so an upload cut by an outage is
  simply made again: an object is either complete or absent.
* **Permanent failures** (403 wrong credentials, a missing bucket, a missing key) are raised at
  once, as the SDK reports them.

So a wrong endpoint (nothing listening) fails after the retry budget, and one that accepts
connections but never answers fails after a few request timeouts: both within ~25 s, and an
S3 server restart of up to ~15 s goes unnoticed.

The handler holds no credentials: the AWS SDK's default chain finds them in each process that
uses it (environment, profile, instance role), so pickling it (Ray does, into tasks, actors and
Tune's experiment state) carries only the endpoint, region and timeouts.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time

import pyarrow as pa
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3
REQUEST_TIMEOUT_S = 5     # a stall timeout: no byte for this long (a slow upload that moves is fine)
RETRY_BUDGET_S = 20.0     # keep retrying transient failures for this long after the first one
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)

# What the AWS SDK (through Arrow) says for failures that another attempt may get past.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode: (?:6|7|28|52|55|56)|Couldn't connect|Connection refused|"
    r"Timeout was reached|timed out|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|INTERNAL_FAILURE|"
    r"REQUEST_TIMEOUT|HTTP response code (?:500|502|503|504)|Empty reply|Recv failure|"
    r"connection (?:was )?reset|Broken pipe",
    re.IGNORECASE)


def is_transient(exc: BaseException) -> bool:
    """True for an S3 error that a later attempt may not repeat (network, 5xx, throttling)."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and bool(_TRANSIENT.search(str(exc)))


class RetryingS3(pafs.FileSystemHandler):
    """Filesystem handler: ``pafs.PyFileSystem(RetryingS3(endpoint=..., scheme=..., region=...))``.

    Args:
        endpoint: ``host:port`` of an S3-compatible server, or None for AWS.
        scheme: ``http`` or ``https``.
        region: the bucket's region.
        retry_budget_s: how long to keep retrying transient failures.
    """

    def __init__(self, endpoint: str | None, scheme: str, region: str,
                 retry_budget_s: float = RETRY_BUDGET_S):
        self.endpoint, self.scheme, self.region = endpoint, scheme, region
        self.retry_budget_s = retry_budget_s
        self._inner: pafs.S3FileSystem | None = None

    # --- plumbing
    def __reduce__(self):
        return RetryingS3, (self.endpoint, self.scheme, self.region, self.retry_budget_s)

    def __eq__(self, other):
        return isinstance(other, RetryingS3) and self.__reduce__() == other.__reduce__()

    @property
    def inner(self) -> pafs.S3FileSystem:
        if self._inner is None:
            # background_writes=False: an upload runs in the calling thread. pyarrow's copy_files (Ray
            # Train and Tune sync folders with it) calls this handler from its I/O thread pool; background
            # writes would queue the upload on that same pool and wait for it, and with every pool
            # thread waiting so, nothing runs (a Tune experiment-state sync hung that way).
            kwargs = dict(region=self.region, connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                          retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1), background_writes=False)
            if self.endpoint:
                kwargs.update(endpoint_override=self.endpoint, scheme=self.scheme)
            self._inner = pafs.S3FileSystem(**kwargs)
        return self._inner

    def _retry(self, what: str, fn, *args):
        """Call ``fn``; retry transient failures with backoff while the next attempt still starts
        within ``retry_budget_s`` of the first one."""
        started = time.monotonic()
        for attempt in range(10_000):
            try:
                return fn(*args)
            except OSError as exc:
                if not is_transient(exc):
                    raise
                elapsed = time.monotonic() - started
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                if elapsed + delay >= self.retry_budget_s:
                    raise OSError(f"{exc} (still failing after {elapsed:.0f} s of retries)") from exc
                logger.warning("S3 %s failed (%s); retrying in %.1f s", what, str(exc).splitlines()[0][:200], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- FileSystemHandler
    def get_type_name(self):
        return "medbalance-s3"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry("stat", self.inner.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self._retry("list", self.inner.get_file_info, selector)

    def create_dir(self, path, recursive):
        return self._retry("create_dir", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        return self._retry("delete_dir", self.inner.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._retry("delete_dir_contents",
                           lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the S3 root")

    def delete_file(self, path):
        return self._retry("delete_file", self.inner.delete_file, path)

    def move(self, src, dest):
        return self._retry("move", self.inner.move, src, dest)

    def copy_file(self, src, dest):
        return self._retry("copy", self.inner.copy_file, src, dest)

    def open_input_stream(self, path):
        return self._retry("open", self.inner.open_input_stream, path)

    def open_input_file(self, path):
        return self._retry("open", self.inner.open_input_file, path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_BufferedUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("S3 objects cannot be appended to")


class _BufferedUpload:
    """A writable file that spools to local disk and uploads the whole object on close, with the
    handler's retries (an object is never half-written, and an upload cut short is made again)."""

    def __init__(self, handler: RetryingS3, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
        self.closed = False

    def write(self, data) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        """Flush the local spool. Nothing reaches S3 before ``close``: the object is uploaded whole."""
        self.spool.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.spool.tell()

    def _upload(self) -> None:
        self.spool.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as sink:
            while chunk := self.spool.read(8 * 1024 * 1024):
                sink.write(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler._retry("upload", self._upload)
        finally:
            self.spool.close()


def retrying_s3_from_env() -> pafs.PyFileSystem:
    """The S3 filesystem for the endpoint and region in the standard AWS variables."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    host, scheme = None, "https"
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        host, scheme = parsed.netloc, parsed.scheme or "http"
    return pafs.PyFileSystem(RetryingS3(host, scheme, region))
