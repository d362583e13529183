"""The Ray every job runs on: connect to a cluster, or start the embedded local one, quietly.

    configure_logging(verbose=False)   # first thing in a job's main(), before Ray is imported
    init_ray()                         # RAY_ADDRESS (``ray job submit`` sets it) or a local Ray

The embedded Ray keeps token authentication on (Ray 2.60's default for a local cluster; a token
is made in ``~/.ray/auth_token`` on first use, as Ray does). Ray announces that default at every
start with an opt-out hint; for the embedded Ray that notice is silenced (its logger, around
``ray.init`` only), never answered by turning authentication off.

What a job prints by default is its own progress lines, tables and paths, and Ray's genuine
warnings and errors. Ray lines that a user cannot act on are dropped with Ray's own settings:

* forwarded worker lines, by Ray's ``log_to_driver`` filter ``RAY_DEDUP_LOGS_SKIP_REGEX``
  (:data:`QUIET_WORKER_LINES`: each pattern matches one known message, never a failure);
* the driver's Python loggers: ``ray`` at WARNING (``ray.init(logging_level=...)``), Ray Data's
  "Progress bars disabled" notice logger at ERROR;
* Ray Data and Ray Train internals at WARNING (``RAY_DATA_LOG_LEVEL``, ``TrainConfig.log_level``).

``configure_logging(verbose=True)`` (every job's ``--verbose``) keeps all of them.

Credentials are never handed to Ray: workers of the embedded Ray inherit this process's
environment (the ``AWS_*`` variables included), and workers on a cluster use their node's
environment or instance role. A ``runtime_env`` would be logged by Ray's runtime-env agent, so the
job passes none with secrets in it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from medbalance.errors import ClusterError

# Ray's worker pool ends a task worker that has been idle for 1 s once there are more workers than
# CPUs. Between two epochs the data tasks' workers sit idle while the step trains, so each epoch
# would start new processes that import torch and torchvision again (seconds each, on the CPUs the
# pipeline needs). The embedded Ray keeps idle workers for a minute; on a cluster, pass the same
# with `ray start --system-config '{"idle_worker_killing_time_threshold_ms": 60000}'`.
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}

# Forwarded lines (from Ray's own actors and workers) that no user can act on. Each is one known
# message; none of them reports a failure of the job.
QUIET_WORKER_LINES = (
    # Ray Train / Ray Data put actor arguments in the object store themselves (ray#53727).
    r"has constructor arguments in the object store and max_restarts > 0",
    # We turn Ray Data's progress bars off (they garble logs); Ray says so once per process.
    r"Progress bars disabled\. To enable",
    # Ray-internal deprecations (e.g. Ray Train's own use of ExecutionOptions.exclude_resources),
    # printed as a warning line plus the source line that raised it.
    r"RayDeprecationWarning",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
    # The raylet's note that many Python workers started (fractional-CPU data tasks do that).
    r"PYTHON worker processes have been started on node",
)

# Ray Data settings every job's processes get (the job's own environment can override each).
# RAY_DATA_PARQUET_FOOTER_NUM_ACTORS: Ray 2.60 reads Parquet footers on a pool of actors made anew
# for every execution of a read, 32 by default: 32 new Python processes (~0.7 GB each) per epoch of
# every split's pipeline. One actor already drives 128 concurrent footer reads, plenty for datasets
# of tens to thousands of shards, and a read then starts in ~1 s instead of ~5 s on 2 cores (raise
# it for datasets of many thousands of shards on object storage).
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}

_VERBOSE = False


def configure_logging(verbose: bool = False) -> None:
    """Set what Ray will print for this job. Call before ``import ray`` (a job's ``main``).

    Args:
        verbose: keep every Ray message (``--verbose``).
    """
    global _VERBOSE
    _VERBOSE = verbose
    for key, value in RAY_DATA_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # matplotlib announces its font cache at INFO on first use.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if verbose:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "INFO")
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    pattern = "|".join(f"(?:{p})" for p in QUIET_WORKER_LINES)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", pattern)
    if "ray" in sys.modules:  # imported already (a test, a notebook): give its filter the pattern
        _set_skip_regex(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])


def add_quiet_worker_lines(*patterns: str) -> None:
    """Also drop forwarded worker lines matching ``patterns`` (e.g. the per-epoch lines of a sweep's
    many trials); nothing is dropped under ``--verbose``. Call before ``init_ray``."""
    if _VERBOSE:
        return
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    pattern = "|".join(([current] if current else []) + [f"(?:{p})" for p in patterns])
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = pattern
    if "ray" in sys.modules:
        _set_skip_regex(pattern)


def _set_skip_regex(pattern: str) -> None:
    """Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported; apply it to a loaded Ray too."""
    import re

    try:
        from ray._private import ray_logging
    except ImportError:  # another Ray layout: the environment variable still reaches new processes
        return
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(ray_logging, name, None)
        if dedup is not None and hasattr(dedup, "skip_re"):
            dedup.skip_re = re.compile(pattern)


def quiet_ray_train(level: str) -> None:
    """Apply ``level`` to Ray Train's per-report log line ("Reporting training result ..."),
    which ``LoggingConfig`` does not reach (its logger is not under ``ray.train``)."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(level)
    except (ImportError, AttributeError):  # another Ray version: keep its default
        pass


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data settings of a process that drives pipelines: no progress bars (they garble logs;
    the jobs print their own progress lines), no INFO lines unless ``verbose``."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start the embedded local Ray (idempotent)."""
    import ray

    quiet_ray_data(_VERBOSE)
    if ray.is_initialized():
        return
    for key, value in RAY_DATA_ENV.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS") or None
    auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_logger.level
    if address is None and not _VERBOSE:
        auth_logger.setLevel(logging.ERROR)  # "Token authentication is enabled ... to opt out"
    dashboard = {} if address else _embedded_dashboard()
    # ray.init installs its own SIGTERM handler (sys.exit(15)) in the driver; the job's own
    # (runtime.cli: clean-up, exit status 143, the exit watchdog) is put back afterwards.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        ray.init(address=address, log_to_driver=True, **dashboard,
                 logging_level=logging.INFO if _VERBOSE else logging.WARNING,
                 _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG,
                 # Only non-secret settings travel this way: Ray's runtime-env agent logs them.
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("RAY_DATA_LOG_LEVEL", *RAY_DATA_ENV)
                                           if k in os.environ}})
    except Exception as exc:  # noqa: BLE001 (Ray raises a bare Exception for a start-up time-out)
        problem = start_failure(exc, address)
        if problem is None:
            raise
        ray.shutdown()   # a half-started local Ray (its GCS or raylet) is not left running
        raise ClusterError(problem) from exc
    finally:
        auth_logger.setLevel(level)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def start_failure(exc: BaseException, address: str | None) -> str | None:
    """One line for a Ray that did not start or answer (``ray.init``), with what to do; None for
    anything else."""
    text = str(exc)
    if "timed out during startup" in text:
        return ("the local Ray did not start in time (Ray: \"The current node timed out during startup\": its "
                "raylet or GCS did not register within 30 s, which happens on an overloaded machine). Run the "
                "job again, free the machine (other jobs, another Ray instance, memory), or point RAY_ADDRESS "
                "at a running cluster")
    if address and isinstance(exc, ConnectionError):
        detail = text.splitlines()[0] if text.strip() else type(exc).__name__
        return (f"could not connect to the Ray cluster at RAY_ADDRESS={address} ({detail}): check that the cluster "
                "is up and the address is right, or unset RAY_ADDRESS to run on an embedded local Ray")
    return None


