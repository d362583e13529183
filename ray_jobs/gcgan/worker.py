"""The GAN job's Ray Train worker: DDP training of one class's GCGAN (``gan.train_step.GanStep``).

``train_loop_per_worker(config)`` is plain PyTorch plus a few ``ray.train`` calls:

* data: the class's train rows arrive as a Ray Data dataset (read, filtered to the class, decoded
  and resized by Ray Data tasks; ``ray_jobs.gcgan.driver.class_dataset``). The dataset is NOT split
  across workers: a minority class is small (the paper trains on 40-160 images), so every worker
  reads it once into memory (uint8, on its device; ``max_class_mb`` guards the size) and draws
  its batches from it. All workers walk one shared seeded permutation per pass over the class,
  each taking its own slice (:class:`ClassSampler`), as a ``DistributedSampler`` would: a global
  batch holds ``world x batch_size`` different images while the class has that many.
* both networks under DDP (Ray's ``prepare_model``); the EMA generator lives on rank 0 and is
  updated from the synchronised weights after every G step;
* every ``checkpoint_every`` iterations: a checkpoint through ``ray.train.report`` (rank 0 writes
  G, D, EMA, both optimisers and scalers, iteration, config) and a PNG grid of the EMA generator's
  samples on fixed noise (``<run>/samples/iter_NNNNNN.png``);
* a non-finite D or G loss on any worker stops every worker (``collectives.stop_if_any``), naming
  the iteration; a damaged shard stops them too. A lost worker is Ray Train's business
  (``FailureConfig``): the group restarts from the last checkpoint.
"""
from __future__ import annotations

import os
import time

import torch

from medbalance.errors import ConfigError
from ray_jobs.gcgan.config import GanConfig
from ray_jobs.runtime import collectives
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.history import GAN_PANELS, RunHistory
from ray_jobs.runtime.progress import say
from shards import storage

SAMPLES_DIR = "samples"
FIXED_NOISE_SEED = 7919


class ClassSampler:
    """Batch indices into a class of ``n`` images, a deterministic function of the iteration.

    Position p of the stream is image ``perm_e[p mod n]`` with e = p div n and perm_e a seeded
    permutation; rank r's batch at iteration i holds positions ((i world + r) B) ... + B - 1. A
    resumed run therefore draws exactly the batches it would have drawn.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, iteration: int, world: int, rank: int, batch_size: int) -> torch.Tensor:
        start = (iteration * world + rank) * batch_size
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in range(start, start + batch_size)])


def load_class_images(shard, cfg: GanConfig, class_name: str, device: torch.device) -> torch.Tensor:
    """Read the whole (unsplit) class dataset: uint8 N x 3 x S x S on ``device``.

    A damaged shard is reported through the all-worker agreement, never by one worker leaving.
    """
    from ray_jobs.runtime.data_errors import data_error_message

    parts, message = [], ""
    limit = cfg.max_class_mb * 1e6
    try:
        for batch in shard.iter_torch_batches(batch_size=64, device="cpu"):
            parts.append(batch["image"])
            if sum(p.numel() for p in parts) > limit:
                message = (f"class {class_name!r} at {cfg.image_size} px is over max_class_mb={cfg.max_class_mb:g} "
                           "MB in memory; use a smaller image size or raise --set max_class_mb")
                break
    except Exception as exc:  # noqa: BLE001 (a damaged shard is told apart; anything else is re-raised)
        message = data_error_message(exc, cfg.data)
        if message is None:
            raise
    collectives.stop_if_any(collectives.DATA_ERROR if message else collectives.OK,
                            f"reading class {class_name!r}: {message}" if message else "", device)
    images = torch.cat(parts) if parts else torch.zeros(0, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    if len(images) == 0:
        raise ConfigError(f"class {class_name!r} has no train rows in {cfg.data}")
    return images.to(device)


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident memory (MB) and, on a GPU, PyTorch's peak allocation (MB)."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _maybe_inject_fault(hooks: dict, rank: int, iteration: int) -> None:
    """Test hook: kill this worker's process once (``marker`` records that it happened)."""
    if "marker" not in hooks or rank != hooks.get("kill_rank", 1) or iteration != hooks.get("kill_iteration", 1):
        return
    if not os.path.exists(hooks["marker"]):
        open(hooks["marker"], "w").close()
        os._exit(1)


def _loss_check(iteration: int, rank: int, class_name: str, device: torch.device):
    """``check(name, loss)`` for GanStep: agree with every worker, stop all on a non-finite loss."""
    def check(name: str, loss: torch.Tensor) -> None:
        status = collectives.loss_status(loss)
        message = (f"non-finite {name} loss ({loss.item()}) at iteration {iteration} on rank {rank} "
                   f"(class {class_name!r}); training stopped, the last good checkpoint is kept. Lower "
                   "the learning rate (--set lr=...) or check the data.") if status else ""
        collectives.stop_if_any(status, message, device)
    return check


