"""Telling a damaged dataset apart from a lost worker, inside a Ray Train worker.

Ray Data raises a decode or read error of a map/read task in the worker that iterates the
dataset, wrapped in Ray's exception types. Retrying cannot help with a damaged shard (the same
row fails again), so the training loops stop on it at once, all workers together, with one
message that names the shard and row and says to run ``--verify``; anything else (a dead worker,
a lost node) is raised as before, for Ray Train's ``FailureConfig`` to retry.
"""
from __future__ import annotations

import re

import pyarrow as pa

from medbalance.errors import DataError

# Errors Arrow raises for bytes that are not valid Parquet (truncated, flipped, wrong file).
_PARQUET_ERRORS = (pa.ArrowInvalid, pa.ArrowIOError)
# A remote task's exception reaches the driver pickled: its chain (__cause__) is gone, and only
# Ray's traceback text still says what the original error was.
_REMOTE_DATA_ERROR = re.compile(r"^(?:medbalance\.errors\.)?DataError: (.+)$", re.MULTILINE)
_REMOTE_PARQUET_ERROR = re.compile(
    r"^(?:pyarrow\.lib\.)?(?:ArrowInvalid|ArrowIOError|OSError|FileNotFoundError): (.*\.parquet.*|.*Parquet.*)$",
    re.MULTILINE)


def _causes(exc: BaseException):
    """The exception, then what it wraps: ``cause`` (Ray's RayTaskError), __cause__, __context__."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]


def data_error_message(exc: BaseException, dataset_uri: str, advice: str | None = None) -> str | None:
    """A one-line message if ``exc`` comes from damaged data, else None.

    Args:
        exc: what iterating a Ray dataset raised.
        dataset_uri: the dataset, for the default advice (run ``--verify``).
        advice: what to do instead, for inputs that are not shard datasets.
    """
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
        return None
    advice = advice or (f"run `python -m ray_jobs.prepare --verify {dataset_uri}` to check every "
                        "shard, then re-create the damaged dataset")
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, DataError):
            return f"{_first_line(cause)}; {advice}"
    remote = "\n".join(f"{c}\n{getattr(c, 'traceback_str', '')}" for c in causes)
    found = _REMOTE_DATA_ERROR.findall(remote)
    if found:
        return f"{found[-1].strip()}; {advice}"
    for cause in causes:
        if isinstance(cause, _PARQUET_ERRORS) or (isinstance(cause, (OSError, FileNotFoundError))
                                                  and ".parquet" in str(cause)):
            return f"a shard of {dataset_uri} cannot be read ({_first_line(cause)}); {advice}"
    found = _REMOTE_PARQUET_ERROR.findall(remote)
    if found:
        return f"a shard of {dataset_uri} cannot be read ({found[-1].strip()}); {advice}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
