"""GCGAN training speed and memory: plain PyTorch vs the Ray Train job (1 and 2 DDP workers).

    python bench/gan.py                                   # 64 and 256 px, authors' widths, CPU
    python bench/gan.py --width 16 --iterations 6 --warmup 2 --json runs/bench/gan.json
    python bench/gan.py --gpu --sizes 256 1024            # on a GPU machine

For each image size, side by side in one run, on one class of the bundled BCCD-WBC (ingested
into a temp dir; Monocyte, 14 train images) with the same per-worker batch, widths, threads and
iterations:

* **plain**: ``gan.train_step.GanStep`` without any wrapper, in a fresh process (spawned, so its
  peak RSS is its own), on the class's images decoded and resized beforehand; the same
  ``ClassSampler`` and ``real_batch`` as the job. Timed: the iterations after ``--warmup``.
* **ray N**: ``ray_jobs.gcgan.driver.fit_classes`` (the real job: Ray Data read/filter/decode of
  the class, ``TorchTrainer``, DDP on N workers, the non-finite agreement each step) with N = 1
  and 2 workers of ``--threads`` CPUs each. The numbers are the workers' own: rank 0's
  ``iterations_per_s`` over the iterations after the warm-up checkpoint (checkpointing and the
  sample grid are outside that interval) and its process's peak RSS (a Ray worker process also
  holds Ray's core worker and the dataset iterator). Start-up (Ray, workers, data) is outside.

G+D iterations/s = full iterations (D step + G step + EMA) per second; images/s = iterations/s x
workers x batch. Ratios: ray 1 worker / plain (the cost of Ray Train + DDP wrapper + per-step
agreement with one worker) and ray 2 workers / plain in images/s (scaling). On a GPU (``--gpu``)
peak memory is ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: puts the checkout on sys.path

DEFAULT_DATA = str(Path(__file__).resolve().parents[1] / "data" / "bccd-wbc" / "images")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    p.add_argument("--width", type=int, default=64, help="ngf = ndf (64 as the authors)")
    p.add_argument("--batch-size", type=int, default=2, help="per worker (authors: 2)")
    p.add_argument("--iterations", type=int, default=8, help="timed iterations per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (= CPUs per Ray worker)")
    p.add_argument("--class-name", default="Monocyte")
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder or npz to ingest")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--json", help="write the results here")
    return p


def _plain(args: dict, queue) -> None:
    """Child process: the step alone, in plain PyTorch; puts (iterations/s, peak MB) on ``queue``."""
    import torch

    from gan import Discriminator, GanStep, Generator, ReconstructionLoss, real_batch
    from ray_jobs.gcgan.worker import ClassSampler, peak_memory
    from ray_jobs.runtime.amp import amp_dtype
    from ray_jobs.runtime.seeding import seed_everything

    torch.set_num_threads(args["threads"])
    seed_everything(0)
    device = torch.device("cuda" if args["gpu"] else "cpu")
    images = torch.load(args["images"]).to(device)
    step = GanStep(Generator(args["size"], ngf=args["width"]), Discriminator(args["size"], ndf=args["width"]),
                   ReconstructionLoss(), device, autocast_dtype=amp_dtype("auto", device))
    sampler = ClassSampler(len(images), 0)
    for i in range(args["warmup"] + args["iterations"]):
        if i == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        real = real_batch(images[sampler.indices(i, 1, 0, args["batch_size"]).to(device)])
        out = step.step(real)
        float(out["loss_g"])  # one sync per step, as the job's finite check
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    memory = peak_memory(device)
    queue.put((args["iterations"] / seconds, memory.get("peak_gpu_mb", memory["peak_rss_mb"])))


def run_plain(args, size: int, images_file: str) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_plain, args=(dict(size=size, images=images_file, threads=args.threads, gpu=args.gpu,
                                                 width=args.width, batch_size=args.batch_size, warmup=args.warmup,
                                                 iterations=args.iterations), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_ray(args, size: int, workers: int, data: str, storage: str) -> tuple[float, float]:
    from ray_jobs.gcgan.config import GanConfig
    from ray_jobs.gcgan.driver import fit_classes
    from ray_jobs.runtime import configs as config_lib

    cfg = config_lib.from_dict(GanConfig, dict(
        data=data, storage=storage, name=f"s{size}-w{workers}", classes=args.class_name, image_size=size,
        iterations=args.warmup + args.iterations, checkpoint_every=args.warmup, batch_size=args.batch_size,
        num_workers=workers, use_gpu=args.gpu, cpus_per_worker=args.threads, concurrent=1,
        ngf=args.width, ndf=args.width, num_samples=4, log_every=10**9))
    summary = fit_classes(cfg, resume="fresh")
    metrics = summary["runs"][args.class_name]["last_metrics"]
    return metrics["iterations_per_s"], metrics.get("peak_gpu_mb", metrics["peak_rss_mb"])


def class_images(data: str, class_name: str, size: int, out_file: str) -> int:
    """Decode and resize the class's train images as the job does; save them for the plain side."""
    import torch

    from ray_jobs.classifier.pipeline import build_transform
    from shards import ShardDataset

    ds = ShardDataset(data, "train", transform=build_transform("none", size, train=False), include_synthetic=False)
    label = ds.class_names.index(class_name)
    images = torch.stack([ds[i][0] for i in range(len(ds)) if ds.labels[i] == label])
    torch.save(images, out_file)
    return len(images)


def main(args: argparse.Namespace) -> int:
    from shards import ingest

    tmp = Path(tempfile.mkdtemp(prefix="bench-gan-"))
    data = str(tmp / "data")
    ingest(args.data, data, workers=1)
    rows, results = [], {"args": vars(args), "machine": _common.machine(), "sizes": {}}
    max_workers = max(args.workers)
    _common.start_local_ray(num_cpus=max_workers * args.threads + 1)  # + 1 CPU for Ray Data; GPUs detected
    for size in args.sizes:
        images_file = str(tmp / f"images-{size}.pt")
        n = class_images(data, args.class_name, size, images_file)
        plain_its, plain_mem = run_plain(args, size, images_file)
        entry = {"class_images": n, "plain": {"iterations_per_s": plain_its, "peak_mb": plain_mem,
                                              "load_avg": _common.load_avg()}}
        rows.append([f"{size} px plain (1 process)", plain_its, plain_its * args.batch_size, plain_mem, 1.0, 1.0])
        for workers in args.workers:
            its, mem = run_ray(args, size, workers, data, str(tmp / "runs"))
            entry[f"ray_{workers}"] = {"iterations_per_s": its, "peak_mb": mem, "load_avg": _common.load_avg()}
            rows.append([f"{size} px ray {workers} worker(s)", its, its * workers * args.batch_size, mem,
                         its / plain_its, its * workers / plain_its])
        results["sizes"][size] = entry
    print()
    print(f"GCGAN G+D training, width {args.width}, batch {args.batch_size}/worker, {args.threads} thread(s)/process, "
          f"{args.iterations} timed iterations after {args.warmup}; {'GPU' if args.gpu else 'CPU'}")
    headers = ["side", "iterations/s", "images/s", "peak MB", "its ratio", "img/s ratio"]
    _common.print_table(headers, [[r[0], f"{r[1]:.3f}", f"{r[2]:.2f}", f"{r[3]:.0f}", f"{r[4]:.2f}", f"{r[5]:.2f}"]
                                  for r in rows])
    print(f"load average during the run: {_common.load_avg()} (a shared machine: ratios are noisy)")
    _common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
