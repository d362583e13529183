"""The GAN job's driver: one Ray Train run per class, several at once, and ``result.json``.

    summary = fit_classes(cfg, resume="auto")

Layout of ``<storage>/<name>/``::

    result.json, config.yaml        the job: classes, checkpoint per class, how each run went
    <class>/checkpoint_*/           Ray Train checkpoints of that class's GAN (checkpoint.pt)
    <class>/samples/iter_NNNNNN.png sample grids (EMA generator, fixed noise)

Each class is its own ``TorchTrainer`` fit, started from a zero-CPU Ray task
(``ray_runtime.run_as_tasks``), so the classes train concurrently when the cluster has room:
``concurrent`` runs at a time (0 = as many as fit: on GPUs, GPUs // workers; on CPUs, one CPU
per worker after the data reserve, ``resources.plan_cpus``), the rest queue. A rerun with the
same ``--storage`` and ``--name`` resumes every class from its newest checkpoint (a finished
class has nothing left to do and keeps its checkpoint).
"""
from __future__ import annotations

import re
import statistics
import time

from medbalance.errors import ConfigError
from ray_jobs.gcgan.config import GanConfig
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.progress import say
from ray_jobs.runtime import training_run
from ray_jobs.runtime.faults import for_run
from ray_jobs.runtime.run_dir import RESULT_FILE, RunDir, apply_resume_mode, checkpoint_uri
from ray_jobs.runtime.training_run import RunSpec, torch_trainer
from shards import storage


def resolve_classes(manifest, spec: str) -> list[tuple[int, str]]:
    """``(index, name)`` of the classes to train: names (comma-separated) or ``auto`` (every class
    whose real train count is below the median over classes)."""
    counts = manifest.class_counts("train", include_synthetic=False)
    if spec.strip() == "auto":
        median = statistics.median(counts)
        chosen = [(i, n) for i, (n, c) in enumerate(zip(manifest.class_names, counts)) if 0 < c < median]
        if not chosen:
            raise ConfigError(f"--classes auto: no class has fewer real train images than the median ({median:g}); "
                              f"counts {dict(zip(manifest.class_names, counts))}. Name the classes with --classes A,B")
        return chosen
    chosen = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name not in manifest.class_names:
            raise ConfigError(f"--classes: {name!r} is not a class of the dataset; it has {manifest.class_names}")
        index = manifest.class_names.index(name)
        if counts[index] == 0:
            raise ConfigError(f"--classes: class {name!r} has no real train images to learn from")
        chosen.append((index, name))
    if not chosen:
        raise ConfigError("--classes names no class; give names (A,B) or auto")
    return chosen


def run_names(classes: list[tuple[int, str]]) -> dict[str, str]:
    """Class name -> its run folder's name (file-system safe, unique)."""
    names: dict[str, str] = {}
    for index, name in classes:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or f"class{index}"
        names[name] = slug if slug not in names.values() else f"{slug}-{index}"
    return names


