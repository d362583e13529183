"""A job's run folder ``<storage>/<name>/``: has it results, its newest checkpoint, its files.

    run = RunDir(storage="runs", name="r18-cws")
    run.check_resume("fresh")          # refuse a name that has results
    run.latest_checkpoint()            # URI of the newest complete checkpoint, or None
    run.write_json("result.json", summary)

"Results" are what a finished epoch leaves: a checkpoint folder or ``result.json``. Ray's own
bookkeeping files (``.validate_storage_marker`` from a run that failed before its first report,
a checkpoint-manager snapshot) are not results: a name whose first run failed can be used again.
"""
from __future__ import annotations

import dataclasses
import json

import pyarrow.fs as pafs

from medbalance.errors import ConfigError
from ray_jobs.runtime.checkpoint import CHECKPOINT_FILE, is_complete
from ray_jobs.runtime.progress import say
from shards import storage

RESULT_FILE = "result.json"
CHECKPOINT_PREFIX = "checkpoint_"
RESUME_MODES = ("auto", "resume", "fresh")


@dataclasses.dataclass(frozen=True)
class RunDir:
    storage: str   # local path or s3://bucket/prefix
    name: str

    @property
    def uri(self) -> str:
        return storage.join(self.storage, self.name)

    def _entries(self) -> list[pafs.FileInfo]:
        fs, path = storage.resolve(self.uri)
        if not storage.exists(fs, path, self.uri):
            return []
        try:
            return fs.get_file_info(pafs.FileSelector(path, recursive=False))
        except OSError as exc:
            raise storage.explain(self.uri, exc, "list") from exc

    def checkpoint_dirs(self) -> list[str]:
        """URIs of the checkpoint folders, oldest first (``checkpoint_<timestamp>`` sorts by time)."""
        names = sorted(i.base_name for i in self._entries()
                       if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
        return [storage.join(self.uri, n) for n in names]

    def has_results(self) -> bool:
        return any(i.base_name == RESULT_FILE or (i.type == pafs.FileType.Directory
                                                  and i.base_name.startswith(CHECKPOINT_PREFIX))
                   for i in self._entries())

    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint folder that holds a complete ``checkpoint.pt``.

        Ray Train restores a run on its own only when the earlier driver ended cleanly; after a
        killed driver it would start over, so jobs hand this URI to their training loop, which
        loads it when Ray gives it none (Train V2 deprecates ``resume_from_checkpoint``). A folder
        whose copy to storage was cut off by the kill (``checkpoint.is_complete``) is passed over,
        with a line that names it; it is left in place.
        """
        for uri in reversed(self.checkpoint_dirs()):
            if is_complete(uri):
                return uri
            say(f"passing over {uri}: its {CHECKPOINT_FILE} is missing or cut off (the earlier run was "
                "stopped while the folder was being written)")
        return None

    def check_resume(self, mode: str) -> bool:
        """Apply a resume mode; returns True when the run has results to resume from.

        Args:
            mode: ``auto`` (resume if there are results), ``resume`` (there must be),
                ``fresh`` (there must not be).
        """
        return apply_resume_mode(mode, self.uri, self.has_results())

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write a file of the run atomically; returns its URI."""
        fs, path = storage.resolve(self.uri)
        storage.write_bytes_atomic(fs, f"{path}/{name}", data, storage.join(self.uri, name))
        return storage.join(self.uri, name)

    def write_json(self, name: str, value) -> str:
        return self.write_bytes(name, json.dumps(value, indent=2, default=float).encode())

    def read_json(self, name: str):
        fs, path = storage.resolve(self.uri)
        return json.loads(storage.read_bytes(fs, f"{path}/{name}", storage.join(self.uri, name)))


def apply_resume_mode(mode: str, uri: str, existing: bool) -> bool:
    """Check a resume mode against whether the run at ``uri`` has results; returns ``existing``.

    Args:
        mode: ``auto`` (resume if there are results), ``resume`` (there must be), ``fresh`` (there
            must not be).

    Raises:
        ConfigError: the mode is unknown, or the run's state contradicts it.
    """
    if mode not in RESUME_MODES:
        raise ConfigError(f"unknown resume mode {mode!r}; use one of {RESUME_MODES}")
    if mode == "fresh" and existing:
        raise ConfigError(f"{uri} already has results; choose another --name, or drop --fresh to resume it")
    if mode == "resume" and not existing:
        raise ConfigError(f"--resume: {uri} has no results to resume")
    return existing


def checkpoint_uri(storage_uri: str, checkpoint) -> str:
    """A Ray ``Checkpoint`` written under ``storage_uri`` -> a URI the jobs accept."""
    if storage.is_remote(storage_uri) and "://" not in checkpoint.path:
        return f"s3://{checkpoint.path}"
    return checkpoint.path
