"""Ray Train's overhead: one Ray Train worker vs a plain PyTorch loop, samples/s side by side.

    python bench/train_overhead.py                       # resnet18, 64 px, batch 32, 1 thread, 3 epochs
    python bench/train_overhead.py --threads 2 --epochs 4 --json runs/bench/train_overhead.json

The data (default RetinaMNIST's npz) is ingested into a temp dir as a shard dataset. Both sides
run the job's own training step, ``ray_jobs.classifier.step.ClassifierStep`` built by ``build_step``
from the same ``TrainConfig`` (defaults: loss ``ce`` here, SGD momentum 0.9, cosine schedule, no
clip-norm, no channels_last, AMP ``auto`` = off on CPU, each a flag; the model ``--model`` with fresh weights),
with the same batch size, image size and number of torch threads, for the same number of epochs
over the same train split:

* **plain**: a PyTorch loop in this process over the train split decoded and resized once
  beforehand (uint8 tensors in memory, shuffled each epoch). Timed per epoch: slicing the batch
  and ``ClassifierStep.step`` (``normalize`` with the job's input spec, forward, loss, finite
  check, backward, clip-norm when set, optimizer and scheduler step). This runs first, before Ray
  is started.
* **ray**: ``ray_jobs.classifier.driver.fit`` (the real job: ``TorchTrainer`` around ``train_loop_per_worker``,
  the Ray Data pipeline of ``build_datasets``) with 1 worker holding ``--threads`` CPUs
  (``cpus_per_worker``, so the worker calls ``torch.set_num_threads(threads)``) on a local Ray of
  ``threads + 1`` CPUs (the extra CPU runs the Ray Data read/decode/resize tasks: DESIGN 5).
  The numbers are the worker's own reports (``train_samples`` / ``train_seconds`` per epoch, read
  back from the checkpoints), timed around its training loop: waiting on
  ``iter_torch_batches`` plus the same step as above. Validation, checkpointing and Ray's start-up
  are outside that timing; the total wall time of ``fit`` is printed apart.

The first epoch of each side is a warm-up (allocator, Ray Data start-up) and is left out; the
steady rate is the samples of the other epochs over their seconds. Ratio = ray / plain; goal >= 0.90.
The fastest epoch of each side is printed too (less sensitive to load from other jobs), and, to show
where Ray's time goes, the job's train pipeline is then iterated alone (no training): how long
until its first batch and its last. ``--breakdown`` also runs the same step (``make_step`` below)
in a Ray Train worker of its own on the job's train pipeline, timing the wait for each batch apart
from the steps. Ray's workers run at nice 0 here, as the plain side does (``bench/_common.py``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: puts the checkout on sys.path
import torch

from medbalance.errors import TrainingError
from ray_jobs.classifier.config import DataSection, OptimSection, TrainConfig
from ray_jobs.classifier.driver import fit
from ray_jobs.classifier.pipeline import InputSpec, build_datasets, build_transform, input_spec
from ray_jobs.classifier.step import ClassifierStep, build_step
from ray_jobs.runtime.amp import AMP_MODES
from ray_jobs.runtime.checkpoint import load_checkpoint
from ray_jobs.runtime.configs import from_dict, to_dict
from ray_jobs.runtime.seeding import seed_everything
from shards import ShardDataset, ingest, read_manifest

GOAL = 0.90
DEFAULT_DATA = str(Path(__file__).resolve().parents[1] / "data" / "retinamnist" / "retinamnist.npz")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="per side; the first is a warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (= cpus_per_worker)")
    p.add_argument("--augment", default="none",
                   help="Ray side's augment preset (the plain side's tensors are transformed once; "
                        "the step's compute does not depend on the pixels)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES, help="TrainConfig.amp on both sides (auto: off on CPU)")
    p.add_argument("--channels-last", action="store_true", help="TrainConfig.channels_last on both sides")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="TrainConfig.optim.clip_grad_norm on both sides")
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder or MedMNIST npz (needs a val split)")
    p.add_argument("--breakdown", action="store_true",
                   help="also run the same step in a Ray Train worker of our own that times the wait "
                        "for each batch apart from the step (another len(epochs) epochs)")
    p.add_argument("--json", help="write the results here")
    return p


def make_config(args: argparse.Namespace, uri: str, storage: str) -> TrainConfig:
    return TrainConfig(
        name="train-overhead", storage=storage, model=args.model, loss="ce", epochs=args.epochs,
        num_workers=1, cpus_per_worker=float(args.threads), max_failures=0,
        keep_checkpoints=args.epochs,  # keep every epoch's report (they carry the metrics)
        amp=args.amp, channels_last=args.channels_last, optim=OptimSection(clip_grad_norm=args.clip_grad_norm),
        data=DataSection(uri=uri, image_size=args.image_size, augment=args.augment,
                         batch_size=args.batch_size))


def load_train_split(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """The train split decoded and transformed once: uint8 N x 3 x S x S, labels, names, counts."""
    dataset = ShardDataset(cfg.data.uri, "train",
                           transform=build_transform(cfg.data.augment, cfg.data.image_size, train=True))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.from_numpy(dataset.labels)
    return images, labels, dataset.class_names, dataset.manifest.class_counts("train")


def make_step(cfg: TrainConfig, class_names: list[str], class_counts: list[int], spec: InputSpec) -> ClassifierStep:
    """The job's step (``build_step``, as ``train_loop_per_worker`` builds it) for one CPU process."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    seed_everything(cfg.seed, cfg.reproducible)
    return build_step(cfg, len(class_names), class_counts, spec, torch.device("cpu"))


