"""The classifier's typed config, ``TrainConfig`` (``python -m ray_jobs.train``), and the names its
fields accept.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=0.01", "epochs=3"])

(``ray_jobs.runtime.configs.load_config``: dataclass defaults <- YAML <- ``--set``). Each field's
rule (``ray_jobs.runtime.config_checks``) and :meth:`TrainConfig.validate` check every value when
the config is built: before Ray starts. The names a field accepts (augment presets, samplings,
optimisers, schedules) are defined here, and the modules that implement them import them from here.
"""
from __future__ import annotations

import dataclasses
import re

from medbalance.errors import ConfigError
from ray_jobs.runtime.config_checks import check_options, field

AUGMENT_PRESETS = ("adsr", "adsr_paper", "lrf", "light", "none")
SAMPLING = ("none", "class_balanced", "sqrt")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "adsr_authors", "none")

# ----------------------------------------------------------------------------- allowed names
# Registries and name tuples are looked up when a value is checked (not at import), so a model or a
# loss registered later is accepted without touching this file.
def _models() -> list[str]:
    from models import list_models
    return list_models()


def _losses() -> list[str]:
    from losses import list_losses
    return list_losses()


def _amp_modes() -> tuple[str, ...]:
    from ray_jobs.runtime.amp import AMP_MODES
    return AMP_MODES


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# ``pretrained`` placeholders: a preset that needs weights says "required" (an error until a path is
# given); "scratch" is the explicit opt-out (random init, as ``null``, but it says it was meant).
PRETRAINED_REQUIRED, PRETRAINED_SCRATCH = "required", "scratch"


# ----------------------------------------------------------------------------- the classifier's config
@dataclasses.dataclass
class DataSection:
    uri: str = ""                    # dataset URI (ray_jobs.prepare output)
    image_size: int = field(224, ge=8)
    augment: str = field("adsr", choices=AUGMENT_PRESETS)      # adsr | adsr_paper | lrf | light | none
    sampling: str = field("none", choices=SAMPLING)    # none | class_balanced | sqrt
    include_synthetic: bool = True   # rows written by the GAN job
    batch_size: int = field(32, ge=1)                    # per worker
    total_batch_size: int | None = field(None, ge=1)     # set: split over the workers (batch_size derived)
    block_rows: int = field(64, ge=0)   # rows per Ray Data block before decoding (0: one per shard)
    cache_encoded: bool = True       # read each split's encoded rows once into the object store
    shuffle_buffer: int = field(0, ge=0)  # rows in each worker's extra local shuffle buffer (0: none)
    eval_batch_size: int = field(64, ge=1)
    channels: int = field(3, choices=(1, 3))             # 1: grey to the model (in_chans=1); 3: RGB
    normalize: str = field("imagenet", choices=("imagenet", "dataset"))  # mean/std: ImageNet's or the manifest's


@dataclasses.dataclass
class OptimSection:
    name: str = field("sgd", choices=OPTIMIZERS)        # sgd | adam | adamw
    lr: float = field(0.01, gt=0)
    momentum: float = field(0.9, ge=0, lt=1)
    weight_decay: float = field(1e-4, ge=0)
    schedule: str = field("cosine", choices=SCHEDULES)  # cosine | step | multistep | adsr_authors | none
    warmup_epochs: float = field(0.0, ge=0)
    step_size: int = field(20, ge=1)                     # step: epochs between decays
    gamma: float = field(0.5, gt=0)                      # step / multistep decay
    milestones: list = field(lambda: [30, 60], items=int)
    clip_grad_norm: float | None = field(None, gt=0)


@dataclasses.dataclass
class TrainConfig:
    name: str = field("run", nonempty=True)
    storage: str = field("runs", nonempty=True)          # local path or s3://bucket/prefix
    model: str = field("adsr_resnet18", choices=_models)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrained: str | None = None    # local torchvision ResNet state dict; "required" / "scratch": see above
    loss: str = field("cws", choices=_losses)
    loss_params: dict = dataclasses.field(default_factory=dict)
    epochs: int = field(10, ge=1)
    num_workers: int = field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = field(None, gt=0)   # None: derived from the cluster (resources.plan_cpus)
    # Ray Train's placement of the workers; STRICT_SPREAD puts each on its own node.
    placement_strategy: str = field("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    amp: str = field("auto", choices=_amp_modes)  # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int = field(0, ge=0, le=2**32 - 1)
    reproducible: bool = False       # deterministic algorithms + seeded re-sampling
    max_failures: int = field(2, ge=-1)  # -1: retry forever (Ray's convention)
    keep_checkpoints: int = field(2, ge=1)
    checkpoint_metric: str = field("val_macro_f1", nonempty=True)
    checkpoint_mode: str = field("max", choices=("max", "min"))
    log_level: str = field("WARNING", choices=LOG_LEVELS)  # Ray Train's log level (INFO: every report and checkpoint)
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