def write_sample_grid(step, cfg: GanConfig, run_uri: str, noise: torch.Tensor, iteration: int,
                      autocast_dtype) -> str:
    """Rank 0: the EMA generator's images for the fixed noise, as one PNG in the run folder."""
    from gan.sampling import generate, grid_png

    step.ema.sync_buffers(step.generator)
    images = generate(step.ema.module, noise, cfg.sample_bn_mode, autocast_dtype=autocast_dtype)
    uri = storage.join(run_uri, SAMPLES_DIR, f"iter_{iteration:06d}.png")
    fs, path = storage.resolve(uri)
    storage.write_bytes_atomic(fs, path, grid_png(images, nrow=max(1, int(len(images) ** 0.5))), uri)
    return uri


def _report(step, cfg: GanConfig, config: dict, metrics: dict, sampling: tuple, history) -> None:
    """Every worker reports ``metrics``; rank 0 (``history`` set) also writes the sample grid (from
    ``sampling`` = (fixed noise, autocast dtype)), the checkpoint and the run's history row."""
    from ray_jobs.runtime.checkpoint import report

    if history is None:
        report(metrics)
        return
    done = metrics["iteration"]
    sample = write_sample_grid(step, cfg, config["run_uri"], sampling[0], done, sampling[1])
    state = {**step.state_dict(), "iteration": done, "config": config_lib.to_dict(cfg),
             "class_name": config["class_name"], "class_index": config["class_index"],
             "reconstruction": step.reconstruction.name, "metrics": metrics, "sample_grid": sample}
    report(metrics, state=state, files={"config.yaml": config_lib.dump_yaml(cfg)})
    history.append(metrics)


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker of one class's GAN.

    Args:
        config: ``{"cfg": GanConfig as a dict, "class_name", "class_index", "run_uri",
            "resume_from"}`` (filled in by the driver).

    Returns:
        ``{"status": "ok"|"non_finite"|"data_error", "message", "start_iteration", "iteration"}``.
    """
    import ray.train
    import ray.train.torch

    from gan import Discriminator, GanStep, Generator, ReconstructionLoss, real_batch
    from ray_jobs.runtime.amp import amp_dtype
    from ray_jobs.runtime.checkpoint import restore_state
    from ray_jobs.runtime.ray_setup import quiet_ray_train
    from ray_jobs.runtime.seeding import seed_everything

    cfg = config_lib.from_dict(GanConfig, config["cfg"])
    class_name, run_uri = config["class_name"], config["run_uri"]
    quiet_ray_train(cfg.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()
    autocast_dtype = amp_dtype(cfg.amp, device)

    start_iteration = iteration = 0
    try:
        images = load_class_images(ray.train.get_dataset_shard("train"), cfg, class_name, device)
        step = GanStep(Generator(cfg.image_size, cfg.nz, cfg.ngf), Discriminator(cfg.image_size, cfg.ndf),
                       ReconstructionLoss(cfg.lpips_weights), device,
                       wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
                       optimizer=cfg.optimizer, lr=cfg.lr, policy=cfg.policy, autocast_dtype=autocast_dtype,
                       keep_ema=rank == 0, ema_decay=cfg.ema_decay)
        state = restore_state(config.get("resume_from"), map_location=device)
        if state is not None:
            step.load_state_dict(state)
            start_iteration = iteration = int(state["iteration"])
            if rank == 0:
                say(f"{class_name}: resumed from the checkpoint of iteration {iteration}")
        noise = torch.randn(cfg.num_samples, cfg.nz, generator=torch.Generator().manual_seed(cfg.seed + FIXED_NOISE_SEED))
        noise = noise.to(device)
        sampler = ClassSampler(len(images), cfg.seed)
        history = RunHistory(run_uri, "iteration", GAN_PANELS) if rank == 0 else None
        hooks = config.get("faults", {})   # test-only (runtime.faults); never part of the config
        sums: dict[str, float] = {}
        since, last = 0, time.perf_counter()
        for iteration in range(start_iteration, cfg.iterations):
            _maybe_inject_fault(hooks, rank, iteration)
            real = real_batch(images[sampler.indices(iteration, world, rank, cfg.batch_size).to(device)])
            if iteration == hooks.get("nan_iteration"):
                real = real * float("nan")
            out = step.step(real, check=_loss_check(iteration, rank, class_name, device))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            since += 1
            done = iteration + 1
            if rank == 0 and done % cfg.log_every == 0:
                say(f"{class_name}: iteration {done}/{cfg.iterations} loss D {float(out['loss_d']):.4f} "
                    f"G {float(out['loss_g']):.4f} rec {float(out['loss_rec']):.4f}")
            if done % cfg.checkpoint_every and done != cfg.iterations:
                continue
            seconds = time.perf_counter() - last
            metrics = {"iteration": done, **{k: v / since for k, v in sums.items()},
                       "iterations_per_s": since / max(seconds, 1e-9),
                       "images_per_s": since * world * cfg.batch_size / max(seconds, 1e-9),
                       **peak_memory(device)}
            _report(step, cfg, config, metrics, (noise, autocast_dtype), history)
            sums, since, last = {}, 0, time.perf_counter()
    except collectives.Stop as stop:
        if rank == 0:
            say(stop.message)
        return {"status": stop.status, "message": stop.message, "start_iteration": start_iteration,
                "iteration": iteration}
    return {"status": "ok", "message": "", "start_iteration": start_iteration,
            "iteration": max(start_iteration, cfg.iterations)}
