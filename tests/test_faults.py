"""Fault hooks are test-only: no job config can set them; a test hands them to a driver (``faults=``
or ``MEDBALANCE_TEST_FAULTS``), which passes them to the workers whose config they name."""
from __future__ import annotations

import pytest

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import TrainConfig
from ray_jobs.gcgan.config import GanConfig
from ray_jobs.runtime.configs import load_config
from ray_jobs.runtime.faults import ENV, for_run, from_environment


@pytest.mark.parametrize("cls, key", [(TrainConfig, "fault_injection.nan_epoch=1"),
                                      (GanConfig, "fault_injection.nan_iteration=3")])
def test_no_config_can_set_a_fault(cls, key):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fault_injection'\]"):
        load_config(cls, overrides=[key])


def test_hooks_come_from_the_environment_and_apply_where_their_condition_holds(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert from_environment() == {} and for_run(None, {"optim": {"lr": 0.1}}) == {}
    monkeypatch.setenv(ENV, '{"when": {"optim.lr": 0.0031}, "nan_epoch": 1}')
    assert for_run(None, {"optim": {"lr": 0.0031}}) == {"nan_epoch": 1}
    assert for_run(None, {"optim": {"lr": 0.003}}) == {}
    assert for_run({"start_log": "/tmp/x"}, {}) == {"start_log": "/tmp/x"}   # given: the environment is not read
    monkeypatch.setenv(ENV, "nan_epoch=1")
    with pytest.raises(ConfigError, match="MEDBALANCE_TEST_FAULTS is not JSON"):
        from_environment()
