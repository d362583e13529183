"""The evaluation report: ``report.json``, ``report.md`` and PNG plots in one local folder.

    report = write_report("out/eval", probs, targets, class_names, title="ADSR-ResNet50, CE+CWS",
                          extra={"checkpoint": uri}, calibration=calibration_summary(logits, targets, T))
    print(format_table(report))
    print(compare_runs({"ce": report_ce, "cws": report_cws}))

Files written (names fixed, so jobs and READMEs can link them): report.json, report.md,
confusion_matrix.png (counts + row-normalised), reliability_diagram.png, per_class_recall.png.
The evaluate job copies the folder to remote storage; this module only writes local paths.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from metrics.classification import LOWER_IS_BETTER, MAIN_METRICS, compute_metrics
from metrics.plots import plot_confusion_matrix, plot_per_class_recall, plot_reliability_diagram
from medbalance.errors import ConfigError

PLOTS = {"confusion_matrix": "confusion_matrix.png", "reliability_diagram": "reliability_diagram.png",
         "per_class_recall": "per_class_recall.png"}
CALIBRATION_KEYS = ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")
LABELS = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "balanced_accuracy": "Balanced accuracy (B-ACC)",
          "g_mean": "G-mean", "auc_macro": "AUC (macro OvR)", "mcc": "MCC", "kappa": "Cohen's kappa",
          "ece": "ECE (15 bins)", "mce": "MCE (15 bins)", "brier": "Brier"}


def write_report(out_dir: str | Path, probs: object, targets: object, class_names: Sequence[str] | None, *,
                 title: str | None = None, extra: Mapping | None = None,
                 calibration: Mapping[str, float] | None = None) -> dict:
    """Compute every metric and write report.json, report.md and the PNGs into ``out_dir``.

    Args:
        out_dir: a local directory (created if missing).
        probs: (N, C) softmax probabilities over the whole evaluation set (gathered from all workers).
        targets: (N,) class ids.
        class_names: C names, or None for "0", "1", ...
        title: heading of report.md (stored in report.json too).
        extra: JSON-serialisable facts to keep with the numbers (run name, checkpoint, config, command).
        calibration: ``metrics.calibration.calibration_summary(...)`` output (temperature and
            ECE/Brier before and after scaling), stored under "calibration".

    Returns:
        The dict written to report.json: ``compute_metrics``'s keys, plus "title", "files" (plot
        names) and, when given, "calibration" and "extra".
    """
    if "://" in str(out_dir):
        raise ConfigError(f"write_report writes to a local directory, got {out_dir}; write locally and "
                          "copy the folder to remote storage (the evaluate job does).")
    out_dir = Path(out_dir)
    report = compute_metrics(probs, targets, class_names)
    report["title"] = title
    if calibration is not None:
        missing = [k for k in CALIBRATION_KEYS if k not in calibration]
        if missing:
            raise ConfigError(f"calibration is missing {missing}; pass calibration_summary(logits, targets, T).")
        report["calibration"] = {k: float(v) for k, v in calibration.items()}
    if extra is not None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"extra must be JSON-serialisable (str, numbers, lists, dicts): {err}") from None
        report["extra"] = dict(extra)
    report["files"] = dict(PLOTS)

    out_dir.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    plot_confusion_matrix(report["confusion_matrix"], names, out_dir / PLOTS["confusion_matrix"], title=title)
    plot_reliability_diagram(probs, targets, out_dir / PLOTS["reliability_diagram"], title=title)
    plot_per_class_recall(report["per_class"], out_dir / PLOTS["per_class_recall"], title=title)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(_markdown(report))
    return report


def format_table(metrics: Mapping) -> str:
    """The main metrics of a ``compute_metrics``/report dict as a two-column Markdown table."""
    rows = ["| Metric | Value |", "| --- | --- |"]
    for key in MAIN_METRICS:
        rows.append(f"| {_label(key)} | {_fmt(metrics.get(key))} |")
    return "\n".join(rows) + "\n"


def compare_runs(reports: Mapping[str, Mapping]) -> str:
    """A Markdown table with one column per run: the main metrics, then each class's recall.

    The best value of each row is in bold (highest; lowest for ECE, MCE and Brier), unless the
    row's values are all equal (to 4 decimals).
    """
    if not reports:
        raise ConfigError("compare_runs needs at least one report.")
    runs = list(reports)
    rows = ["| Metric | " + " | ".join(_cell(r) for r in runs) + " |", "| --- |" + " --- |" * len(runs)]
    for key in MAIN_METRICS:
        rows.append(_compare_row(_label(key), [reports[r].get(key) for r in runs], key in LOWER_IS_BETTER))
    class_names: list[str] = []
    for report in reports.values():
        class_names += [n for n in report.get("per_class", {}) if n not in class_names]
    for name in class_names:
        values = [reports[r].get("per_class", {}).get(name, {}).get("recall") for r in runs]
        rows.append(_compare_row(f"Recall: {_cell(name)}", values, lower_is_better=False))
    return "\n".join(rows) + "\n"


def _compare_row(label: str, values: list, lower_is_better: bool) -> str:
    known = [v for v in values if v is not None]
    spread = len(known) > 1 and not math.isclose(min(known), max(known), abs_tol=5e-5)
    best = (min(known) if lower_is_better else max(known)) if spread else None
    cells = [f"**{_fmt(v)}**" if best is not None and v is not None and math.isclose(v, best, abs_tol=5e-5)
             else _fmt(v) for v in values]
    return f"| {label} | " + " | ".join(cells) + " |"


def _label(key: str) -> str:
    suffix = " (lower is better)" if key in LOWER_IS_BETTER else ""
    return LABELS.get(key, key) + suffix


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown(report: Mapping) -> str:
    lines = [f"# {report.get('title') or 'Evaluation report'}", "",
             f"{report['num_samples']} samples, {len(report['class_names'])} classes.", "",
             "## Metrics", "", format_table(report)]
    if report["auc_excluded_classes"]:
        lines += [f"AUC leaves out class(es) absent from the targets: {', '.join(report['auc_excluded_classes'])}.",
                  ""]
    if "calibration" in report:
        cal = report["calibration"]
        lines += ["## Temperature scaling", "", f"Temperature T = {cal['temperature']:.4f} (fitted on validation "
                  "logits).", "", "| Metric | Before | After |", "| --- | --- | --- |"]
        for key in ("ece", "mce", "brier", "nll"):
            if f"{key}_before" in cal and f"{key}_after" in cal:
                lines.append(f"| {key.upper() if key != 'brier' else 'Brier'} | {cal[key + '_before']:.4f} | "
                             f"{cal[key + '_after']:.4f} |")
        lines.append("")
    lines += ["## Per class", "", "| Class | Precision | Recall | F1 | AUC | Support |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, row in report["per_class"].items():
        lines.append(f"| {_cell(name)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['f1'])} | "
                     f"{_fmt(row['auc'])} | {row['support']} |")
    lines += ["", "## Confusion matrix (rows = true, columns = predicted)", "",
              "| true \\ predicted | " + " | ".join(_cell(n) for n in report["class_names"]) + " |",
              "| --- |" + " --- |" * len(report["class_names"])]
    for name, row in zip(report["class_names"], report["confusion_matrix"]):
        lines.append(f"| {_cell(name)} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Plots", "", f"![Confusion matrix]({PLOTS['confusion_matrix']})", "",
              f"![Reliability diagram]({PLOTS['reliability_diagram']})", "",
              f"![Per-class recall]({PLOTS['per_class_recall']})", ""]
    synthetic = (report.get("extra") or {}).get("synthetic_in_training")
    if synthetic and "per_class" in synthetic:  # a classifier trained on a GAN dataset version
        per_class = ", ".join(f"{_cell(c)} {n}" for c, n in synthetic["per_class"].items() if n) or "none"
        lines += ["## Training data", "", f"Synthetic (GAN) images in training: {synthetic['total']} ({per_class}).", ""]
    if report.get("extra"):
        lines += ["## Run", "", "```json", json.dumps(report["extra"], indent=2), "```", ""]
    return "\n".join(lines)
