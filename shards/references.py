"""What a dataset relies on: the datasets it includes by reference, and every file behind them.

A dataset version (manifest format 2, ``gan synthesize``) lists shards of other datasets by
reference; those may be versions themselves. The deletion guard (``shards.deletion``) protects
every file found here, and jobs that write a dataset version refuse an output that overlaps one
of these datasets.

    included_datasets("runs/data/v2")       # ["runs/data/v2", "runs/data/v1", "runs/data/base"]
    referenced_files(manifest, "runs/data/v2")
"""
from __future__ import annotations

from medbalance.errors import MedbalanceError
from shards import storage
from shards.deletion import Location, location
from shards.reader import read_manifest
from shards.schema import MANIFEST_NAME, Manifest


def location_of(uri: str) -> Location:
    """Where a URI really is (symlinks resolved locally), for overlap checks."""
    return location(*storage.resolve(uri))


def _manifest_or_none(uri: str) -> Manifest | None:
    try:
        return read_manifest(uri)
    except (MedbalanceError, OSError):
        return None  # missing or unreadable: its files are still protected by path


def included_datasets(uri: str, manifest: Manifest | None = None) -> list[tuple[str, Manifest | None]]:
    """``uri`` and every dataset it includes, followed transitively through versions.

    Returns:
        ``(dataset URI, its manifest or None when it cannot be read)``, ``uri`` first; each
        dataset once, even when versions include each other.
    """
    out: list[tuple[str, Manifest | None]] = []
    seen: set[Location] = set()
    queue = [(uri, manifest)]
    while queue:
        current, known = queue.pop(0)
        where = location_of(current)
        if where in seen:
            continue
        seen.add(where)
        known = known or _manifest_or_none(current)
        out.append((current, known))
        if known is not None:
            queue += [(ref["uri"], None) for ref in known.references if isinstance(ref, dict) and ref.get("uri")]
            queue += [(shard.dataset, None) for shard in known.shards if shard.dataset]
    return out


def referenced_files(manifest: Manifest, uri: str) -> set[Location]:
    """Every file the manifest of ``uri`` relies on: its shards, and the manifest and shards of every
    dataset it includes, transitively (as :func:`shards.deletion.location`)."""
    protected: set[Location] = set()
    for dataset, own in included_datasets(uri, manifest):
        if dataset != uri:
            # an included dataset whose manifest cannot be read: all of it (its shards are unknown)
            protected.add(location_of(storage.join(dataset, MANIFEST_NAME) if own else dataset))
        for shard in own.shards if own else []:
            protected.add(location_of(storage.join(shard.dataset or dataset, shard.path)))
    return protected
