"""The typed configs of the sweep (``python -m ray_jobs.sweep``) and the method comparison
(``python -m ray_jobs.compare``): each holds a ``TrainConfig`` as ``base``. Built like every config
(``ray_jobs.runtime.configs.load_config``); their cross-field checks are ``search.check_sweep`` and
``comparison.check_compare``, run before Ray starts.
"""
from __future__ import annotations

import dataclasses

from ray_jobs.classifier.config import TrainConfig
from ray_jobs.runtime.config_checks import field

MAX_SEED = 2**32 - 1   # what Optuna, NumPy and torch all accept


@dataclasses.dataclass
class SchedulerSection:
    name: str = field("asha", choices=("asha", "none"))  # asha (early stopping) | none (every trial runs all epochs)
    grace_period: int = field(1, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = field(3.0, gt=1)  # ASHA keeps the best 1/reduction_factor at each rung


@dataclasses.dataclass
class SweepConfig:
    """``python -m ray_jobs.sweep``: a search over ``TrainConfig`` keys (see ray_jobs.sweeps.search_space)."""
    name: str = "sweep"
    storage: str = "runs"            # results go to <storage>/<name>/ (local path or s3://bucket/prefix)
    trials: int = field(16, ge=1)
    metric: str = "val_macro_f1"     # a validation metric the training loop reports each epoch
    mode: str = field("max", choices=("max", "min"))
    search: str = field("tpe", choices=("tpe", "random"))  # Optuna samplers, seeded with `seed`
    seed: int = field(0, ge=0, le=MAX_SEED)
    # dotted TrainConfig key -> {type: uniform|loguniform|int|choice, low, high | values}
    space: dict = dataclasses.field(default_factory=dict)
    points_to_evaluate: list = dataclasses.field(default_factory=list)   # [{key: value}] tried first
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    max_concurrent_trials: int = field(0, ge=0)  # 0: as many as the cluster fits (ray_jobs.runtime.resources.plan_trials)
    status_interval: float = field(60.0, gt=0)  # seconds between Tune's status tables
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@dataclasses.dataclass
class CompareConfig:
    """``python -m ray_jobs.compare``: named methods x seeds, each evaluated on a held-out split."""
    name: str = "compare"
    storage: str = "runs"
    # method name -> TrainConfig overlay, e.g. {model: lrf_cnn, loss: fafl, loss_params: {m: 1.0}};
    # `data: URI` (or a data mapping) trains that method on its own dataset.
    methods: dict = dataclasses.field(default_factory=dict)
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    baseline: str = ""               # the method the others are compared with (default: the first)
    split: str = field("test", choices=("val", "test"))  # where each best checkpoint is evaluated
    eval_data: str = ""              # dataset to evaluate on ("": each method's own)
    calibrate: bool = False          # temperature scaling fitted on val before the test metrics
    max_concurrent_trials: int = field(0, ge=0)
    status_interval: float = field(60.0, gt=0)
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)