def plain_loop(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
               class_names: list[str], class_counts: list[int], spec: InputSpec) -> list[dict]:
    """The worker's step without Ray; one ``{epoch, samples, seconds}`` per epoch."""
    step = make_step(cfg, class_names, class_counts, spec)
    epochs = []
    for epoch in range(cfg.epochs):
        step.start_epoch(epoch)
        order = torch.randperm(len(labels))
        started, seen = time.perf_counter(), 0
        for step_index, first in enumerate(range(0, len(labels), cfg.data.batch_size)):
            index = order[first:first + cfg.data.batch_size]
            step.step(images[index], labels[index], epoch=epoch, step_index=step_index).item()
            seen += len(index)
        epochs.append({"epoch": epoch, "samples": seen, "seconds": time.perf_counter() - started})
        print(f"  plain epoch {epoch + 1}/{cfg.epochs}: {seen / epochs[-1]['seconds']:.1f} samples/s", flush=True)
    return epochs


def breakdown_worker(config: dict) -> list[dict]:
    """A Ray Train worker running the same step, timing the wait for each batch apart from the step."""
    import ray.train

    cfg = from_dict(TrainConfig, config["cfg"])
    step = make_step(cfg, config["class_names"], config["class_counts"], InputSpec.from_dict(config["input_spec"]))
    shard, epochs = ray.train.get_dataset_shard("train"), []
    for epoch in range(cfg.epochs):
        step.start_epoch(epoch)
        batches = iter(shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=False))
        wait = compute = 0.0
        seen = step_index = 0
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            got = time.perf_counter()
            wait += got - asked
            if batch is None:
                break
            step.step(batch["image"], batch["label"], epoch=epoch, step_index=step_index).item()
            compute += time.perf_counter() - got
            seen += len(batch["label"])
            step_index += 1
        epochs.append({"epoch": epoch, "samples": seen, "wait_s": wait, "step_s": compute})
    return epochs


def ray_breakdown(cfg: TrainConfig, class_names: list[str], class_counts: list[int],
                  spec: InputSpec) -> list[dict]:
    """Run ``breakdown_worker`` on the job's train pipeline, 1 worker of ``cpus_per_worker`` CPUs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        breakdown_worker,
        train_loop_config={"cfg": to_dict(cfg), "class_names": class_names, "class_counts": class_counts,
                           "input_spec": spec.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="breakdown", storage_path=cfg.storage),
        datasets={"train": build_datasets(cfg, read_manifest(cfg.data.uri), spec)["train"]})
    epochs = trainer.fit().return_value
    for e in epochs:
        print(f"  ray breakdown epoch {e['epoch'] + 1}/{cfg.epochs}: waiting for batches {e['wait_s']:.1f} s, "
              f"training steps {e['step_s']:.1f} s", flush=True)
    return epochs


def ray_fit(cfg: TrainConfig) -> tuple[list[dict], float]:
    """Run the real job; its per-epoch reports (from the checkpoints) and fit's wall seconds."""
    _common.start_local_ray(num_cpus=int(cfg.cpus_per_worker) + 1)
    started = time.perf_counter()
    summary = fit(cfg, resume="fresh")
    wall = time.perf_counter() - started
    reports = [load_checkpoint(str(p))["metrics"]
               for p in (Path(cfg.storage) / cfg.name).rglob("checkpoint.pt")]
    if summary["status"] != "ok" or len(reports) != cfg.epochs:
        raise TrainingError(f"Ray run ended {summary['status']!r} with {len(reports)} of {cfg.epochs} "
                            f"epoch reports: {summary['message']}")
    epochs = [{"epoch": int(m["epoch"]), "samples": int(m["train_samples"]), "seconds": float(m["train_seconds"])}
              for m in sorted(reports, key=lambda m: m["epoch"])]
    for e in epochs:
        print(f"  ray   epoch {e['epoch'] + 1}/{cfg.epochs}: {e['samples'] / e['seconds']:.1f} samples/s", flush=True)
    return epochs, wall


def pipeline_alone(cfg: TrainConfig, epochs: int = 2) -> list[dict]:
    """The job's train pipeline iterated with no training (same Ray, after fit): where the wait is."""
    train = build_datasets(cfg, read_manifest(cfg.data.uri))["train"]
    out = []
    for _ in range(epochs):
        started, first, samples = time.perf_counter(), None, 0
        for batch in train.iter_torch_batches(batch_size=cfg.data.batch_size):
            samples += len(batch["label"])
            first = first if first is not None else time.perf_counter() - started
        out.append({"samples": samples, "first_batch_s": first, "seconds": time.perf_counter() - started})
    return out


