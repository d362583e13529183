"""The one way medbalance deletes: inside a job's own output, never what a manifest references.

Every job that replaces or cleans up output (ingest and ``gan synthesize`` through
``ShardWriter``, ``predict``, a sweep that failed before its first trial) deletes through
:class:`OutputTree`; no other module calls a filesystem's delete (``git grep`` for ``rmtree``,
``delete_dir``, ``delete_file``, ``os.remove`` and ``unlink`` outside ``tests/`` finds this module
and the S3 handler that implements pyarrow's filesystem interface).

    fs, root = storage.resolve("runs/preds")
    tree = OutputTree(fs, root, "runs/preds")
    tree.delete(["predictions-old"], where="runs/preds/_SUCCESS.json",
                protect=references.referenced_files(new_manifest, "runs/preds"))

The rules, each checked for EVERY entry before ANYTHING is deleted (so a refusal deletes nothing):

1. An entry is a relative path (``predictions-x``, ``shards-y/train-00000.parquet``) read from a
   file of the output or made by the job. Absolute paths, ``..``, empty or ``.`` segments,
   backslashes and NUL are refused: :func:`relative_entry`.
2. Its target lies strictly inside the output's own tree after symlinks are resolved (local
   storage): a symlink inside the output that points elsewhere is refused, and so is the output
   folder itself.
3. It neither is nor contains a protected location: every shard of the manifest being published
   and, transitively through dataset versions, of every dataset it includes, plus those datasets'
   manifests (``shards.references.referenced_files``).

A refusal raises :class:`UnsafeDeletion` (a ``MedbalanceError``: one line, exit status 2) naming
the entry, the file it came from and what to do. :func:`check_outside` is the up-front check of
jobs that write next to data they rely on: ``gan synthesize --output`` may not be, contain or lie
inside a dataset the new version includes, ``predict --output`` not its input.

This module sits below ``shards.storage`` (which removes its own temporary files through
:func:`discard_local_temp`), so it works on ``(filesystem, path)`` pairs, never on URIs.
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterable

import pyarrow.fs as pafs

from medbalance.errors import ConfigError

logger = logging.getLogger(__name__)


class UnsafeDeletion(ConfigError):
    """A deletion (or an output) that would reach outside the job's own output or into referenced
    data; nothing was deleted. A ``ConfigError``: the fix is another output, or a look by hand."""


def relative_entry(entry, where: str) -> str:
    """Check a path read from disk (``_SUCCESS.json``, a manifest) or made by a job.

    Args:
        entry: the path as read.
        where: the file it was read from, for the message.

    Returns:
        The entry, normalised (no trailing slash).

    Raises:
        UnsafeDeletion: the entry is not a plain relative path that stays where it is read.
    """
    text = entry if isinstance(entry, str) else None
    bad = (text is None or not text.strip("/") or text.startswith("/") or "\\" in text or "\x00" in text
           or "://" in text)
    parts = [] if bad else text.rstrip("/").split("/")
    if bad or any(part in ("", ".", "..") for part in parts):
        raise UnsafeDeletion(
            f"{where} lists {entry!r}, which is not a relative path inside its folder (absolute, '..', "
            "empty or not a string): the file was edited or damaged. Nothing was deleted; check that folder "
            "by hand and remove the file, or choose another output")
    return "/".join(parts)


Location = tuple  # (storage kind: "local" or "remote", path with symlinks resolved)


def location(fs: pafs.FileSystem, path: str) -> Location:
    """Where ``path`` on ``fs`` really is: symlinks resolved on local storage (object stores have none)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return "local", os.path.realpath(path)
    return "remote", posixpath.normpath(path)


def _inside(inner: str, outer: str) -> bool:
    """True when ``inner`` is ``outer`` or lies under it."""
    inner, outer = inner.rstrip("/"), outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def overlaps(a: Location, b: Location) -> bool:
    """True when two locations are on the same storage and one is, contains or lies inside the other."""
    return a[0] == b[0] and (_inside(a[1], b[1]) or _inside(b[1], a[1]))


def check_outside(output: str, output_location: Location, others: Iterable[tuple[str, Location]],
                  flag: str = "--output", why: str = "") -> None:
    """Refuse an output that is, contains or lies inside any of ``others`` (``(label, location)``
    pairs; the label names the other in the message, e.g. ``"--input /data/x"``).

    Raises:
        UnsafeDeletion: naming the output, the other location and ``why`` it matters.
    """
    for label, other in others:
        if overlaps(output_location, other):
            raise UnsafeDeletion(
                f"{flag} {output} overlaps {label} (it is, contains or lies inside it, symlinks resolved){why}. "
                f"Nothing was written or deleted; choose a {flag} of its own")


class OutputTree:
    """A job's output folder: the only place it may delete, entry by entry.

    Args:
        fs, root: the output's filesystem and path (``storage.resolve(uri)``).
        uri: the output as the user wrote it, for messages.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri
        self.real_root = location(fs, self.root)

    def target(self, entry: str, where: str, protect: Iterable[Location] = ()) -> str:
        """The path to delete for ``entry``, after every rule of the module docstring.

        Raises:
            UnsafeDeletion: naming the entry and ``where`` it came from.
        """
        entry = relative_entry(entry, where)
        path = f"{self.root}/{entry}"
        real = location(self.fs, path)
        if real == self.real_root or not _inside(real[1], self.real_root[1]):
            raise UnsafeDeletion(
                f"{where} lists {entry!r}, which resolves to {real[1]}, outside {self.uri} (a symlink out of "
                "the folder): nothing was deleted; remove the link by hand or choose another output")
        for protected in protect:
            if overlaps(protected, real):
                raise UnsafeDeletion(
                    f"deleting {entry!r} of {self.uri} (listed in {where}) would delete {protected[1]}, which a "
                    "dataset manifest still references: nothing was deleted. Write the new data to an output "
                    "of its own")
        return path

    def delete(self, entries: Iterable[str], *, where: str, protect: Iterable[Location] = ()) -> None:
        """Check every entry, then delete each (a folder with all it holds, or a file; missing is fine).

        A deletion that fails after the checks is logged with its path, not raised: the job's new
        data is already in place, and the leftover is named for deleting by hand.

        Raises:
            UnsafeDeletion: an entry breaks a rule; nothing was deleted.
        """
        protect = list(protect)
        paths = [self.target(entry, where, protect) for entry in entries]
        for path in paths:
            _remove(self.fs, path)

    def discard(self, entries: Iterable[str]) -> None:
        """Delete what this job itself just created (a failed run's new folder), by the same rules."""
        self.delete(entries, where=f"the files this job wrote under {self.uri}")


def _remove(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file, a folder or an object-store prefix; missing is fine, a failure is logged."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        else:
            fs.delete_dir(path)
    except OSError:
        try:  # object stores have no real folders: delete what is under the prefix
            fs.delete_dir_contents(path, missing_dir_ok=True)
        except OSError as exc:
            logger.warning("could not delete %s (%s); delete it by hand", path, exc)


def discard_local_temp(path: str) -> None:
    """Remove a local temporary file this process created (``storage.write_bytes_atomic``)."""
    if os.path.lexists(path):
        os.remove(path)
