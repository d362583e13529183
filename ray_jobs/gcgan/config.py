"""The GAN training job's typed config (``python -m ray_jobs.gan train``).

Built like the classifier's: dataclass defaults <- ``--config`` YAML (``configs/gcgan_paper.yaml``)
<- flags <- ``--set key=value`` (``ray_jobs.runtime.configs.load_config``). The defaults are the authors'
settings (DESIGN 4.5) except the image size (256; theirs is 1024) and the number of workers.
"""
from __future__ import annotations

import dataclasses

from medbalance.errors import ConfigError


@dataclasses.dataclass
class GanConfig:
    name: str = "gan"
    storage: str = "runs"              # local path or s3://bucket/prefix
    data: str = ""                     # shard dataset URI (ray_jobs.prepare output)
    classes: str = "auto"              # comma-separated class names, or auto: every class below the median train count
    image_size: int = 256              # 32 .. 1024, a power of two (authors: 1024)
    iterations: int = 80_000           # per class (authors: 80,000)
    batch_size: int = 2                # per worker (authors: 2 on one GPU)
    num_workers: int = 1               # DDP workers per class
    use_gpu: bool = False
    cpus_per_worker: float | None = None   # None: derived from the cluster (ray_jobs.runtime.resources.plan_cpus)
    concurrent: int = 0                # class runs at once; 0: as many as the cluster fits
    nz: int = 256
    ngf: int = 64
    ndf: int = 64
    optimizer: str = "rmsprop"         # rmsprop (authors) | adam (betas 0.5, 0.999)
    lr: float = 2e-4
    policy: str = "color,translation"  # DiffAugment
    ema_decay: float = 0.999
    lpips_weights: str | None = None   # torchvision vgg16 state-dict file for LPIPS-VGG; None: L1
    sample_bn_mode: str = "train"      # train (batch statistics, the authors') | eval
    checkpoint_every: int = 1000       # iterations between checkpoints (and sample grids)
    num_samples: int = 16              # images in each sample grid (fixed noise)
    log_every: int = 100               # iterations between progress lines
    amp: str = "auto"                  # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 2
    max_class_mb: float = 4096.0       # decoded images of one class a worker may hold in memory
    log_level: str = "WARNING"         # Ray Train's log level
    # Test hooks: {"kill_rank": 1, "kill_iteration": 3, "marker": PATH} kills that worker once;
    # {"nan_iteration": N} makes the real batch NaN at iteration N (every rank).
    fault_injection: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        """Refuse values that cannot work, before Ray starts."""
        from gan.generator import check_image_size
        from ray_jobs.runtime.amp import AMP_MODES
        from gan.sampling import BN_MODES
        from gan.train_step import OPTIMIZERS

        if not self.data:
            raise ConfigError("no dataset: pass --data URI (a dataset made by ray_jobs.prepare)")
        check_image_size(self.image_size)
        for key in ("iterations", "batch_size", "num_workers", "checkpoint_every", "num_samples", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.sample_bn_mode not in BN_MODES:
            raise ConfigError(f"unknown sample_bn_mode {self.sample_bn_mode!r}; use one of {BN_MODES}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.concurrent < 0:
            raise ConfigError(f"concurrent must be >= 0 (0: as many as fit), got {self.concurrent}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Numbers with a range beyond >= 1: each refusal names the key, the value and the range."""
        ranges = {"nz": ("at least 1", lambda v: v >= 1), "ngf": ("at least 1", lambda v: v >= 1),
                  "ndf": ("at least 1", lambda v: v >= 1), "keep_checkpoints": ("at least 1", lambda v: v >= 1),
                  "lr": ("above 0 and at most 1", lambda v: 0 < v <= 1),
                  "ema_decay": ("from 0 to 1", lambda v: 0 <= v <= 1),
                  "max_failures": ("at least 0", lambda v: v >= 0), "max_class_mb": ("above 0", lambda v: v > 0),
                  "seed": ("from 0 to 2**32 - 1", lambda v: 0 <= v <= 2**32 - 1)}
        if self.cpus_per_worker is not None:
            ranges["cpus_per_worker"] = ("above 0 (or unset: derived)", lambda v: v > 0)
        for key, (allowed, ok) in ranges.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ConfigError(f"{key} must be {allowed}, got {value!r}")
