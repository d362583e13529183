"""Storage URIs -> ``pyarrow.fs`` filesystems.

One function, :func:`resolve`, turns a URI into a filesystem and a path on it:

=============================  ==========================  ===========================
URI                            filesystem                   path
=============================  ==========================  ===========================
``/data/x``, ``./x``           ``LocalFileSystem``          absolute local path
``file:///data/x``             ``LocalFileSystem``          ``/data/x``
``s3://bucket/prefix``         retrying ``S3FileSystem``    ``bucket/prefix``
=============================  ==========================  ===========================

The S3 endpoint and credentials come from the standard AWS variables, so MinIO, Ceph, SeaweedFS
and AWS S3 work unchanged: ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``; unset means AWS),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or
``AWS_DEFAULT_REGION``). A URI with a query string (``s3://b/p?endpoint_override=...``) is handed to
``pyarrow.fs.FileSystem.from_uri`` as it is.

Writes that must never be seen half-done go through :func:`write_bytes_atomic`. Nothing here
deletes: deletion goes through ``shards.deletion`` (the output's own tree only).
"""
from __future__ import annotations

import os
import re
import uuid

import pyarrow.fs as pafs

from medbalance.errors import ConfigError, StorageError
from shards.deletion import discard_local_temp


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``)."""
    return str(uri).startswith("s3://")


def _s3_from_env() -> pafs.FileSystem:
    """The S3 filesystem for the endpoint and region in the environment (shards.retrying_fs):
    it retries transient failures for a while, fails at once on wrong credentials or a missing
    bucket, and carries no credentials when pickled (the AWS SDK's default chain finds them in
    each process: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a
    profile, or an instance role)."""
    from shards.retrying_fs import retrying_s3_from_env

    return retrying_s3_from_env()


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


_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|INVALID_ACCESS_KEY|SignatureDoesNotMatch|"
                     r"SIGNATURE_DOES_NOT_MATCH|HTTP response code 403|MISSING_AUTHENTICATION", re.IGNORECASE)
_NO_BUCKET = re.compile(r"NoSuchBucket|NO_SUCH_BUCKET|bucket does not exist|Bucket '[^']*' not found", re.IGNORECASE)


def explain(uri: str, exc: Exception, doing: str) -> StorageError:
    """A StorageError that says what could not be done, where, and (for S3) what to check."""
    from shards.retrying_fs import is_transient

    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not is_remote(uri):
        return StorageError(f"cannot {doing} {uri}: {detail}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if _DENIED.search(str(exc)):
        hint = (f"the S3 server at {endpoint} refused the credentials: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the instance role) and the bucket's permissions")
    elif _NO_BUCKET.search(str(exc)):
        hint = f"bucket {bucket!r} does not exist at {endpoint}: create it, or fix the URI or AWS_ENDPOINT_URL"
    elif is_transient(exc):
        hint = (f"the S3 endpoint {endpoint} did not answer: check AWS_ENDPOINT_URL and that the "
                "server is up and reachable from this machine")
    else:
        hint = ("check that the bucket exists and that AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY point at a reachable S3 server")
    return StorageError(f"cannot {doing} {uri}: {hint} ({detail})")


def exists(fs: pafs.FileSystem, path: str, uri: str | None = None) -> bool:
    """True if ``path`` is a file or directory on ``fs``.

    Raises:
        StorageError: the storage cannot be reached, or (S3) the bucket itself does not exist:
            that is a wrong URI or endpoint, not a missing file.
    """
    try:
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
        if not found and uri and is_remote(uri) and "/" in path:
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(
                    f"cannot reach {uri}: bucket {bucket!r} does not exist at "
                    f"{os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL') or 'AWS S3'}: "
                    "create it, or fix the URI or AWS_ENDPOINT_URL")
        return found
    except OSError as exc:
        raise explain(uri or path, exc, "reach") from exc


def check_folder(uri: str, flag: str) -> None:
    """Refuse a folder argument (``--output``, ``--out``, ``--storage``) that names a file, or lies
    under one: one line naming the flag and the file, instead of ``NotADirectoryError``.

    Raises:
        ConfigError: naming the flag and the file.
    """
    fs, path = resolve(uri)
    candidates = [path]
    if isinstance(fs, pafs.LocalFileSystem):
        parent = os.path.dirname(path)
        while parent and parent != candidates[-1]:
            candidates.append(parent)
            parent = os.path.dirname(parent)
    for candidate in candidates:
        try:
            kind = fs.get_file_info(candidate).type
        except OSError as exc:
            raise explain(uri, exc, "reach") from exc
        if kind == pafs.FileType.File:
            what = "is a file" if candidate == path else f"lies under {candidate}, which is a file"
            raise ConfigError(f"{flag} {uri} {what}, not a folder: give a folder (it is created if missing)")
        if kind == pafs.FileType.Directory:
            return


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
                discard_local_temp(tmp)  # gone after the rename; left only by a failed write
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise explain(uri or path, exc, "write") from exc


def copy_dir(local_dir: str, out_uri: str) -> None:
    """Copy a local folder's files to a storage URI (each file written atomically)."""
    fs, root = resolve(out_uri)
    ensure_dir(fs, root, out_uri)
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            write_bytes_atomic(fs, f"{root}/{name}", f.read(), join(out_uri, name))
