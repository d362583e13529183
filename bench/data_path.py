"""The Ray Data shard pipeline vs torchvision ImageFolder + DataLoader, images/s side by side.

    python bench/data_path.py                            # bccd-wbc, 224 px, adsr, 2 workers, 5 epochs
    python bench/data_path.py --data data/retinamnist/retinamnist.npz --image-size 64
    python bench/data_path.py --workers 1 --epochs 3 --json runs/bench/data_path.json

The same images are prepared two ways in a temp dir: a shard dataset (``shards.ingest``, every
image in the train split) and an ImageFolder tree (an image folder is used as it is; an npz's
train split is written out as PNGs first). Both sides decode (PIL), augment with the same
transform (``ray_jobs.classifier.pipeline.build_transform(--augment, --image-size, train=True)`` on uint8
tensors) and deliver uint8 batches of ``--batch-size``, with ``--workers`` parallel workers:

* **ray**: the job's own train pipeline, ``ray_jobs.classifier.pipeline.build_dataset(cfg, manifest, "train")``
  (``shards.ray_dataset`` -> streaming repartition into blocks of ``--block-rows`` rows -> the
  encoded blocks cached in the object store -> ``randomize_block_order`` ->
  ``map_batches(preprocess_batch)``, one task per block), on a local Ray of ``workers`` CPUs with
  the job's embedded-Ray settings (``ray_jobs.runtime.ray_setup.LOCAL_RAY_SYSTEM_CONFIG``), read with
  ``iter_torch_batches`` as the training worker reads it (how many map tasks an epoch got is
  printed);
* **dataloader**: ``torchvision.datasets.ImageFolder`` (PIL loader, ``v2.PILToTensor``, the
  transform) in a ``DataLoader(shuffle=True, num_workers=workers, persistent_workers=True)``.

Each side gets one warm-up epoch (process start-up, imports), then ``--epochs`` timed epochs,
the two sides alternating epoch by epoch so that load from other jobs hits both alike. Only the
iteration is timed (first batch to last, from asking for the iterator), not Ray's start-up.
Ratio = ray / dataloader images/s; goal >= 1.0.

Then the training step's appetite: forward + backward + SGD step of ``--train-model`` at the
same image size and batch on ``--train-threads`` threads (the CPUs a worker gets when the rest
feed the pipeline), median of ``--train-steps`` steps after one warm-up, measured alone. The
pipeline out-supplies training when its images/s exceeds the step's.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common  # first: puts the checkout on sys.path
import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from models import create_model
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.classifier.pipeline import build_dataset, build_transform, normalize
from shards import ingest, read_manifest

GOAL = 1.0
DEFAULT_DATA = str(Path(__file__).resolve().parents[1] / "data" / "bccd-wbc" / "images")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder-style folder or MedMNIST npz")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--augment", default="adsr", help="ray_jobs.classifier.pipeline augment preset")
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers = Ray Data CPUs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per side (plus one warm-up)")
    p.add_argument("--block-rows", type=int, default=DataSection.block_rows,
                   help="rows per Ray Data block before decoding (data.block_rows; 0: one per shard)")
    p.add_argument("--train-model", default="adsr_resnet18")
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    return p


def npz_to_folder(npz_path: str, root: Path) -> Path:
    """Write an npz's train split as ``root/<label>/<index>.png`` (an ImageFolder tree)."""
    with np.load(npz_path) as npz:
        images, labels = npz["train_images"], npz["train_labels"].reshape(-1)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    return root


def ray_pipeline(uri: str, args: argparse.Namespace):
    """The job's train pipeline: ``ray_jobs.classifier.pipeline.build_dataset(cfg, manifest, "train")``."""
    cfg = TrainConfig(data=DataSection(uri=uri, image_size=args.image_size, augment=args.augment,
                                       batch_size=args.batch_size, block_rows=args.block_rows))
    return build_dataset(cfg, read_manifest(uri), "train")


def dataloader(root: Path, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    transform = v2.Compose([v2.PILToTensor(), build_transform(args.augment, args.image_size, train=True)])
    folder = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0)


def time_epoch(batches) -> dict:
    """Iterate one epoch; images, seconds, and seconds to the first batch."""
    started = time.perf_counter()
    images, first = 0, None
    for batch in batches():
        images += len(batch["label"] if isinstance(batch, dict) else batch[1])
        if first is None:
            first = time.perf_counter() - started
    return {"images": images, "seconds": time.perf_counter() - started, "first_batch_s": first}


