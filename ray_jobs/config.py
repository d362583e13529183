"""Typed job configs: the classifier's ``TrainConfig`` and how every job config is built:
dataclass defaults, a YAML overlay, then ``--set a.b=c`` overrides.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=0.01", "epochs=3"])
    dump_yaml(cfg)              # the resolved config, written next to the results

Values given with ``--set`` are parsed as YAML scalars (``3`` -> int, ``true`` -> bool,
``[1, 2]`` -> list). Unknown keys are errors (a typo must not be silently ignored).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import yaml

from medbalance.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------- the classifier's config
@dataclasses.dataclass
class DataSection:
    uri: str = ""                    # dataset URI (ray_jobs.prepare output)
    image_size: int = 224
    augment: str = "adsr"            # adsr | lrf | light | none
    sampling: str = "none"           # none | class_balanced | sqrt
    include_synthetic: bool = True   # rows written by the GAN job
    batch_size: int = 32             # per worker
    block_rows: int = 64             # rows per Ray Data block before decoding (0: one per shard)
    cache_encoded: bool = True       # read each split's encoded rows once into the object store
    shuffle_buffer: int = 0          # rows in each worker's extra local shuffle buffer (0: none)
    eval_batch_size: int = 64


@dataclasses.dataclass
class OptimSection:
    name: str = "sgd"                # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"         # cosine | step | multistep | none
    warmup_epochs: float = 0.0
    step_size: int = 20              # step: epochs between decays
    gamma: float = 0.5               # step / multistep decay
    milestones: list = dataclasses.field(default_factory=lambda: [30, 60])
    clip_grad_norm: float | None = None


@dataclasses.dataclass
class TrainConfig:
    name: str = "run"
    storage: str = "runs"            # local path or s3://bucket/prefix
    model: str = "adsr_resnet18"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrained: str | None = None    # local torchvision ResNet state dict
    loss: str = "cws"
    loss_params: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None   # None: derived from the cluster (ray_jobs.resources.plan_cpus)
    amp: str = "auto"                # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int = 0
    reproducible: bool = False       # deterministic algorithms + seeded re-sampling
    max_failures: int = 2
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val_macro_f1"
    checkpoint_mode: str = "max"
    log_level: str = "WARNING"       # Ray Train's log level (INFO: every report and checkpoint)
    # Test hooks: {"kill_rank": 1, "kill_epoch": 1, "marker": PATH} kills that worker once;
    # {"nan_epoch": E} makes the loss NaN at epoch E, step 0; {"start_log": PATH} appends a line
    # per start of a worker's loop (to count attempts).
    fault_injection: dict = dataclasses.field(default_factory=dict)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)


# ----------------------------------------------------------------------------- sweeps and comparisons
@dataclasses.dataclass
class SchedulerSection:
    name: str = "asha"               # asha (early stopping) | none (every trial runs all epochs)
    grace_period: int = 1            # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 3.0    # ASHA keeps the best 1/reduction_factor at each rung


@dataclasses.dataclass
class SweepConfig:
    """``python -m ray_jobs.sweep``: a search over ``TrainConfig`` keys (see ray_jobs.search_space)."""
    name: str = "sweep"
    storage: str = "runs"            # results go to <storage>/<name>/ (local path or s3://bucket/prefix)
    trials: int = 16
    metric: str = "val_macro_f1"     # a validation metric the training loop reports each epoch
    mode: str = "max"                # max | min
    search: str = "tpe"              # tpe | random (Optuna samplers, seeded with `seed`)
    seed: int = 0
    # dotted TrainConfig key -> {type: uniform|loguniform|int|choice, low, high | values}
    space: dict = dataclasses.field(default_factory=dict)
    points_to_evaluate: list = dataclasses.field(default_factory=list)   # [{key: value}] tried first
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    max_concurrent_trials: int = 0   # 0: as many as the cluster fits (ray_jobs.resources.plan_trials)
    status_interval: float = 60.0    # seconds between Tune's status tables
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
    split: str = "test"              # where each best checkpoint is evaluated
    eval_data: str = ""              # dataset to evaluate on ("": each method's own)
    calibrate: bool = False          # temperature scaling fitted on val before the test metrics
    max_concurrent_trials: int = 0
    status_interval: float = 60.0
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- building configs


def to_dict(cfg: Any) -> dict:
    """A config dataclass -> plain nested dict (YAML/JSON/``weights_only`` safe)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build a (nested) config dataclass from a dict; unknown keys raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc})") from exc
    return key.strip(), value


def load_config(cls: type[T], yaml_path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides."""
    tree: dict = to_dict(cls())
    for layer in (base or {}, _read_yaml(yaml_path) if yaml_path else {}):
        _merge(tree, layer)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return from_dict(cls, tree)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def _merge(tree: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
