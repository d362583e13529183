"""Image quality of a dataset version's synthetic images (``python -m ray_jobs.gan quality``).

    report = quality("runs/data/bccd-gan30", "runs/gan-bccd/quality", classifier="runs/r18")

Per class that has synthetic train rows (or ``classes``): FID and KID between its real train
images (the GAN's training set) and its synthetic ones, in the feature space of a user-given
extractor file or of a medbalance classifier checkpoint (``gan/features.py``; the report names
it), and the nearest-real-neighbour check in that feature space and in pixel space
(``gan/quality.py``), with a PNG of the closest synthetic/real pairs. Writes ``quality.json``,
``quality.md`` and ``pairs_<class>.png`` to ``out`` (local or ``s3://``). Runs in this process:
the images of a minority class fit in memory.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from medbalance.errors import ConfigError, DataError
from ray_jobs.runtime.progress import say
from shards import storage

DEFAULT_EXTRACTOR_SIZE = 224


def classifier_extractor(checkpoint: str):
    """``(extractor, image size)``: a medbalance classifier's features (its training size)."""
    from gan.features import ClassifierFeatures
    from ray_jobs.classifier.pipeline import IMAGENET_MEAN, IMAGENET_STD
    from ray_jobs.runtime.checkpoint import load_checkpoint, model_from_checkpoint
    from ray_jobs.runtime.checkpoint import resolve_checkpoint

    uri = resolve_checkpoint(checkpoint)
    state = load_checkpoint(uri)
    description = {"kind": "classifier", "checkpoint": uri, "model": state["config"]["model"]}
    extractor = ClassifierFeatures(model_from_checkpoint(state), description, IMAGENET_MEAN, IMAGENET_STD)
    return extractor, int(state["config"]["data"]["image_size"])