def training_step_rate(args: argparse.Namespace, num_classes: int) -> dict:
    """Images/s one training step consumes (forward + backward + SGD step), measured alone."""
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(0)
    model = create_model(args.train_model, num_classes=num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    target = torch.randint(0, num_classes, (args.batch_size,))
    seconds = []
    for _ in range(args.train_steps + 1):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(normalize(images)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    step = statistics.median(seconds[1:])
    return {"step_seconds": seconds, "images_per_s": args.batch_size / step}


def steady_rate(epochs: list[dict]) -> float:
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)


def main(args: argparse.Namespace) -> int:
    # Ray warns each epoch when the map gets fewer input blocks than tasks; the count is printed.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    with tempfile.TemporaryDirectory(prefix="mb-data-path-") as tmp:
        root = npz_to_folder(args.data, Path(tmp) / "folder") if args.data.endswith(".npz") else Path(args.data)
        uri = f"{tmp}/shards"
        ingest(str(root), uri, val=0.0, test=0.0)
        loader = dataloader(root, args)
        num_images, num_classes = len(loader.dataset), len(loader.dataset.classes)
        print(f"data path: {num_images} images of {args.data}, {args.image_size}x{args.image_size}, "
              f"augment {args.augment}, {args.workers} worker(s), batch {args.batch_size}; "
              f"{args.epochs} timed epochs per side after 1 warm-up, sides alternating", flush=True)
        # The DataLoader's workers are forked before Ray starts (no fork of Ray's threads).
        warm_loader = time_epoch(lambda: loader)
        _common.start_local_ray(num_cpus=args.workers)
        ds = ray_pipeline(uri, args)

        def ray_batches():
            return ds.iter_torch_batches(batch_size=args.batch_size,
                                         local_shuffle_buffer_size=DataSection.shuffle_buffer or None)

        warm_ray = time_epoch(ray_batches)
        ray_epochs, loader_epochs, loads = [], [], []
        for epoch in range(args.epochs):
            loads.append(_common.load_avg())
            ray_epochs.append(time_epoch(ray_batches))
            loader_epochs.append(time_epoch(lambda: loader))
            print(f"  epoch {epoch + 1}/{args.epochs}: ray {ray_epochs[-1]['images'] / ray_epochs[-1]['seconds']:.1f}"
                  f" img/s, dataloader {loader_epochs[-1]['images'] / loader_epochs[-1]['seconds']:.1f} img/s",
                  flush=True)
        stats = ds.stats()
        map_tasks = re.search(r"MapBatches\(preprocess_batch\): (\d+) tasks executed", stats)
        map_tasks = int(map_tasks.group(1)) if map_tasks else None
        train = training_step_rate(args, num_classes)
        machine = _common.machine()

    for name, epochs in (("ray", ray_epochs), ("dataloader", loader_epochs)):
        if any(e["images"] != num_images for e in epochs):
            print(f"error: the {name} side delivered {[e['images'] for e in epochs]} images per epoch, "
                  f"not {num_images}", file=sys.stderr)
            return 1
    ray_rate, loader_rate = steady_rate(ray_epochs), steady_rate(loader_epochs)
    ratio = ray_rate / loader_rate
    supply_ok = ray_rate > train["images_per_s"]
    result = {"config": vars(args), "machine": machine, "images_per_epoch": num_images,
              "ray": {"warmup": warm_ray, "epochs": ray_epochs, "images_per_s": ray_rate},
              "dataloader": {"warmup": warm_loader, "epochs": loader_epochs, "images_per_s": loader_rate},
              "training_step": train, "ratio": ratio, "goal": GOAL, "goal_met": ratio >= GOAL,
              "out_supplies_training": supply_ok, "load_avg_1min_per_epoch": loads,
              "ray_map_tasks_last_epoch": map_tasks,
              "ray_data_stats_tail": stats[-1500:]}

    print()
    headers = ["side", "warm-up s"] + [f"epoch {i + 1} s" for i in range(args.epochs)] + ["first batch s", "images/s"]
    _common.print_table(headers, [
        [f"Ray Data shard pipeline ({args.workers} CPUs)", warm_ray["seconds"]]
        + [e["seconds"] for e in ray_epochs] + [statistics.median(e["first_batch_s"] for e in ray_epochs), ray_rate],
        [f"ImageFolder + DataLoader ({args.workers} workers)", warm_loader["seconds"]]
        + [e["seconds"] for e in loader_epochs]
        + [statistics.median(e["first_batch_s"] for e in loader_epochs), loader_rate]])
    print(f"(seconds per epoch of {num_images} images; first batch s = median wait for the first batch; "
          f"1-min load average during the epochs: {min(loads):.1f}-{max(loads):.1f} on {machine['cpu_count']} cores)")
    print(f"Ray Data ran the decode+augment map as {map_tasks} task(s) in the last epoch "
          f"(one per block of <= {args.block_rows or 'a shard of'} rows; {args.workers} could run at once)")
    print(f"\nratio ray / dataloader = {ratio:.2f}  (goal >= {GOAL:.1f}: {'MET' if ratio >= GOAL else 'NOT MET'})")
    print(f"pipeline supplies {ray_rate:.1f} img/s, training step consumes {train['images_per_s']:.1f} img/s "
          f"({args.train_model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.train_threads} thread(s), forward+backward+SGD): "
          f"{'the pipeline out-supplies training' if supply_ok else 'the pipeline does NOT keep up with training'}"
          f" ({ray_rate / train['images_per_s']:.1f}x; DataLoader: {loader_rate / train['images_per_s']:.1f}x)")
    _common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