def _embedded_dashboard() -> dict:
    """Where the embedded Ray's dashboard listens, told to every Ray process it starts.

    Ray Train's ``PlacementGroupCleaner`` (a detached actor) removes the placement group of a run
    whose controller died, e.g. a sweep trial that ASHA stopped. It finds the cluster's state API
    through ``RAY_API_SERVER_ADDRESS``, else by looking for running Ray instances; with more than
    one Ray on the machine that look-up fails and the trial's CPUs stay reserved until the job
    ends. The embedded Ray's processes inherit this process's environment, so the address is set
    here, before they start, on a port chosen here.
    """
    import socket

    if os.environ.get("RAY_API_SERVER_ADDRESS") and not os.environ.get("MEDBALANCE_EMBEDDED_DASHBOARD"):
        return {}  # the user chose one
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ["MEDBALANCE_EMBEDDED_DASHBOARD"] = "1"  # ours: a later embedded Ray picks again
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port}


def run_as_task(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``, a function that drives a Ray Data pipeline, as a zero-CPU Ray
    task on the cluster, and return what it returns.

    Why: Ray Data's actor pools (evaluate's and predict's model replicas) make Ray's core worker
    print an error-level notice about actor arguments in the object store (ray#53727) from the
    process that drives the pipeline. From a task that line is forwarded to the driver like any
    worker line, so the ``log_to_driver`` filter above applies to it; from the driver itself it
    could only be hidden by hiding every core-worker error. On a cluster the pipeline's
    orchestration also runs next to the data, not in the submitting process.

    A project error raised by ``fn`` is raised here as it was (one line, exit status 2); Ctrl-C or
    SIGTERM cancels the task.
    """
    import ray

    from medbalance.errors import MedbalanceError

    init_ray()
    task = ray.remote(num_cpus=0, max_retries=0)(_call_quietly).options(name=fn.__name__)
    ref = task.remote(_VERBOSE, fn, *args, **kwargs)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, MedbalanceError):
            error = type(cause)(*cause.args)
        else:
            raise
    except BaseException:
        ray.cancel(ref, force=True)
        raise
    raise error


def run_as_tasks(fn, calls: list[tuple], max_concurrent: int) -> list:
    """:func:`run_as_task` for several calls of ``fn``, at most ``max_concurrent`` at a time.

    Each call (a tuple of positional arguments) runs as its own zero-CPU task; a new one starts
    when one ends. Returns the results in the order of ``calls``. The first project error raised
    by any call cancels the others and is raised here, as are Ctrl-C and SIGTERM.
    """
    import ray

    from medbalance.errors import MedbalanceError

    init_ray()
    task = ray.remote(num_cpus=0, max_retries=0)(_call_quietly).options(name=fn.__name__)
    results: list = [None] * len(calls)
    running: dict = {}
    queue = list(enumerate(calls))
    error = None
    try:
        while queue or running:
            while queue and len(running) < max(1, max_concurrent):
                index, args = queue.pop(0)
                running[task.remote(_VERBOSE, fn, *args)] = index
            done, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.cause, MedbalanceError):
                    raise
                error = type(exc.cause)(*exc.cause.args)
                break
    finally:
        for ref in running:  # after an error, Ctrl-C or SIGTERM: the others stop too
            ray.cancel(ref, force=True)
    if error is not None:
        raise error
    return results


def _call_quietly(verbose: bool, fn, *args, **kwargs):
    """Inside the task of :func:`run_as_task`: the driver's Ray Data settings, then ``fn``."""
    quiet_ray_data(verbose)
    return fn(*args, **kwargs)
