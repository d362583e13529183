"""The papers' classification metrics (DESIGN 4.6) in one JSON-ready dict: ``compute_metrics``.

Give it the predictions of the WHOLE evaluation set: under DDP, gather probs and targets from
every worker first (e.g. ``torch.distributed.all_gather`` or Ray Data on the driver). Macro
averages, AUC, ECE and MCC do not decompose over shards, so per-worker values averaged are wrong.

Definitions (y true class, yhat = argmax p, ties to the lowest class id; n_c = support of class c):
- accuracy = mean(yhat == y)
- per class: precision tp/(tp+fp), recall tp/(tp+fn), f1 2PR/(P+R), support tp+fn, auc (one-vs-rest)
- macro_f1: mean F1 over the classes that occur in the targets OR the predictions (torchmetrics
  ``multiclass_f1_score(average="macro")``, same as scikit-learn's default label set). A class
  absent from both has no F1 (null) and is left out; a class predicted but absent from the targets
  has F1 = 0 and counts.
- balanced_accuracy (B-ACC) = mean recall over the classes present in the targets (as
  scikit-learn's ``balanced_accuracy_score``). Not torchmetrics' macro recall, which also averages
  in a recall of 0 for a class that is predicted but absent from the targets.
- g_mean = (prod of those recalls)^(1/k), k = number of classes present in the targets.
- auc_macro: mean one-vs-rest ROC AUC over the classes present in the targets; a class absent
  from the targets has no AUC (no positives) and is listed in ``auc_excluded_classes``.
  torchmetrics' ``multiclass_auroc(average="macro")`` would average in 0 for it. null when fewer
  than 2 classes are present.
- mcc (multiclass Matthews, Gorodkin 2004) and kappa (Cohen's, unweighted) from torchmetrics;
  torchmetrics returns mcc = 1 when predictions and targets are one and the same single class,
  and kappa NaN when chance agreement is 1 (reported as null).
- ece, mce: 15 equal-width confidence bins (``metrics.calibration``; not torchmetrics', see there).
- brier = (1/N) sum_i sum_c (p_ic - y_ic)^2 (summed over classes).
- confusion_matrix: list of lists, rows = true class, columns = predicted class.
Undefined values are null (None), never NaN, so ``json.dumps`` writes valid JSON.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (binary_auroc, multiclass_cohen_kappa,
                                                    multiclass_confusion_matrix, multiclass_f1_score,
                                                    multiclass_matthews_corrcoef)

from metrics.calibration import brier_score, reliability_bins
from metrics.inputs import as_class_names, as_probs, as_targets

MAIN_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "g_mean", "auc_macro", "mcc", "kappa", "ece",
                "mce", "brier")
LOWER_IS_BETTER = frozenset({"ece", "mce", "brier"})


def compute_metrics(probs: object, targets: object, class_names: Sequence[str] | None = None) -> dict:
    """All metrics of DESIGN 4.6 for probabilities gathered over all workers.

    Args:
        probs: (N, C) softmax probabilities (numpy array, list or tensor on any device).
        targets: (N,) integer class ids in [0, C).
        class_names: C names for ``per_class`` and the excluded-class list; default "0", "1", ...

    Returns:
        A JSON-serialisable dict: accuracy, macro_f1, balanced_accuracy, g_mean, auc_macro,
        auc_excluded_classes, mcc, kappa, ece, mce, brier (floats or None), per_class
        ({name: {precision, recall, f1, support, auc}}), confusion_matrix (list of lists),
        num_samples, class_names.
    """
    probs = as_probs(probs)
    num_samples, num_classes = probs.shape
    targets = as_targets(targets, num_samples, num_classes)
    names = as_class_names(class_names, num_classes)
    preds = probs.argmax(dim=1)

    confusion = multiclass_confusion_matrix(preds, targets, num_classes).long()  # (C, C), rows = true
    tp = confusion.diag()
    support = confusion.sum(dim=1)  # tp + fn
    predicted = confusion.sum(dim=0)  # tp + fp
    present = support > 0

    per_class = {}
    recalls = []
    for c, name in enumerate(names):
        seen = bool(support[c] > 0 or predicted[c] > 0)  # in the targets or the predictions
        precision = _ratio(tp[c], predicted[c]) if predicted[c] > 0 else (0.0 if seen else None)
        recall = _ratio(tp[c], support[c]) if support[c] > 0 else None
        if not seen:
            f1 = None
        elif tp[c] == 0:
            f1 = 0.0
        else:
            f1 = 2 * precision * recall / (precision + recall)
        auc = _float(binary_auroc(probs[:, c], (targets == c).long())) if present[c] and present.sum() > 1 \
            else None
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[c]),
                           "auc": auc}
        if recall is not None:
            recalls.append(recall)

    aucs = [v["auc"] for v in per_class.values() if v["auc"] is not None]
    return {
        "accuracy": _ratio(tp.sum(), num_samples),
        "macro_f1": _float(multiclass_f1_score(preds, targets, num_classes, average="macro")),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "g_mean": _geometric_mean(recalls),
        "auc_macro": sum(aucs) / len(aucs) if aucs else None,
        "auc_excluded_classes": [names[c] for c in range(num_classes) if not present[c]],
        "mcc": _float(multiclass_matthews_corrcoef(preds, targets, num_classes)),
        "kappa": _float(multiclass_cohen_kappa(preds, targets, num_classes)),
        **_calibration(probs, targets),
        "brier": brier_score(probs, targets),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "num_samples": int(num_samples),
        "class_names": names,
    }


def _calibration(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    bins = reliability_bins(probs, targets)
    return {"ece": bins.ece, "mce": bins.mce}


def _ratio(numerator: object, denominator: object) -> float:
    return float(numerator) / float(denominator)


def _float(value: torch.Tensor) -> float | None:
    """A Python float, or None for NaN/inf (undefined)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _geometric_mean(values: list[float]) -> float:
    if min(values) == 0.0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))
