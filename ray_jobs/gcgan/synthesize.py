"""Synthesize minority-class images into a NEW dataset version (``python -m ray_jobs.gan synthesize``).

    manifest = synthesize("runs/gan-bccd", "runs/data/bccd-gan30", per_class=30)

Each trained class's EMA generator (the checkpoint's ``g_ema``) draws ``per_class`` images (or,
with ``balance``, as many as bring the class's train count up to the largest class's). They are
written as PNG rows with ``synthetic=True`` and ``split=train`` into shards of their own under
``output``, and the version's manifest (format 2) lists them next to EVERY shard of the dataset
the GAN was trained on, included by reference: those real shards are neither copied nor
touched, and val/test of the version are exactly the real ones. Each synthetic row's ``source``
names the checkpoint it came from (``gcgan:<checkpoint>#<n>``); the manifest's provenance holds
the class -> checkpoint map, iterations, seed and BN mode.

Sampling runs in this process (CPU, or ``use_gpu``): it is a forward pass per 16 images. Written
atomically like every dataset: shards first, the manifest last; a failure leaves nothing.
"""
from __future__ import annotations

import time

import numpy as np
import torch

import medbalance
from medbalance.errors import ConfigError, DataError
from ray_jobs.runtime.checkpoint import load_checkpoint
from ray_jobs.runtime.progress import say
from shards import storage
from shards.deletion import check_outside
from shards.image import encode_array_png, sha256_hex
from shards.references import included_datasets, location_of

CHECKPOINT_KEYS = ("g_ema", "config", "class_name", "iteration")


def class_checkpoints(uri: str) -> dict[str, str]:
    """Class name -> checkpoint URI: a GAN run folder's ``result.json``, or one checkpoint."""
    fs, path = storage.resolve(uri)
    if storage.exists(fs, f"{path}/result.json", uri):
        import json

        result = json.loads(storage.read_bytes(fs, f"{path}/result.json", uri))
        if "classes" not in result or "checkpoint" not in result:
            raise ConfigError(f"{uri}/result.json is not a GAN run's result (no classes/checkpoint); pass the folder "
                              "`python -m ray_jobs.gan train` wrote, or one class's checkpoint")
        missing = [c for c in result["classes"] if not result["checkpoint"].get(c)]
        if missing:
            raise ConfigError(f"{uri}: no checkpoint for class(es) {missing} (did their runs reach a checkpoint?)")
        return {c: result["checkpoint"][c] for c in result["classes"]}
    state = load_checkpoint(uri, required=CHECKPOINT_KEYS)
    return {state["class_name"]: uri}


def load_ema_generator(uri: str, device: torch.device):
    """``(EMA generator on device, checkpoint state)`` of one class's GAN checkpoint."""
    from gan import Generator

    state = load_checkpoint(uri, map_location="cpu", required=CHECKPOINT_KEYS)
    cfg = state["config"]
    generator = Generator(cfg["image_size"], cfg["nz"], cfg["ngf"])
    try:
        generator.load_state_dict(state["g_ema"])
    except RuntimeError as exc:
        raise ConfigError(f"{uri}: the EMA generator's weights do not fit a GCGAN generator of this medbalance "
                          f"({str(exc)[:300]})") from exc
    return generator.to(device), state


def amounts(manifest, chosen: list[str], per_class: int | None, balance: bool) -> dict[str, int]:
    """Synthetic images to add per class."""
    if balance:
        counts = dict(zip(manifest.class_names, manifest.class_counts("train")))
        target = max(counts.values())
        return {c: max(0, target - counts[c]) for c in chosen}
    if per_class is None or per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {per_class}")
    return {c: per_class for c in chosen}


def synthesize(checkpoint: str, output: str, *, per_class: int | None = None, balance: bool = False,
               data: str | None = None, classes: str | None = None, bn_mode: str | None = None, seed: int = 0,
               use_gpu: bool = False, overwrite: bool = False, batch_size: int = 16):
    """Write the dataset version; returns its manifest.

    Args:
        checkpoint: a GAN run folder or one class's checkpoint.
        output: URI of the new version (not the dataset it includes).
        per_class / balance: how many images per class (exactly one of them).
        data: the dataset to include by reference (default: the one the GAN trained on).
        classes: comma-separated subset of the trained classes.
        bn_mode: ``train``/``eval`` BatchNorm while sampling (default: the run's setting).
    """
    from gan.sampling import generate
    from shards import check_shards
    from shards.schema import MANIFEST_NAME
    from shards.writer import ShardWriter

    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device here")
    checkpoints = class_checkpoints(checkpoint)
    if classes:
        wanted = [c.strip() for c in classes.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in checkpoints]
        if unknown:
            raise ConfigError(f"--classes {unknown}: no GAN for them in {checkpoint} (it has {sorted(checkpoints)})")
        checkpoints = {c: checkpoints[c] for c in wanted}
    generators = {c: load_ema_generator(uri, device) for c, uri in checkpoints.items()}
    data = data or next(iter(generators.values()))[1]["config"]["data"]
    base_fs, base_root = storage.resolve(data)
    data = data if storage.is_remote(data) else base_root  # local: absolute, so the version works from anywhere
    out_fs, out_root = storage.resolve(output)
    if base_fs.type_name != out_fs.type_name:
        raise ConfigError(f"--output {output} must be on the same storage as the dataset it includes ({data})")
    storage.check_folder(output, "--output")
    base = check_shards(data)
    # The version relies on every dataset `data` includes, transitively: --output may overlap none.
    check_outside(output, location_of(output), [(uri, location_of(uri)) for uri, _ in included_datasets(data, base)],
                  why=", which the new version includes: a dataset version goes to a new location and never changes "
                  "the data it includes")
    base_sha = sha256_hex(storage.read_bytes(base_fs, f"{base_root}/{MANIFEST_NAME}", data))
    for name in generators:
        if name not in base.class_names:
            raise DataError(f"class {name!r} of the GAN is not a class of {data} ({base.class_names})")
    todo = amounts(base, list(generators), per_class, balance)

    writer = ShardWriter(output, base.class_names, overwrite=overwrite)
    started = time.perf_counter()
    try:
        for name, (generator, state) in generators.items():
            count, label = todo[name], base.class_names.index(name)
            mode = bn_mode or state["config"].get("sample_bn_mode", "train")
            gen = torch.Generator().manual_seed(seed * 1_000_003 + label)
            noise = torch.randn(count, generator.nz, generator=gen).to(device)
            images = generate(generator, noise, mode, batch_size=batch_size) if count else []
            for i, chw in enumerate(images):
                png = encode_array_png(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()))
                writer.add({"image": png, "height": chw.shape[1], "width": chw.shape[2], "channels": 3,
                            "label": label, "split": "train", "source": f"gcgan:{checkpoints[name]}#{i}",
                            "synthetic": True, "sha256": sha256_hex(png)})
            say(f"{name}: {count} synthetic images from {checkpoints[name]} (iteration {state['iteration']})")
        provenance = {
            "kind": "gcgan_synthesis", "includes": data, "checkpoints": checkpoints,
            "iterations": {c: int(s["iteration"]) for c, (_, s) in generators.items()},
            "synthetic_per_class": todo, "seed": seed, "bn_mode": bn_mode or "from checkpoint",
            "medbalance_version": medbalance.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        }
        return writer.publish(provenance, include=(data, base, base_sha))
    except BaseException:
        writer.abort()
        raise
