"""Storage URIs -> ``pyarrow.fs`` filesystems.

One function, :func:`resolve`, turns a URI into a filesystem and a path on it:

=============================  ==========================  ===========================
URI                            filesystem                   path
=============================  ==========================  ===========================
``/data/x``, ``./x``           ``LocalFileSystem``          absolute local path
``file:///data/x``             ``LocalFileSystem``          ``/data/x``
``s3://bucket/prefix``         ``S3FileSystem``             ``bucket/prefix``
=============================  ==========================  ===========================

The S3 endpoint and credentials come from the standard AWS variables, so MinIO, Ceph, SeaweedFS
and AWS S3 work unchanged: ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``; unset means AWS),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or
``AWS_DEFAULT_REGION``). A URI with a query string (``s3://b/p?endpoint_override=...``) is handed to
``pyarrow.fs.FileSystem.from_uri`` as it is.

Writes that must never be seen half-done go through :func:`write_bytes_atomic`.
"""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

import logging

import pyarrow.fs as pafs

from medbalance.errors import StorageError

logger = logging.getLogger(__name__)


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``)."""
    return str(uri).startswith("s3://")


# Timeouts: a server that accepts connections and never answers fails a request after
# REQUEST_TIMEOUT_S without a byte (it is a stall timeout, so a long upload that makes progress is
# not cut), at most S3_ATTEMPTS times: ~25 s in all, not minutes.
CONNECT_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 8
S3_ATTEMPTS = 3


def _s3_from_env() -> pafs.S3FileSystem:
    """An S3 filesystem for the endpoint and region in the environment.

    Credentials are NOT passed in: the AWS SDK's default chain finds them (``AWS_ACCESS_KEY_ID``
    / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a profile, or an instance role) in each
    process that uses the filesystem. A filesystem given explicit keys carries them when pickled,
    and Ray pickles filesystems into tasks, actors and Tune's experiment state; this one does not.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Turn a storage URI into ``(filesystem, path)``.

    Args:
        uri: a local path, ``file://`` URI or ``s3://bucket/prefix``.

    Returns:
        The filesystem and the path on it (absolute for local; ``bucket/prefix`` for S3), with
        no trailing slash.

    Raises:
        StorageError: for an unsupported scheme or an S3 URI without a bucket.
    """
    uri = str(uri)
    if uri.startswith("s3://"):
        if "?" in uri:
            try:
                fs, path = pafs.FileSystem.from_uri(uri)
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot open {uri!r}: {exc}") from exc
            return fs, path.rstrip("/")
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        return _s3_from_env(), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(
            f"unsupported storage scheme in {uri!r}: use a local path, file:// or s3://bucket/prefix"
        )
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (keeps the scheme)."""
    base = str(uri).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def explain(uri: str, exc: Exception, doing: str) -> StorageError:
    """A StorageError that says what could not be done, where, and (for S3) what to check."""
    hint = ""
    if is_remote(uri):
        hint = (
            " Check that the bucket exists and that AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY point at a reachable S3 server."
        )
    return StorageError(f"cannot {doing} {uri}: {exc}.{hint}")


def exists(fs: pafs.FileSystem, path: str, uri: str | None = None) -> bool:
    """True if ``path`` is a file or directory on ``fs``."""
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise explain(uri or path, exc, "reach") from exc


def read_bytes(fs: pafs.FileSystem, path: str, uri: str | None = None) -> bytes:
    """Read a whole file."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri or path} does not exist") from exc
    except OSError as exc:
        raise explain(uri or path, exc, "read") from exc


def ensure_dir(fs: pafs.FileSystem, path: str, uri: str | None = None) -> None:
    """Create a directory (a no-op prefix on object stores, but the bucket must exist)."""
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise explain(uri or path, exc, "create") from exc


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, uri: str | None = None) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part.

    Local: write a temporary sibling, fsync, then ``os.replace`` (atomic on POSIX).
    S3: a single PUT is atomic (the object appears only when the upload completes).
    """
    parent = path.rsplit("/", 1)[0]
    ensure_dir(fs, parent, uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise explain(uri or path, exc, "write") from exc


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete a directory/prefix and everything under it; missing is fine."""
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError:
        # Object stores have no real directories: delete what is under the prefix.
        try:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        except OSError as exc:
            logger.warning("could not delete %s (%s); delete it by hand", path, exc)