def load_class_rows(data: str, class_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Class -> ``{"real": ..., "synthetic": ..., "held_out": ...}``, uint8 N x 3 x S x S: the train
    split's real and synthetic rows and the real val + test rows, each image decoded and resized
    to the side of the class's synthetic images (square, as the GAN saw them)."""
    from shards import ShardDataset
    from torchvision.transforms import v2

    train = ShardDataset(data, "train")
    out: dict[str, dict[str, list]] = {c: {"real": [], "synthetic": [], "held_out": []} for c in class_names}
    index = {c: train.class_names.index(c) for c in class_names}
    sides = {}
    for c in class_names:
        rows = np.flatnonzero((train.labels == index[c]) & train.synthetic)
        if len(rows) == 0:
            raise DataError(f"{data} has no synthetic train images of class {c!r}; make a version with "
                            "`python -m ray_jobs.gan synthesize` first")
        sides[c] = int(train[int(rows[0])][0].shape[-1])  # the GAN's output side
    held_out = [ShardDataset(data, split) for split in ("val", "test") if split in train.manifest.splits()]
    for dataset in [train, *held_out]:
        for i in range(len(dataset)):
            name = dataset.class_names[dataset.labels[i]]
            if name in out:
                image = dataset[i][0]
                if image.shape[-1] != sides[name] or image.shape[-2] != sides[name]:
                    image = v2.functional.resize(image, [sides[name], sides[name]], antialias=True)
                kind = "held_out" if dataset is not train else "synthetic" if train.synthetic[i] else "real"
                out[name][kind].append(image)
    return {c: {k: torch.stack(v) if v else torch.zeros(0, 3, sides[c], sides[c], dtype=torch.uint8)
                for k, v in parts.items()} for c, parts in out.items()}


def class_quality(extractor, real: torch.Tensor, synthetic: torch.Tensor, held_out: torch.Tensor, image_size: int,
                  pixel_size: int, pairs: int, ratio: float) -> tuple[dict, bytes]:
    """One class's FID/KID, neighbour checks (feature and pixel space) and closest-pairs PNG.

    ``held_out`` (the class's real val + test images) gives the reference: FID/KID of real train
    vs real held-out images, the value a perfect generator would reach at these counts."""
    from gan.features import extract
    from gan.quality import closest_pairs_png, fid_kid, neighbour_check, pixels

    real_f, syn_f = extract(extractor, real, image_size), extract(extractor, synthetic, image_size)
    scores = fid_kid(real_f, syn_f)
    reference = fid_kid(real_f, extract(extractor, held_out, image_size)) if len(held_out) else {}
    scores.update(n_held_out=len(held_out), reference_fid=reference.get("fid"),
                  reference_kid_mean=reference.get("kid_mean"))
    feature = neighbour_check(real_f, syn_f, ratio)
    pixel = neighbour_check(pixels(real, pixel_size), pixels(synthetic, pixel_size), ratio, exact=1 / 255)
    png = closest_pairs_png(synthetic, real, pixel, feature, count=pairs)
    trim = lambda check: {k: v for k, v in check.items() if k not in ("distance", "nearest")}  # noqa: E731
    return {**scores, "feature_neighbours": trim(feature), "pixel_neighbours": trim(pixel)}, png


def quality(data: str, out: str, *, extractor: str | None = None, classifier: str | None = None,
            classes: str | None = None, image_size: int | None = None, pixel_size: int = 64, pairs: int = 8,
            ratio: float = 0.25) -> dict:
    """Measure every chosen class; write quality.json/.md and the pair PNGs; return the report."""
    from gan.features import FileExtractor
    from shards import check_shards

    if bool(extractor) == bool(classifier):
        raise ConfigError("pass exactly one feature source: --extractor FILE or --classifier CHECKPOINT")
    storage.check_folder(out, "--out")
    manifest = check_shards(data, splits=["train"])
    if classifier:
        module, trained_size = classifier_extractor(classifier)
        image_size = image_size or trained_size
    else:
        module, image_size = FileExtractor(extractor), image_size or DEFAULT_EXTRACTOR_SIZE
    synthetic = dict(zip(manifest.class_names, manifest.synthetic_class_counts("train")))
    chosen = ([c.strip() for c in classes.split(",") if c.strip()] if classes
              else [c for c, n in synthetic.items() if n > 0])
    unknown = [c for c in chosen if c not in manifest.class_names]
    if unknown or not chosen:
        raise ConfigError(f"--classes {unknown or '(none)'}: choose among the classes with synthetic images "
                          f"{[c for c, n in synthetic.items() if n]}")
    rows = load_class_rows(data, chosen)
    report = {"data": data, "extractor": {**module.description, "image_size": image_size},
              "pixel_size": pixel_size, "ratio": ratio, "classes": {},
              "checkpoints": manifest.provenance.get("checkpoints", {})}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            with torch.no_grad():
                result, png = class_quality(module, rows[name]["real"], rows[name]["synthetic"], rows[name]["held_out"],
                                            image_size, pixel_size, pairs, ratio)
            pairs_file = f"pairs_{_slug(name)}.png"
            Path(tmp, pairs_file).write_bytes(png)
            report["classes"][name] = {**result, "pairs_png": pairs_file}
            say(f"{name}: FID {_fmt(result['fid'])}, KID {_fmt(result['kid_mean'])}, "
                f"{result['pixel_neighbours']['flagged']}/{result['n_synthetic']} flagged as near-copies (pixels)")
        Path(tmp, "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(tmp, "quality.md").write_text(format_report(report))
        storage.copy_dir(tmp, out)
    return report


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def format_report(report: dict) -> str:
    """A Markdown table: one row per class."""
    ex = report["extractor"]
    source = ex.get("checkpoint") or ex.get("path")
    lines = [f"Features: {ex['kind']} {source} at {ex['image_size']} px; pixel space at {report['pixel_size']} px; "
             f"flagged = closer to a real image than {report['ratio']} x the real-vs-real median.", "",
             "| class | real | synthetic | FID | KID (mean +- std) | reference FID / KID | feature NN ratio "
             "| flagged (feature) | pixel NN ratio | flagged (pixel) |", "| --- |" + " --- |" * 9]
    for name, r in report["classes"].items():
        fn, pn = r["feature_neighbours"], r["pixel_neighbours"]
        kid = "n/a" if r["kid_mean"] is None else f"{r['kid_mean']:.4g} +- {r['kid_std']:.2g}"
        reference = f"{_fmt(r['reference_fid'])} / {_fmt(r['reference_kid_mean'])}"
        lines.append(f"| {name} | {r['n_real']} | {r['n_synthetic']} | {_fmt(r['fid'])} | {kid} | {reference} | "
                     f"{_fmt(fn['median_ratio'])} | {fn['flagged']} | {_fmt(pn['median_ratio'])} | {pn['flagged']} |")
    lines += ["", "Reference: real train vs the class's real val + test images (n_held_out), the same features: "
              "what a perfect generator would score at these image counts.",
              "NN ratio: median distance of a synthetic image to its nearest real training image, over the "
              "median distance of a real image to its nearest other one (~1: new images; ~0: copies)."]
    return "\n".join(lines) + "\n"
