"""Calibration: reliability bins, ECE / MCE, and temperature scaling.

ECE and MCE (DESIGN 4.6; Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
eq. 3 and 5): the max softmax probability (confidence) of each of the N samples falls into one of
15 equal-width bins B_b = (b/15, (b+1)/15] (the first also holds 0);

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|,    MCE = max over non-empty b of |acc(B_b) - conf(B_b)|

Why not torchmetrics' ``MulticlassCalibrationError``: it bins with ``bucketize(right=True)`` over
16 edges, so a confidence of exactly 1.0 (common for a saturated float32 softmax) lands in a 16th
bin of its own instead of the last of the 15 bins, and it casts confidences to float32. Both give
the same numbers whenever no confidence equals 1.0 or a bin edge (tests/test_metrics.py checks).

Temperature scaling (Guo et al. 2017, Sec. 4.2): one scalar T > 0 fitted on validation logits by
minimising the NLL of softmax(logits / T); T > 1 softens over-confident predictions. Argmax (and so
accuracy, F1, the confusion matrix) does not change.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medbalance.errors import DataError
from metrics.inputs import as_probs, as_scores, as_targets

N_BINS = 15
TEMPERATURE_BOUNDS = (1e-2, 1e2)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of the top-1 confidence: all arrays have n_bins entries (edges n_bins + 1)."""

    edges: np.ndarray
    count: np.ndarray  # samples per bin
    accuracy: np.ndarray  # fraction correct per bin (0 where empty)
    confidence: np.ndarray  # mean confidence per bin (0 where empty)

    @property
    def gaps(self) -> np.ndarray:
        """|acc - conf| per bin (0 where empty)."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        return float(np.sum(self.count / self.count.sum() * self.gaps))

    @property
    def mce(self) -> float:
        return float(self.gaps[self.count > 0].max())


def reliability_bins(probs: object, targets: object, n_bins: int = N_BINS) -> ReliabilityBins:
    """Bin the top-1 confidences of probs (N, C) into n_bins equal-width bins (lo, hi]."""
    probs = as_probs(probs)
    targets = as_targets(targets, *probs.shape)
    confidence, predicted = probs.max(dim=1)  # ties: the lowest class id, as argmax
    correct = (predicted == targets).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # right=False: edges[b-1] < x <= edges[b], i.e. bins (lo, hi]; 0 goes to bin 0, 1.0 to the last
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=n_bins).double()
    safe = count.clamp_min(1.0)
    accuracy = torch.zeros(n_bins, dtype=torch.float64).index_add(0, index, correct) / safe
    mean_conf = torch.zeros(n_bins, dtype=torch.float64).index_add(0, index, confidence) / safe
    return ReliabilityBins(edges.numpy(), count.numpy(), accuracy.numpy(), mean_conf.numpy())


def brier_score(probs: object, targets: object) -> float:
    """(1/N) sum_i sum_c (p_ic - y_ic)^2: summed over classes, not divided by C (DESIGN 4.6)."""
    probs = as_probs(probs)
    targets = as_targets(targets, *probs.shape)
    onehot = F.one_hot(targets, probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def fit_temperature(logits: object, targets: object, *, max_iter: int = 100) -> float:
    """Fit the temperature T > 0 minimising NLL(softmax(logits / T), targets) (Guo et al. 2017).

    Optimises log T (so T stays positive) with L-BFGS (strong Wolfe line search) in float64,
    starting at T = 1. Fit on *validation* logits, never on the test set.

    Args:
        logits: (N, C) pre-softmax scores.
        targets: (N,) class ids.
        max_iter: L-BFGS iterations.

    Returns:
        T as a Python float. When the NLL keeps falling towards a bound (e.g. T -> infinity when
        every sample is misclassified), T is clipped to [0.01, 100] with a warning.

    Raises:
        DataError: every sample is classified correctly (the NLL falls as T -> 0: no minimum).
    """
    logits = as_scores(logits, "logits")
    targets = as_targets(targets, *logits.shape)
    if bool((logits.argmax(dim=1) == targets).all()):
        raise DataError(f"fit_temperature: all {len(targets)} validation samples are classified correctly, so "
                        "the NLL keeps falling as T -> 0 and has no minimum to fit. Use a larger validation "
                        "split, or skip temperature scaling (T = 1).")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        optimizer.zero_grad()
        nll = F.cross_entropy(logits / log_t.exp(), targets)
        nll.backward()
        return nll

    optimizer.step(closure)
    temperature = math.exp(log_t.item()) if math.isfinite(log_t.item()) else TEMPERATURE_BOUNDS[0]
    low, high = TEMPERATURE_BOUNDS
    if not low <= temperature <= high:
        warnings.warn(f"fitted temperature {temperature:.3g} clipped to [{low}, {high}]: the validation NLL "
                      "has no minimum inside (e.g. most validation samples misclassified); check the "
                      "model and use a larger validation split for calibration.", stacklevel=2)
        temperature = min(max(temperature, low), high)
    return temperature


def apply_temperature(logits: object, temperature: float) -> Tensor:
    """softmax(logits / T): (N, C) logits -> (N, C) float64 probabilities."""
    return torch.softmax(as_scores(logits, "logits") / float(temperature), dim=1)


def calibration_summary(logits: object, targets: object, temperature: float) -> dict[str, float]:
    """ECE, MCE, Brier and NLL before (T = 1) and after temperature scaling, for ``write_report``.

    Returns:
        {"temperature", "ece_before", "ece_after", "mce_before", "mce_after", "brier_before",
        "brier_after", "nll_before", "nll_after"} as Python floats.
    """
    logits = as_scores(logits, "logits")
    targets = as_targets(targets, *logits.shape)
    summary: dict[str, float] = {"temperature": float(temperature)}
    for when, t in (("before", 1.0), ("after", float(temperature))):
        probs = apply_temperature(logits, t)
        bins = reliability_bins(probs, targets)
        summary[f"ece_{when}"] = bins.ece
        summary[f"mce_{when}"] = bins.mce
        summary[f"brier_{when}"] = brier_score(probs, targets)
        summary[f"nll_{when}"] = float(F.cross_entropy(logits / t, targets))
    return summary
