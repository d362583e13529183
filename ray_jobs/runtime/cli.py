"""What every job's ``main`` shares: quiet Ray logging, ``--verbose``, SIGTERM handling, and
turning project errors into one line and exit status 2.

    if __name__ == "__main__":
        sys.exit(run_main(main))
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable

from medbalance.errors import MedbalanceError


class Terminated(SystemExit):
    """SIGTERM, raised where the job is so that its clean-up (``finally``/``except``) runs."""


def _on_sigterm(signum, frame):
    raise Terminated(143)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every Ray message and full tracebacks")


def description(doc: str) -> str:
    """A job's ``--help`` description: its module docstring's first paragraph, whole, on one line."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


class HelpWithDefaults(argparse.HelpFormatter):
    """Adds ``(default: X)`` to a flag's help where X says something (not None, False or empty)
    and the help does not already name its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of job ``prog`` (``medbalance <job>``): whole description, defaults shown."""
    return argparse.ArgumentParser(prog=prog, description=description(doc), formatter_class=HelpWithDefaults)


def add_config_flags(p: argparse.ArgumentParser, presets: str, example: str) -> None:
    """``--config``, ``--set`` and ``--print-config`` of a job with a typed config."""
    p.add_argument("--config", metavar="YAML", help=f"preset ({presets}); the flags below override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config key, e.g. {example} (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML) and exit without starting Ray")
    p.add_argument("--print-schema", action="store_true",
                   help="print the config's JSON Schema (for editors completing YAML presets) and exit")


# After the job's main returns, Ray's own shutdown (atexit) and Tune's threads must end the process;
# on a loaded machine they have been seen to hang. Past this many seconds the process exits anyway.
EXIT_GRACE_S = 60.0


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's ``main``; a :class:`MedbalanceError` prints its message and returns 2.

    SIGTERM (``kill``, ``ray job stop``, a scheduler) is turned into an exception, so a job
    cleans up exactly as on Ctrl-C (SIGINT): an ingest removes its unfinished shards, a prediction
    its unfinished files. Any other exception (a library raising where medbalance does not expect
    it) is one line and exit status 2 too, with the full traceback under ``--verbose``.

    Called as the process's entry (``argv`` None: the arguments are ``sys.argv``), it also makes sure
    the process then ends: a watchdog exits it if shutting Ray down hangs.
    """
    from ray_jobs.runtime.ray_setup import configure_logging

    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    if not sys.stdout.isatty():  # a file, a pipe, `ray job logs`: Ray's forwarded lines without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    configure_logging(verbose=verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main(argv)
    except Exception as exc:  # noqa: BLE001 (every error ends as one line)
        if verbose:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        code = 143
    if argv is None:
        _exit_even_if_shutdown_hangs(code)
    return code


def _one_line(exc: BaseException) -> str:
    """A project error's message; anything else as its type and first line, with what to do."""
    if isinstance(exc, MedbalanceError):
        return str(exc)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (f"unexpected {type(exc).__name__}: {first or '(no message)'}; medbalance does not handle this case: "
            "rerun with --verbose for the full traceback, and report it")


def _exit_even_if_shutdown_hangs(code: int) -> None:
    """Start a daemon timer that ends the process with ``code`` if it is still alive after
    :data:`EXIT_GRACE_S` (Ray's shutdown or a non-daemon thread of Tune holding it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def config_or_print(args: argparse.Namespace, cls: type, build: Callable[[argparse.Namespace], Any]):
    """The job's config built from its flags by ``build``, or None when ``--print-schema`` or
    ``--print-config`` (:func:`add_config_flags`) only asked to see it (printed here)."""
    from ray_jobs.runtime import configs

    if args.print_schema:
        print(json.dumps(configs.json_schema(cls), indent=2))
        return None
    cfg = build(args)
    if args.print_config:
        print(configs.dump_yaml(cfg), end="")
        return None
    return cfg


def add_run_flags(p) -> None:
    """The flags of a job that trains into a run folder: --gpu, --storage, --name, --resume | --fresh, -v."""
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl backend, AMP); default: CPU (gloo)")
    p.add_argument("--storage", help="where runs go: local path or s3://bucket/prefix (default: the config's, runs)")
    p.add_argument("--name", help="run name; a rerun with the same name resumes (default: the config's)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="require results to resume")
    group.add_argument("--fresh", action="store_true", help="refuse a name that has results")
    add_verbose_flag(p)