def plan_concurrency(cfg: GanConfig, num_classes: int) -> tuple[int, float]:
    """``(class runs at once, CPUs per worker)`` for the connected cluster."""
    import ray

    from ray_jobs.runtime.resources import data_reserve, plan_cpus

    resources = ray.cluster_resources()
    if cfg.concurrent:
        concurrent = cfg.concurrent
    elif cfg.use_gpu:
        concurrent = int(resources.get("GPU", 0)) // cfg.num_workers
    else:
        total = float(resources.get("CPU", 0))
        concurrent = int((total - data_reserve(total)) // cfg.num_workers)
    concurrent = max(1, min(num_classes, concurrent))
    return concurrent, plan_cpus(cfg.num_workers * concurrent, cfg.use_gpu, cfg.cpus_per_worker)


def class_dataset(cfg: GanConfig, class_index: int):
    """The class's real train rows, decoded and resized to ``image_size`` (Ray Data tasks)."""
    from ray_jobs.classifier.pipeline import preprocess_batch
    from shards import ray_dataset

    ds = ray_dataset(cfg.data, "train", include_synthetic=False, columns=["image", "label", "source", "synthetic"],
                     include_paths=True)
    ds = ds.filter(expr=f"label == {int(class_index)}")
    return ds.map_batches(preprocess_batch, batch_size=32,
                          fn_kwargs=dict(image_size=cfg.image_size, augment="none", train=False))


def fit_class(cfg_dict: dict, class_index: int, class_name: str, run_name: str, faults: dict | None = None) -> dict:
    """Train one class's GAN with a ``TorchTrainer`` (runs inside a Ray task); its summary.
    ``faults``: the driver's test hooks (``runtime.faults``), handed to the workers."""
    from ray_jobs.gcgan.worker import SAMPLES_DIR, train_loop_per_worker

    cfg = config_lib.from_dict(GanConfig, cfg_dict)
    job = RunDir(cfg.storage, cfg.name)
    run = RunDir(job.uri, run_name)
    resume_from = run.latest_checkpoint()
    spec = RunSpec(name=run_name, storage=job.uri, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                   cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                   keep_checkpoints=cfg.keep_checkpoints, log_level=cfg.log_level)
    loop_config = {"cfg": cfg_dict, "class_name": class_name, "class_index": class_index, "run_uri": run.uri,
                   "resume_from": resume_from, "faults": faults or {}}
    # Not split: every worker holds the (small) class and samples its own slice of it.
    trainer = torch_trainer(train_loop_per_worker, loop_config, spec,
                            datasets={"train": class_dataset(cfg, class_index)}, split=[])
    started = time.time()
    result = trainer.fit()
    outcome = result.return_value or {}
    checkpoint = checkpoint_uri(job.storage, result.checkpoint) if result.checkpoint else run.latest_checkpoint()
    samples = sorted(i for i in _list(run.uri, SAMPLES_DIR))
    return {"class_index": class_index, "run": run.uri, "status": outcome.get("status", "ok"),
            "message": outcome.get("message", ""), "checkpoint": checkpoint,
            "iterations": outcome.get("iteration", 0), "started_at_iteration": outcome.get("start_iteration", 0),
            "last_metrics": dict(result.metrics or {}), "sample_grids": samples,
            "started": round(started, 3), "finished": round(time.time(), 3),
            "seconds": round(time.time() - started, 1)}


def _list(run_uri: str, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    uri = storage.join(run_uri, folder)
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path, uri):
        return []
    return [storage.join(uri, i.base_name) for i in fs.get_file_info(pafs.FileSelector(path))
            if i.base_name.endswith(".png")]


def fit_classes(cfg: GanConfig, resume: str = "auto", faults: dict | None = None) -> dict:
    """Train a GAN per class on the connected Ray cluster; write and return ``result.json``.

    Args:
        resume: ``auto`` (resume what has results), ``resume`` (must have), ``fresh`` (must not).
        faults: test-only hooks for the workers (``runtime.faults``; None: ``MEDBALANCE_TEST_FAULTS``).
    """
    from gan.losses import ReconstructionLoss
    from ray_jobs.runtime.ray_setup import init_ray, run_as_tasks
    from shards import check_shards

    cfg.check()
    reconstruction = ReconstructionLoss(cfg.lpips_weights).name  # a bad LPIPS file fails here, once
    storage.check_folder(cfg.storage, "--storage")
    manifest = check_shards(cfg.data, splits=["train"])
    classes = resolve_classes(manifest, cfg.classes)
    names = run_names(classes)
    job = RunDir(cfg.storage, cfg.name)
    existing = job.has_results() or any(RunDir(job.uri, n).has_results() for n in names.values())
    if apply_resume_mode(resume, job.uri, existing):
        say(f"{job.uri} has results: each class resumes from its newest checkpoint")
    init_ray()
    concurrent, cfg.cpus_per_worker = plan_concurrency(cfg, len(classes))
    counts = manifest.class_counts("train", include_synthetic=False)
    say(f"training GCGAN at {cfg.image_size} px for {cfg.iterations} iterations on "
        + ", ".join(f"{n} ({counts[i]} images)" for i, n in classes)
        + f": {concurrent} class run(s) at a time, {cfg.num_workers} worker(s) each, "
        f"{cfg.cpus_per_worker:g} CPU(s) per worker" + (" + 1 GPU" if cfg.use_gpu else ""))
    started = time.perf_counter()
    cfg_dict = config_lib.to_dict(cfg)
    hooks = for_run(faults, cfg_dict)
    runs = run_as_tasks(fit_class, [(cfg_dict, i, n, names[n], hooks) for i, n in classes], concurrent)
    per_class = {name: run for (_, name), run in zip(classes, runs)}
    summary = {
        "name": cfg.name, "classes": [n for _, n in classes],
        "checkpoint": {n: r["checkpoint"] for n, r in per_class.items()},
        "status": "ok" if all(r["status"] == "ok" for r in runs) else "failed",
        "runs": per_class, "data": cfg.data, "image_size": cfg.image_size, "iterations_requested": cfg.iterations,
        "reconstruction_loss": reconstruction,
        "concurrent": concurrent, "cpus_per_worker": cfg.cpus_per_worker, "num_workers": cfg.num_workers,
        "real_train_images": {n: counts[i] for i, n in classes},
        "seconds": round(time.perf_counter() - started, 1),
    }
    job.write_bytes("config.yaml", config_lib.dump_yaml(cfg).encode())
    job.write_json(RESULT_FILE, summary)
    raise_for_status(per_class)
    return summary


def raise_for_status(per_class: dict) -> None:
    """A class run that stopped on its own (damaged data first, then a bad loss) becomes the
    project's error (``runtime.training_run.raise_for_status``)."""
    for status in ("data_error", "non_finite"):
        for name, run in per_class.items():
            if run["status"] == status:
                training_run.raise_for_status(status, run["message"], run["checkpoint"], f"of {name!r}")