def steady_rate(epochs: list[dict]) -> float:
    """Samples per second over every epoch but the first (warm-up)."""
    steady = epochs[1:]
    return sum(e["samples"] for e in steady) / sum(e["seconds"] for e in steady)


def best_rate(epochs: list[dict]) -> float:
    """The fastest epoch but the first: less sensitive to load from other jobs."""
    return max(e["samples"] / e["seconds"] for e in epochs[1:])


def main(args: argparse.Namespace) -> int:
    if args.epochs < 2:
        print("error: --epochs must be >= 2 (the first epoch is a warm-up)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mb-train-overhead-") as tmp:
        uri = f"{tmp}/data"
        ingest(args.data, uri)
        cfg = make_config(args, uri, f"{tmp}/runs")
        images, labels, class_names, class_counts = load_train_split(cfg)
        spec = input_spec(cfg, read_manifest(uri))  # the job's normalisation and channels
        print(f"train overhead: {cfg.model}, {cfg.data.image_size}x{cfg.data.image_size}, batch "
              f"{cfg.data.batch_size}, {args.threads} torch thread(s), loss {cfg.loss}, {cfg.optim.name}; "
              f"{len(labels)} train images of {args.data}; {cfg.epochs} epochs per side (first = warm-up)",
              flush=True)
        load_before = _common.load_avg()
        plain = plain_loop(cfg, images, labels, class_names, class_counts, spec)
        load_between = _common.load_avg()
        ray_epochs, ray_wall = ray_fit(cfg)
        load_after = _common.load_avg()
        pipeline = pipeline_alone(cfg)
        breakdown = ray_breakdown(cfg, class_names, class_counts, spec) if args.breakdown else None
        result = {"config": vars(args), "machine": _common.machine(), "train_images": len(labels),
                  "plain": {"epochs": plain, "steady_samples_per_s": steady_rate(plain),
                            "best_samples_per_s": best_rate(plain)},
                  "ray": {"epochs": ray_epochs, "steady_samples_per_s": steady_rate(ray_epochs),
                          "best_samples_per_s": best_rate(ray_epochs), "fit_wall_seconds": ray_wall},
                  "ray_data_pipeline_alone": pipeline, "ray_breakdown": breakdown,
                  "load_avg_1min": {"before_plain": load_before, "before_ray": load_between,
                                    "after_ray": load_after}}
    ratio = result["ray"]["steady_samples_per_s"] / result["plain"]["steady_samples_per_s"]
    best_ratio = result["ray"]["best_samples_per_s"] / result["plain"]["best_samples_per_s"]
    result.update(ratio=ratio, best_epoch_ratio=best_ratio, goal=GOAL, goal_met=ratio >= GOAL)

    print()
    headers = (["side"] + [f"epoch {i + 1} s" for i in range(cfg.epochs)]
               + ["steady samples/s", "best epoch samples/s", "load 1m at start"])
    _common.print_table(headers, [
        ["plain PyTorch"] + [e["seconds"] for e in plain]
        + [result["plain"]["steady_samples_per_s"], result["plain"]["best_samples_per_s"], load_before],
        ["Ray Train, 1 worker"] + [e["seconds"] for e in ray_epochs]
        + [result["ray"]["steady_samples_per_s"], result["ray"]["best_samples_per_s"], load_between]])
    print(f"(1-min load average after the Ray run: {load_after} on {result['machine']['cpu_count']} cores)")
    print(f"\nratio ray / plain = {ratio:.3f}  (goal >= {GOAL:.2f}: {'MET' if ratio >= GOAL else 'NOT MET'}); "
          f"best epoch vs best epoch: {best_ratio:.3f}")
    print("plain: the training step only (batch slice of in-memory uint8 tensors, normalize, forward, "
          "loss, backward, optimizer + scheduler step).\n"
          "ray:   the worker's train_seconds: the same step plus waiting on iter_torch_batches "
          "(Ray Data read + decode + resize, in other processes); no validation, checkpointing or start-up.\n"
          f"ray fit() wall time, all {cfg.epochs} epochs with start-up, validation and checkpoints: "
          f"{ray_wall:.1f} s (plain: {sum(e['seconds'] for e in plain):.1f} s of training).")
    waits = ", ".join(f"first batch after {p['first_batch_s']:.1f} s, all {p['samples']} after {p['seconds']:.1f} s"
                      for p in pipeline)
    print(f"the job's train pipeline alone (build_datasets, no training, after fit): {waits}")
    if breakdown:
        print("\n--breakdown: the same step in a Ray Train worker, on the job's train pipeline")
        _common.print_table(["epoch", "waiting for batches s", "training steps s", "plain epoch s"], [
            [e["epoch"] + 1, e["wait_s"], e["step_s"], p["seconds"]] for e, p in zip(breakdown, plain)])
    _common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
