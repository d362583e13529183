"""Metrics against hand-computed examples; calibration; plots and the report writer."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.classification import (multiclass_auroc, multiclass_calibration_error,
                                                    multiclass_recall)

from metrics import compute_metrics
from metrics.calibration import (apply_temperature, brier_score, calibration_summary, fit_temperature,
                                 reliability_bins)
from metrics.report import compare_runs, format_table, write_report
from medbalance.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- the worked example
# 8 samples, classes A, B, C. Predictions (argmax) and confidences:
#   i  y  probs               pred  conf  correct  bin (b/15, (b+1)/15]
#   0  A  .78 .15 .07          A    .78    yes     11  (.733, .800]
#   1  A  .55 .35 .10          A    .55    yes      8  (.533, .600]
#   2  A  .30 .62 .08          B    .62    no       9  (.600, .667]
#   3  A  .90 .06 .04          A    .90    yes     13  (.867, .933]
#   4  B  .20 .70 .10          B    .70    yes     10  (.667, .733]
#   5  B  .45 .40 .15          A    .45    no       6  (.400, .467]
#   6  C  .10 .25 .65          C    .65    yes      9
#   7  C  .15 .48 .37          B    .48    no       7  (.467, .533]
PROBS = np.array([[.78, .15, .07], [.55, .35, .10], [.30, .62, .08], [.90, .06, .04],
                  [.20, .70, .10], [.45, .40, .15], [.10, .25, .65], [.15, .48, .37]])
TARGETS = np.array([0, 0, 0, 0, 1, 1, 2, 2])
NAMES = ["A", "B", "C"]
# confusion matrix, rows = true:      A  B  C
CONFUSION = [[3, 1, 0],  # A: 0,1,3 right; 2 -> B
             [1, 1, 0],  # B: 4 right; 5 -> A
             [0, 1, 1]]  # C: 6 right; 7 -> B
# A: tp 3 fp 1 fn 1 -> P 3/4 R 3/4 F1 3/4;  B: tp 1 fp 2 fn 1 -> P 1/3 R 1/2 F1 2/5;
# C: tp 1 fp 0 fn 1 -> P 1 R 1/2 F1 2/3
HAND = {
    "accuracy": 5 / 8,
    "macro_f1": (3 / 4 + 2 / 5 + 2 / 3) / 3,
    "balanced_accuracy": (3 / 4 + 1 / 2 + 1 / 2) / 3,
    "g_mean": (3 / 4 * 1 / 2 * 1 / 2) ** (1 / 3),
    # Cohen: p_o = 5/8, p_e = (4*4 + 2*3 + 2*1) / 64 = 24/64
    "kappa": (5 / 8 - 24 / 64) / (1 - 24 / 64),
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c=5, s=8, p=(4,3,1), t=(4,2,2)
    "mcc": (5 * 8 - (16 + 6 + 2)) / math.sqrt((64 - (16 + 9 + 1)) * (64 - (16 + 4 + 4))),
    # bins: 6 {.45 x}, 7 {.48 x}, 8 {.55 v}, 9 {.62 x, .65 v}, 10 {.70 v}, 11 {.78 v}, 13 {.90 v}
    "ece": (0.45 + 0.48 + 0.45 + 2 * abs(0.5 - 0.635) + 0.30 + 0.22 + 0.10) / 8,
    "mce": 0.48,
    # per sample sum_c (p - onehot)^2
    "brier": (0.0758 + 0.335 + 0.8808 + 0.0152 + 0.14 + 0.585 + 0.195 + 0.6498) / 8,
    # Mann-Whitney: A 15/16 pairs, B 10/12, C 12/12
    "auc_macro": (15 / 16 + 10 / 12 + 1.0) / 3,
}


def test_worked_example():
    m = compute_metrics(PROBS, TARGETS, NAMES)
    for key, value in HAND.items():
        assert m[key] == pytest.approx(value, abs=2e-6), key
    assert m["confusion_matrix"] == CONFUSION
    assert m["auc_excluded_classes"] == []
    per_class = {
        "A": dict(precision=3 / 4, recall=3 / 4, f1=3 / 4, support=4, auc=15 / 16),
        "B": dict(precision=1 / 3, recall=1 / 2, f1=2 / 5, support=2, auc=10 / 12),
        "C": dict(precision=1.0, recall=1 / 2, f1=2 / 3, support=2, auc=1.0)}
    for name, expected in per_class.items():
        for key, value in expected.items():
            assert m["per_class"][name][key] == pytest.approx(value, abs=2e-6), (name, key)
    assert m["num_samples"] == 8 and m["class_names"] == NAMES


def test_accepts_tensors_and_default_names():
    m = compute_metrics(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(TARGETS))
    assert list(m["per_class"]) == ["0", "1", "2"]
    assert m["accuracy"] == pytest.approx(5 / 8)


def _walk(value):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_output_is_plain_json():
    m = compute_metrics(PROBS, TARGETS, NAMES)
    json.dumps(m, allow_nan=False)
    assert all(v is None or type(v) in (float, int, str, bool) for v in _walk(m))


# ----------------------------------------------------------------------------- absent classes
# 6 samples; class C absent from the targets but predicted once (sample 2)
ABSENT_PROBS = np.array([[.7, .2, .1], [.6, .3, .1], [.2, .1, .7], [.3, .6, .1], [.6, .3, .1], [.1, .8, .1]])
ABSENT_TARGETS = np.array([0, 0, 0, 1, 1, 1])


@pytest.mark.filterwarnings("ignore:No positive samples:UserWarning")  # torchmetrics, for comparison
def test_class_absent_from_targets():
    m = compute_metrics(ABSENT_PROBS, ABSENT_TARGETS, NAMES)
    assert m["confusion_matrix"] == [[2, 0, 1], [1, 2, 0], [0, 0, 0]]
    # AUC over A and B only (Mann-Whitney with ties as 1/2: A 6.5/9, B 8.5/9); C excluded and named
    assert m["auc_macro"] == pytest.approx((6.5 / 9 + 8.5 / 9) / 2, abs=2e-6)
    assert m["auc_excluded_classes"] == ["C"]
    assert m["per_class"]["C"]["auc"] is None
    # torchmetrics' macro AUROC would average in a 0 for C
    tm_auc = multiclass_auroc(torch.tensor(ABSENT_PROBS), torch.tensor(ABSENT_TARGETS), 3, average="macro")
    assert float(tm_auc) < m["auc_macro"] - 0.1
    # B-ACC and G-mean: classes present in the targets (recall of C is undefined -> None)
    assert m["per_class"]["C"]["recall"] is None and m["per_class"]["C"]["support"] == 0
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["g_mean"] == pytest.approx(2 / 3)
    tm_recall = multiclass_recall(torch.tensor(ABSENT_PROBS), torch.tensor(ABSENT_TARGETS), 3, average="macro")
    assert float(tm_recall) == pytest.approx(4 / 9, abs=1e-6)  # what we do not report as B-ACC
    # macro-F1: C was predicted (a false positive), so it counts with F1 = 0: (2/3 + 4/5 + 0) / 3
    assert m["per_class"]["C"]["f1"] == 0.0 and m["per_class"]["C"]["precision"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3, abs=2e-6)


def test_class_absent_from_targets_and_predictions():
    probs = np.hstack([ABSENT_PROBS * 0.99, np.full((6, 1), 0.01)])  # class D: never true, never predicted
    m = compute_metrics(probs, ABSENT_TARGETS, ["A", "B", "C", "D"])
    d = m["per_class"]["D"]
    assert d == {"precision": None, "recall": None, "f1": None, "support": 0, "auc": None}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3, abs=2e-6)  # D left out
    assert m["auc_excluded_classes"] == ["C", "D"]


def test_one_class_present_gives_null_auc():
    probs = np.array([[.8, .2], [.6, .4], [.3, .7]])
    m = compute_metrics(probs, np.array([0, 0, 0]))
    assert m["auc_macro"] is None and m["auc_excluded_classes"] == ["1"]
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)


def test_degenerate_kappa_is_null_not_nan():
    m = compute_metrics(np.array([[.9, .1], [.8, .2]]), np.array([0, 0]))
    assert m["kappa"] is None  # chance agreement 1: undefined
    assert m["mcc"] == 1.0  # torchmetrics' convention for a perfect single-class prediction
    json.dumps(m, allow_nan=False)


def test_g_mean_is_zero_when_a_class_is_never_recalled():
    probs = np.array([[.9, .1], [.8, .2], [.7, .3]])
    m = compute_metrics(probs, np.array([0, 0, 1]))
    assert m["g_mean"] == 0.0 and m["balanced_accuracy"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- ECE vs torchmetrics
def test_ece_mce_match_torchmetrics_away_from_confidence_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 2
    probs = torch.softmax(torch.tensor(logits), dim=1)
    targets = torch.tensor(rng.integers(0, 4, 500))
    assert probs.max() < 1.0
    bins = reliability_bins(probs, targets)
    for norm, ours in (("l1", bins.ece), ("max", bins.mce)):
        theirs = multiclass_calibration_error(probs.float(), targets, 4, n_bins=15, norm=norm)
        assert ours == pytest.approx(float(theirs), abs=1e-5), norm


def test_ece_keeps_confidence_one_in_the_last_of_15_bins():
    # wrong at confidence 1.0, right at .95: one bin (14/15, 1], acc .5 vs conf .975 -> ECE .475.
    probs = np.array([[0.0, 1.0], [0.95, 0.05]])
    targets = np.array([0, 0])
    bins = reliability_bins(probs, targets)
    assert bins.count[-1] == 2 and bins.count.sum() == 2
    assert bins.ece == pytest.approx(0.475) and compute_metrics(probs, targets)["ece"] == pytest.approx(0.475)
    # torchmetrics puts 1.0 in a 16th bin of its own: .5 * 1 + .5 * .05 = .525
    theirs = multiclass_calibration_error(torch.tensor(probs, dtype=torch.float32), torch.tensor(targets), 2,
                                          n_bins=15, norm="l1")
    assert float(theirs) == pytest.approx(0.525, abs=1e-6)


def test_brier_is_summed_over_classes():
    probs = np.array([[.5, .5, 0.0], [.2, .2, .6]])
    # (.25 + .25 + 0) and (.04 + .04 + .16), mean -> .37
    assert brier_score(probs, np.array([0, 2])) == pytest.approx((0.5 + 0.24) / 2)


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError, match="softmax"):
        compute_metrics(np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1]))  # logits
    with pytest.raises(DataError, match="sum to 1"):
        compute_metrics(np.array([[0.5, 0.1], [0.5, 0.5]]), np.array([0, 1]))
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        compute_metrics(PROBS, np.array([0, 0, 0, 0, 1, 1, 2, 3]))
    with pytest.raises(DataError, match="integer"):
        compute_metrics(PROBS, TARGETS.astype(float))
    with pytest.raises(DataError, match="8 rows"):
        compute_metrics(PROBS, TARGETS[:5])
    with pytest.raises(DataError, match="class_names"):
        compute_metrics(PROBS, TARGETS, ["A", "B"])
    with pytest.raises(DataError, match="NaN"):
        compute_metrics(np.array([[np.nan, 1.0], [0.5, 0.5]]), np.array([0, 1]))


# ----------------------------------------------------------------------------- temperature scaling
def _sampled(num_samples=3000, num_classes=4, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=gen, dtype=torch.float64) * 2
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    return logits, targets


def test_temperature_is_one_on_calibrated_logits():
    logits, targets = _sampled()
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.08)


def test_temperature_softens_overconfident_logits():
    logits, targets = _sampled(seed=1)
    overconfident = logits * 5
    temperature = fit_temperature(overconfident, targets)
    assert temperature > 1 and temperature == pytest.approx(5.0, rel=0.1)
    summary = calibration_summary(overconfident, targets, temperature)
    assert summary["nll_after"] < summary["nll_before"]
    assert summary["ece_after"] < summary["ece_before"] / 2
    assert summary["brier_after"] < summary["brier_before"]
    assert summary["nll_before"] == pytest.approx(float(F.cross_entropy(overconfident, targets)))
    probs = apply_temperature(overconfident, temperature)
    torch.testing.assert_close(probs, torch.softmax(overconfident / temperature, 1))
    assert (probs.argmax(1) == overconfident.argmax(1)).all()


def test_temperature_without_a_minimum():
    # every sample right: NLL falls as T -> 0, no minimum
    with pytest.raises(DataError, match="classified correctly"):
        fit_temperature(torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, -1.0]]), torch.tensor([0, 1, 0]))
    # every sample wrong: NLL falls towards log C as T -> infinity; clipped at 100 with a warning
    with pytest.warns(UserWarning, match="clipped"):
        assert fit_temperature(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 0])) == 100.0


# ----------------------------------------------------------------------------- report
REPORT_KEYS = {"accuracy", "macro_f1", "balanced_accuracy", "ece", "mce", "brier", "auc_macro", "g_mean", "mcc",
               "kappa", "per_class", "confusion_matrix", "auc_excluded_classes", "calibration", "extra", "title",
               "files"}


def test_write_report(tmp_path):
    logits = torch.log(torch.tensor(PROBS))
    calibration = calibration_summary(logits, torch.tensor(TARGETS), fit_temperature(logits, TARGETS))
    out = tmp_path / "eval"
    report = write_report(out, PROBS, TARGETS, NAMES, title="worked example", extra={"run": "r1", "epochs": 3},
                          calibration=calibration)
    for name in ("report.json", "report.md", "confusion_matrix.png", "reliability_diagram.png",
                 "per_class_recall.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk)
    assert on_disk == report
    assert on_disk["calibration"]["temperature"] == pytest.approx(calibration["temperature"])
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(on_disk["calibration"])
    assert on_disk["macro_f1"] == pytest.approx(HAND["macro_f1"], abs=2e-6)
    for name in report["files"].values():
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# worked example")
    for needle in ("| Macro-F1 | 0.6056 |", "| B | 0.3333 | 0.5000 | 0.4000 |", "](reliability_diagram.png)",
                   "](confusion_matrix.png)", "](per_class_recall.png)", "Temperature T ="):
        assert needle in markdown, needle


def test_write_report_minimal_and_errors(tmp_path):
    report = write_report(tmp_path, ABSENT_PROBS, ABSENT_TARGETS, None)
    assert "calibration" not in report and "extra" not in report
    assert "AUC leaves out class(es) absent from the targets: 2" in (tmp_path / "report.md").read_text()
    with pytest.raises(ConfigError, match="local directory"):
        write_report("s3://bucket/eval", PROBS, TARGETS, NAMES)
    with pytest.raises(ConfigError, match="JSON"):
        write_report(tmp_path, PROBS, TARGETS, NAMES, extra={"model": object()})
    with pytest.raises(ConfigError, match="calibration_summary"):
        write_report(tmp_path, PROBS, TARGETS, NAMES, calibration={"temperature": 1.5})


def test_format_table_and_compare_runs():
    a = compute_metrics(PROBS, TARGETS, NAMES)
    b = compute_metrics(ABSENT_PROBS, ABSENT_TARGETS, NAMES)
    table = format_table(a)
    assert table.splitlines()[:2] == ["| Metric | Value |", "| --- | --- |"]
    assert "| Accuracy | 0.6250 |" in table and "| ECE (15 bins) (lower is better) | 0.2838 |" in table
    assert len(table.splitlines()) == 12
    side_by_side = compare_runs({"ce": a, "cws": b})
    lines = side_by_side.splitlines()
    assert lines[0] == "| Metric | ce | cws |"
    assert "| Accuracy | 0.6250 | **0.6667** |" in lines
    # lower is better for Brier: a's .3596 beats b's (.14 + .26 + 1.14 + .26 + .86 + .06) / 6 = .4533
    assert "| Brier (lower is better) | **0.3596** | 0.4533 |" in lines
    assert "| Recall: C | 0.5000 | n/a |" in lines  # nothing to compare: no bold
    with pytest.raises(ConfigError):
        compare_runs({})


def test_no_warnings_for_absent_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(ABSENT_PROBS, ABSENT_TARGETS, NAMES)
        compute_metrics(np.array([[.8, .2], [.6, .4]]), np.array([0, 0]))
