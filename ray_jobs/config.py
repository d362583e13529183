"""Typed job configs: the classifier's ``TrainConfig`` and how every job config is built:
dataclass defaults, a YAML overlay, then ``--set a.b=c`` overrides.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=0.01", "epochs=3"])
    dump_yaml(cfg)              # the resolved config, written next to the results

Values given with ``--set`` are parsed as YAML scalars (``3`` -> int, ``true`` -> bool,
``[1, 2]`` -> list). Unknown keys are errors (a typo must not be silently ignored). Every value is
then checked against its field's type hint and rule (``ray_jobs.config_checks``: ``1e6`` is a
float, ``epochs=two`` or ``lr=0`` an error naming the key), when the config is built: before Ray
starts.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, TypeVar

import yaml

from medbalance.errors import ConfigError
from ray_jobs.config_checks import check_options, check_value, rule

T = TypeVar("T")


# ----------------------------------------------------------------------------- allowed names
# Registries and name tuples are looked up when a value is checked (not at import), so a model or a
# loss registered later is accepted without touching this file.
def _models() -> list[str]:
    from models import list_models
    return list_models()


def _losses() -> list[str]:
    from losses import list_losses
    return list_losses()


def _augments() -> tuple[str, ...]:
    from ray_jobs.data import AUGMENT_PRESETS
    return AUGMENT_PRESETS


def _samplings() -> tuple[str, ...]:
    from ray_jobs.data import SAMPLING
    return SAMPLING


def _optimizers() -> tuple[str, ...]:
    from ray_jobs.optim import OPTIMIZERS
    return OPTIMIZERS


def _schedules() -> tuple[str, ...]:
    from ray_jobs.optim import SCHEDULES
    return SCHEDULES


def _amp_modes() -> tuple[str, ...]:
    from ray_jobs.amp import AMP_MODES
    return AMP_MODES


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# ``pretrained`` placeholders: a preset that needs weights says "required" (an error until a path is
# given); "scratch" is the explicit opt-out (random init, as ``null``, but it says it was meant).
PRETRAINED_REQUIRED, PRETRAINED_SCRATCH = "required", "scratch"


def _field(default, **checks):
    """A dataclass field with a default and a :class:`~ray_jobs.config_checks.Rule`."""
    if callable(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=rule(**checks))
    return dataclasses.field(default=default, metadata=rule(**checks))


# ----------------------------------------------------------------------------- the classifier's config
@dataclasses.dataclass
class DataSection:
    uri: str = ""                    # dataset URI (ray_jobs.prepare output)
    image_size: int = _field(224, ge=8)
    augment: str = _field("adsr", choices=_augments)      # adsr | adsr_paper | lrf | light | none
    sampling: str = _field("none", choices=_samplings)    # none | class_balanced | sqrt
    include_synthetic: bool = True   # rows written by the GAN job
    batch_size: int = _field(32, ge=1)                    # per worker
    total_batch_size: int | None = _field(None, ge=1)     # set: split over the workers (batch_size derived)
    block_rows: int = _field(64, ge=0)   # rows per Ray Data block before decoding (0: one per shard)
    cache_encoded: bool = True       # read each split's encoded rows once into the object store
    shuffle_buffer: int = _field(0, ge=0)  # rows in each worker's extra local shuffle buffer (0: none)
    eval_batch_size: int = _field(64, ge=1)
    channels: int = _field(3, choices=(1, 3))             # 1: grey to the model (in_chans=1); 3: RGB
    normalize: str = _field("imagenet", choices=("imagenet", "dataset"))  # mean/std: ImageNet's or the manifest's


@dataclasses.dataclass
class OptimSection:
    name: str = _field("sgd", choices=_optimizers)        # sgd | adam | adamw
    lr: float = _field(0.01, gt=0)
    momentum: float = _field(0.9, ge=0, lt=1)
    weight_decay: float = _field(1e-4, ge=0)
    schedule: str = _field("cosine", choices=_schedules)  # cosine | step | multistep | adsr_authors | none
    warmup_epochs: float = _field(0.0, ge=0)
    step_size: int = _field(20, ge=1)                     # step: epochs between decays
    gamma: float = _field(0.5, gt=0)                      # step / multistep decay
    milestones: list = _field(lambda: [30, 60], items=int)
    clip_grad_norm: float | None = _field(None, gt=0)


@dataclasses.dataclass
class TrainConfig:
    name: str = _field("run", nonempty=True)
    storage: str = _field("runs", nonempty=True)          # local path or s3://bucket/prefix
    model: str = _field("adsr_resnet18", choices=_models)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrained: str | None = None    # local torchvision ResNet state dict; "required" / "scratch": see above
    loss: str = _field("cws", choices=_losses)
    loss_params: dict = dataclasses.field(default_factory=dict)
    epochs: int = _field(10, ge=1)
    num_workers: int = _field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = _field(None, gt=0)   # None: derived from the cluster (resources.plan_cpus)
    # Ray Train's placement of the workers; STRICT_SPREAD puts each on its own node.
    placement_strategy: str = _field("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    amp: str = _field("auto", choices=_amp_modes)  # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int = _field(0, ge=0, le=2**32 - 1)
    reproducible: bool = False       # deterministic algorithms + seeded re-sampling
    max_failures: int = _field(2, ge=-1)  # -1: retry forever (Ray's convention)
    keep_checkpoints: int = _field(2, ge=1)
    checkpoint_metric: str = _field("val_macro_f1", nonempty=True)
    checkpoint_mode: str = _field("max", choices=("max", "min"))
    log_level: str = _field("WARNING", choices=LOG_LEVELS)  # Ray Train's log level (INFO: every report and checkpoint)
    # Test hooks: {"kill_rank": 1, "kill_epoch": 1, "marker": PATH} kills that worker once;
    # {"nan_epoch": E} makes the loss NaN at epoch E, step 0; {"start_log": PATH} appends a line
    # per start of a worker's loop (to count attempts).
    fault_injection: dict = dataclasses.field(default_factory=dict)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)

    def validate(self, sources: dict[str, str] | None = None) -> None:
        """Checks that involve more than one field (``from_dict`` runs them after the fields').

        Converts ``model_kwargs`` / ``loss_params`` values like fields of their defaults' types and
        derives ``data.batch_size`` from ``data.total_batch_size``.

        Raises:
            ConfigError: naming the key, the value and what to do.
        """
        from losses.registry import loss_hyperparameters
        from models.registry import model_options

        sources = sources or {}
        self.model_kwargs = check_options("model_kwargs", self.model_kwargs, model_options(self.model),
                                          f"model {self.model!r}", sources)
        self.loss_params = check_options("loss_params", self.loss_params, loss_hyperparameters(self.loss),
                                         f"loss {self.loss!r}", sources)
        if self.pretrained == PRETRAINED_REQUIRED:
            arch = _torchvision_resnet(self.model)
            file = f"{arch}-imagenet1k-v1.pth"
            raise ConfigError(
                f"pretrained = 'required'{_from(sources, 'pretrained')}: this preset fine-tunes ImageNet "
                f"weights, as the authors did. Give the file: --set pretrained=/path/to/{file}, made once "
                "on a machine with internet access by\n  python -c \"import torch, torchvision; "
                f"torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), '{file}')\"\n"
                "(nothing is downloaded here); or --set pretrained=scratch to train from random weights "
                "(not the paper's setting)")
        total = self.data.total_batch_size
        if total is not None:
            if total % self.num_workers:
                raise ConfigError(
                    f"data.total_batch_size = {total}{_from(sources, 'data.total_batch_size')} does not "
                    f"split evenly over num_workers = {self.num_workers}; use a multiple of {self.num_workers} "
                    "or another worker count")
            if ("data.batch_size" in sources and sources["data.batch_size"] != sources.get("data.total_batch_size")
                    and self.data.batch_size != total // self.num_workers):
                raise ConfigError(
                    f"data.batch_size = {self.data.batch_size}{_from(sources, 'data.batch_size')} and "
                    f"data.total_batch_size = {total}{_from(sources, 'data.total_batch_size')} disagree: set "
                    "one (to give a per-worker batch over a preset's total, add --set data.total_batch_size=null)")
            self.data.batch_size = total // self.num_workers

    def pretrained_path(self) -> str | None:
        """The weight file to load, or None (random init: ``null`` or ``"scratch"``)."""
        return None if self.pretrained in (None, PRETRAINED_SCRATCH) else self.pretrained


def _torchvision_resnet(model: str) -> str:
    """The torchvision ResNet whose weights fit ``model``'s backbone (adsr_resnet18 -> resnet18)."""
    match = re.search(r"resnet(18|34|50)", model)
    return f"resnet{match.group(1)}" if match else "resnet50"


def _from(sources: dict[str, str], key: str) -> str:
    return f" (from {sources[key]})" if key in sources else ""


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


def from_dict(cls: type[T], data: dict | None, where: str = "config",
              sources: dict[str, str] | None = None) -> T:
    """Build a (nested) config dataclass from a dict, checking every value.

    Each value is converted and checked against its field's type hint and rule
    (:mod:`ray_jobs.config_checks`); then the class's ``validate(sources)``, if it has one, checks
    what spans fields. ``sources`` maps dotted keys to where their value came from (for messages).

    Raises:
        ConfigError: an unknown key, or a value that does not fit, naming the key and the value.
    """
    data = dict(data or {})
    sources = sources or {}
    prefix = "" if where == "config" else where.removeprefix("config.") + "."
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping (a section), got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}", sources)
        else:
            kwargs[name] = check_value(key, value, hint, fields[name].metadata.get("rule"), sources.get(key))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if hasattr(obj, "validate"):
        obj.validate(sources)
    return obj


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


def load_config(cls: type[T], yaml_path: str | None = None, overrides: list | None = None,
                base: dict | None = None) -> T:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides; every value checked
    (:func:`from_dict`), so a bad one fails here, before Ray starts.

    ``overrides`` are ``"key=value"`` strings (shown in messages as ``--set key=value``) or
    ``("key=value", "how the user wrote it")`` pairs, e.g. ``("epochs=3", "--epochs 3")``.
    """
    tree: dict = to_dict(cls())
    sources: dict[str, str] = {}
    for layer, source in ((base or {}, "the base config"),
                          (_read_yaml(yaml_path) if yaml_path else {}, yaml_path)):
        _merge(tree, layer)
        sources.update({key: source for key in _dotted_keys(layer)})
    for item in overrides or []:
        text, source = item if isinstance(item, tuple) else (item, f"--set {item}")
        key, value = parse_override(text)
        _set_path(tree, key, value)
        sources[key] = source
    return from_dict(cls, tree, sources=sources)


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


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
