"""What every job's ``main`` shares: quiet Ray logging, ``--verbose``, SIGTERM handling, and
turning project errors into one line and exit status 2.

    if __name__ == "__main__":
        sys.exit(run_main(main))
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from medbalance.errors import MedbalanceError


class Terminated(SystemExit):
    """SIGTERM, raised where the job is so that its clean-up (``finally``/``except``) runs."""


def _on_sigterm(signum, frame):
    raise Terminated(143)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every Ray message and full tracebacks")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's ``main``; a :class:`MedbalanceError` prints its message and returns 2.

    SIGTERM (``kill``, ``ray job stop``, a scheduler) is turned into an exception, so a job
    cleans up exactly as on Ctrl-C (SIGINT): an ingest removes its unfinished shards, a prediction
    its unfinished files.
    """
    from ray_jobs.ray_runtime import configure_logging

    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    configure_logging(verbose=verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main(argv)
    except MedbalanceError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143


def add_run_flags(p) -> None:
    """The flags of a job that trains into a run folder: --gpu, --storage, --name, --resume | --fresh, -v."""
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, AMP)")
    p.add_argument("--storage", help="where runs go: local path or s3://bucket/prefix")
    p.add_argument("--name", help="run name; a rerun with the same name resumes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="require results to resume")
    group.add_argument("--fresh", action="store_true", help="refuse a name that has results")
    add_verbose_flag(p)
