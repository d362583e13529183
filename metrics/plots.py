"""PNG plots for the report: confusion matrix, reliability diagram, per-class recall.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, without
pyplot: no global backend switch, no display needed, safe in Ray workers and threads.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metrics.calibration import N_BINS, reliability_bins

DPI = 120


def plot_confusion_matrix(confusion_matrix: Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | Path, *, title: str | None = None) -> Path:
    """Two panels: counts, and rows normalised to sum 1 (recall on the diagonal). Rows = true class."""
    counts = np.asarray(confusion_matrix, dtype=float)
    num_classes = len(class_names)
    row_sums = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    side = max(4.0, 0.55 * num_classes + 2.5)
    fig = Figure(figsize=(2 * side + 1, side))
    FigureCanvasAgg(fig)
    for ax, values, label, fmt in ((fig.add_subplot(1, 2, 1), counts, "counts", "{:.0f}"),
                                   (fig.add_subplot(1, 2, 2), normalised, "row-normalised (recall)", "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-12))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(num_classes), labels=class_names, rotation=45, ha="right")
        ax.set_yticks(range(num_classes), labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label)
        if num_classes <= 20:
            threshold = values.max() / 2
            for i in range(num_classes):
                for j in range(num_classes):
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if values[i, j] > threshold else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability_diagram(probs: object, targets: object, path: str | Path, *, n_bins: int = N_BINS,
                             title: str | None = None) -> Path:
    """Accuracy per confidence bin (bars) against the diagonal, the gap to the bin's mean confidence
    shaded, ECE/MCE in the title; below, the number of samples per bin."""
    bins = reliability_bins(probs, targets, n_bins)
    width = 1.0 / n_bins
    centers = bins.edges[:-1] + width / 2
    filled = bins.count > 0
    fig = Figure(figsize=(5.5, 6.5))
    FigureCanvasAgg(fig)
    top = fig.add_axes((0.14, 0.36, 0.8, 0.56))
    bottom = fig.add_axes((0.14, 0.08, 0.8, 0.18), sharex=top)
    top.bar(centers[filled], bins.accuracy[filled], width=width, edgecolor="black", color="tab:blue",
            label="accuracy")
    gap_low = np.minimum(bins.accuracy, bins.confidence)[filled]
    top.bar(centers[filled], np.abs(bins.accuracy - bins.confidence)[filled], bottom=gap_low, width=width,
            edgecolor="tab:red", color="tab:red", alpha=0.3, hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    heading = f"ECE = {bins.ece:.4f}, MCE = {bins.mce:.4f} ({n_bins} bins)"
    top.set_title(f"{title}\n{heading}" if title else f"Reliability diagram\n{heading}")
    bottom.bar(centers, bins.count, width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("samples")
    return _save(fig, path)


def plot_per_class_recall(per_class: dict[str, dict], path: str | Path, *, title: str | None = None) -> Path:
    """Bars of recall per class (support in the label); classes absent from the targets marked n/a."""
    names = list(per_class)
    recalls = [per_class[n]["recall"] for n in names]
    fig = Figure(figsize=(max(4.5, 0.6 * len(names) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    ax.bar(positions, [r if r is not None else 0.0 for r in recalls], color="tab:green", edgecolor="black")
    for x, recall in zip(positions, recalls):
        ax.text(x, (recall or 0.0) + 0.02, "n/a" if recall is None else f"{recall:.2f}", ha="center", fontsize=8)
    labels = [f"{n}\n(n={per_class[n]['support']})" for n in names]
    ax.set_xticks(positions, labels=labels, rotation=45 if len(names) > 6 else 0,
                  ha="right" if len(names) > 6 else "center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("recall")
    ax.set_title(title or "Per-class recall")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
