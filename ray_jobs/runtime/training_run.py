"""One Ray Train run, as the classifier, the sweeps' trials and each GCGAN class start it.

    trainer = torch_trainer(train_loop_per_worker, loop_config, RunSpec(name="r18", storage="runs", ...),
                            datasets={"train": ds, "val": val}, split=["train"])
    result = trainer.fit()
    raise_for_status(outcome["status"], outcome["message"], last_checkpoint)

:class:`RunSpec` holds what every run sets the same way: scaling (workers, GPU, CPUs per worker,
placement), the run folder (``<storage>/<name>``, local or ``s3://`` through ``pyarrow.fs``),
retries after a lost worker (``max_failures``: Ray Train restarts the workers from the newest
checkpoint), how many checkpoints to keep and by which metric, and Ray Train's log level. The
resume checks before a run (``auto`` / ``resume`` / ``fresh``, and a cut-off checkpoint passed
over) are ``run_dir.RunDir.check_resume`` and ``RunDir.latest_checkpoint``, used by both jobs.
:func:`raise_for_status` turns a run that stopped on its own (a non-finite loss, damaged data)
into the project's error, the same way for both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from medbalance.errors import DataError, TrainingError
from shards import storage


@dataclasses.dataclass
class RunSpec:
    """How a Ray Train run is placed, stored, retried and checkpointed."""
    name: str
    storage: str                         # local path or s3://bucket/prefix; the run is <storage>/<name>
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int
    keep_checkpoints: int
    log_level: str = "WARNING"
    placement_strategy: str = "PACK"
    score: tuple[str, str] | None = None  # (metric, "max"|"min") that ranks checkpoints; None: newest


def torch_trainer(loop: Callable[[dict], dict], loop_config: dict, spec: RunSpec, *, datasets: dict,
                  split: list[str], callbacks: list | None = None):
    """The ``TorchTrainer`` of one run.

    Args:
        loop: the ``train_loop_per_worker`` (a module-level function: Ray pickles it by reference).
        loop_config: its argument.
        spec: placement, storage, retries, checkpoints.
        datasets: Ray Datasets by name; ``split`` names those shared out between the workers
            (the others every worker reads whole).
        callbacks: Ray Train ``UserCallback`` objects (the sweep's trials pass Tune's).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(spec.storage)
    storage.ensure_dir(fs, path, spec.storage)
    metric, order = spec.score if spec.score else (None, "max")
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu, placement_strategy=spec.placement_strategy,
            resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.keep_checkpoints, checkpoint_score_attribute=metric,
                checkpoint_score_order=order),
            logging_config=ray.train.LoggingConfig(log_level=spec.log_level)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )


def raise_for_status(status: str, message: str, last_checkpoint: str | None, who: str = "") -> None:
    """A run that stopped on its own becomes the project's error: ``data_error`` -> ``DataError``
    (the message names the shard), ``non_finite`` -> ``TrainingError`` naming the last good
    checkpoint (``who``: e.g. "of 'Monocyte'"); anything else returns."""
    if status == "data_error":
        raise DataError(message)
    if status == "non_finite":
        raise TrainingError(f"{message} Last good checkpoint{' ' + who if who else ''}: {last_checkpoint}")
