"""Test-only fault hooks, kept out of every job's config: no YAML, flag or ``--set`` can set them.

The tests that prove recovery (a worker killed mid-run, a NaN loss, a damaged shard read once)
set them in one of two ways, and nothing else reads them:

* the driver's environment, ``MEDBALANCE_TEST_FAULTS='{"nan_epoch": 1}'`` (JSON): how a test hooks a
  job it starts as a process or through ``ray job submit`` (``--runtime-env-json`` env_vars);
* the ``faults=`` argument of ``classifier.driver.fit`` / ``gcgan.driver.fit_classes``.

The driver hands them to its workers in the loop config (never through the worker's environment,
which a cluster does not share). A sweep applies them per trial: ``{"when": {"optim.lr": 0.0031},
"nan_epoch": 1}`` hooks only the trials whose config has those values.

Hooks: classifier ``kill_rank`` + ``kill_epoch`` + ``marker`` (that worker's process exits once),
``nan_epoch`` (the loss is NaN at that epoch, step 0), ``start_log`` (a line per start of a
worker's loop); GCGAN ``kill_rank`` + ``kill_iteration`` + ``marker``, ``nan_iteration``.
"""
from __future__ import annotations

import json
import os

from medbalance.errors import ConfigError

ENV = "MEDBALANCE_TEST_FAULTS"


def from_environment() -> dict:
    """The hooks in ``MEDBALANCE_TEST_FAULTS`` (none when unset)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    try:
        hooks = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{ENV} is not JSON ({exc}); it is a test hook: unset it") from exc
    if not isinstance(hooks, dict):
        raise ConfigError(f"{ENV} must be a JSON object, got {text!r}; it is a test hook: unset it")
    return hooks


def for_run(hooks: dict | None, config: dict) -> dict:
    """The hooks that apply to a run with ``config`` (a config as a dict): all of them, unless a
    ``when`` mapping of dotted keys names values this run does not have."""
    hooks = dict(hooks if hooks is not None else from_environment())
    when = hooks.pop("when", {})
    for dotted, wanted in when.items():
        value = config
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value != wanted:
            return {}
    return hooks
