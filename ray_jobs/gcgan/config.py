"""The GAN training job's typed config (``python -m ray_jobs.gan train``).

Built like the classifier's: dataclass defaults <- ``--config`` YAML (``configs/gcgan_paper.yaml``)
<- flags <- ``--set key=value`` (``ray_jobs.runtime.configs.load_config``). The defaults are the authors'
settings (DESIGN 4.5) except the image size (256; theirs is 1024) and the number of workers.
"""
from __future__ import annotations

import dataclasses

from medbalance.errors import ConfigError
from ray_jobs.runtime.config_checks import field


def _optimizers() -> tuple[str, ...]:
    from gan.train_step import OPTIMIZERS
    return OPTIMIZERS


def _bn_modes() -> tuple[str, ...]:
    from gan.sampling import BN_MODES
    return BN_MODES


def _amp_modes() -> tuple[str, ...]:
    from ray_jobs.runtime.amp import AMP_MODES
    return AMP_MODES


@dataclasses.dataclass
class GanConfig:
    """``medbalance gan train``. Each field's rule (``runtime.config_checks``) is checked when the
    config is built; :meth:`validate` checks the image size; :meth:`check` (before Ray starts)
    that a dataset is given."""
    name: str = field("gan", nonempty=True)
    storage: str = field("runs", nonempty=True)   # local path or s3://bucket/prefix
    data: str = ""                     # shard dataset URI (ray_jobs.prepare output)
    classes: str = field("auto", nonempty=True)   # comma-separated class names, or auto: every class below the median train count
    image_size: int = 256              # 32 .. 1024, a power of two (authors: 1024)
    iterations: int = field(80_000, ge=1)         # per class (authors: 80,000)
    batch_size: int = field(2, ge=1)              # per worker (authors: 2 on one GPU)
    num_workers: int = field(1, ge=1)             # DDP workers per class
    use_gpu: bool = False
    cpus_per_worker: float | None = field(None, gt=0)   # None: derived from the cluster (runtime.resources.plan_cpus)
    concurrent: int = field(0, ge=0)              # class runs at once; 0: as many as the cluster fits
    nz: int = field(256, ge=1)
    ngf: int = field(64, ge=1)
    ndf: int = field(64, ge=1)
    optimizer: str = field("rmsprop", choices=_optimizers)   # rmsprop (authors) | adam (betas 0.5, 0.999)
    lr: float = field(2e-4, gt=0, le=1)
    policy: str = "color,translation"  # DiffAugment
    ema_decay: float = field(0.999, ge=0, le=1)
    lpips_weights: str | None = None   # torchvision vgg16 state-dict file for LPIPS-VGG; None: L1
    sample_bn_mode: str = field("train", choices=_bn_modes)  # train (batch statistics, the authors') | eval
    checkpoint_every: int = field(1000, ge=1)     # iterations between checkpoints (and sample grids)
    num_samples: int = field(16, ge=1)            # images in each sample grid (fixed noise)
    log_every: int = field(100, ge=1)             # iterations between progress lines
    amp: str = field("auto", choices=_amp_modes)  # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    seed: int = field(0, ge=0, le=2**32 - 1)
    max_failures: int = field(2, ge=-1)           # -1: retry forever (Ray's convention)
    keep_checkpoints: int = field(2, ge=1)
    max_class_mb: float = field(4096.0, gt=0)     # decoded images of one class a worker may hold in memory
    log_level: str = field("WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))  # Ray Train's

    def validate(self, sources: dict[str, str] | None = None) -> None:
        """The image size: a power of two from 32 to 1024 (``from_dict`` runs this after the fields')."""
        from gan.generator import check_image_size

        check_image_size(self.image_size)

    def check(self) -> None:
        """Before Ray starts: a dataset is given, and every value keeps its rule (a config built in
        code, not through ``load_config``, is checked here)."""
        from ray_jobs.runtime import configs

        if not self.data:
            raise ConfigError("no dataset: pass --data URI (a dataset made by ray_jobs.prepare)")
        configs.from_dict(GanConfig, configs.to_dict(self))
