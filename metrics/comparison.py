"""Comparing methods over seeds: mean ± std per method, and a paired difference against a baseline.

    runs = [{"method": "resnet18+ce", "seed": 0, "macro_f1": 0.41, ...}, ...]
    rows = summarize(runs, baseline="resnet18+ce")
    print(to_markdown(rows, baseline="resnet18+ce"))

Per method and metric: the mean and the sample standard deviation (ddof 1) over the seeds that
produced a result. Against the baseline, the seeds both methods share are paired: the difference
``d_s = metric(method, s) - metric(baseline, s)`` has mean ``d``, and its 95% interval is
``d ± t_{0.975, n-1} * sd(d) / sqrt(n)`` (Student's t over the n shared seeds; ``scipy.stats``),
with the paired t-test's p-value. With one shared seed there is no interval (NaN).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from medbalance.errors import ConfigError

COMPARE_METRICS = ("macro_f1", "balanced_accuracy", "ece", "brier", "auc_macro")
SHORT = {"macro_f1": "Macro-F1", "balanced_accuracy": "B-ACC", "ece": "ECE", "brier": "Brier",
         "auc_macro": "AUC", "accuracy": "Accuracy", "mcc": "MCC", "g_mean": "G-mean", "kappa": "Kappa"}
LOWER_IS_BETTER = frozenset({"ece", "mce", "brier"})


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    import numpy as np

    kept = [float(v) for v in values if _finite(v)]
    if not kept:
        return float("nan"), float("nan"), 0
    return float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else float("nan"), len(kept)


def paired_difference(method: dict, baseline: dict, confidence: float = 0.95) -> dict:
    """Paired difference over shared seeds.

    Args:
        method, baseline: ``{seed: value}``.

    Returns:
        ``{"diff", "low", "high", "n", "p"}``: mean difference (method - baseline), the t-based
        interval, the number of shared seeds and the paired t-test's two-sided p-value.
    """
    import numpy as np
    from scipy import stats

    seeds = sorted(s for s in method if s in baseline and _finite(method[s]) and _finite(baseline[s]))
    diffs = np.array([method[s] - baseline[s] for s in seeds], dtype=float)
    n = len(diffs)
    if n == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "p": float("nan")}
    mean = float(diffs.mean())
    if n < 2:
        return {"diff": mean, "low": float("nan"), "high": float("nan"), "n": n, "p": float("nan")}
    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue) if sd > 0 \
        else (1.0 if mean == 0 else 0.0)
    return {"diff": mean, "low": mean - half, "high": mean + half, "n": n, "p": p}


def summarize(runs: list[dict], baseline: str, metrics: Sequence[str] = COMPARE_METRICS) -> list[dict]:
    """One row per method (in order of first appearance): ``method``, ``seeds`` (how many gave a
    result), ``<metric>_mean``, ``<metric>_std`` and, for methods other than the baseline,
    ``<metric>_diff``, ``<metric>_low``, ``<metric>_high``, ``<metric>_p``.

    Raises:
        ConfigError: when the baseline has no run.
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))
    if baseline not in methods:
        raise ConfigError(f"baseline {baseline!r} has no run to compare with; methods: {methods}")
    by_method = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in methods}
    rows = []
    for method in methods:
        seeds = by_method[method]
        row = {"method": method, "seeds": sum(any(_finite(r.get(k)) for k in metrics) for r in seeds.values())}
        for key in metrics:
            mean, std, _ = mean_std([r.get(key) for r in seeds.values()])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            if method != baseline:
                paired = paired_difference({s: r.get(key) for s, r in seeds.items()},
                                           {s: r.get(key) for s, r in by_method[baseline].items()})
                row.update({f"{key}_{k}": paired[k] for k in ("diff", "low", "high", "p")})
                row["paired_seeds"] = paired["n"]
        rows.append(row)
    return rows


def _fmt(value: float, digits: int = 4) -> str:
    return "-" if not _finite(value) else f"{value:.{digits}f}"


def to_markdown(rows: list[dict], baseline: str, metrics: Sequence[str] = COMPARE_METRICS,
                title: str | None = None) -> str:
    """Two Markdown tables: mean ± std per method, then each method minus the baseline with its
    95% interval over paired seeds (higher is better except for ECE and Brier)."""
    labels = [SHORT.get(k, k) for k in metrics]
    out = [f"### {title}", ""] if title else []
    out.append("| Method | Seeds | " + " | ".join(labels) + " |")
    out.append("| --- | ---: |" + " ---: |" * len(metrics))
    for row in rows:
        cells = [f"{_fmt(row[f'{k}_mean'])} ± {_fmt(row[f'{k}_std'])}" for k in metrics]
        out.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
    others = [r for r in rows if r["method"] != baseline]
    if others:
        out.append("")
        out.append(f"Paired difference vs **{baseline}** (method - baseline over shared seeds; mean "
                   "[95% t-interval], p of the paired t-test; lower is better for ECE and Brier):")
        out.append("")
        out.append("| Method | Pairs | " + " | ".join(f"Δ {label}" for label in labels) + " |")
        out.append("| --- | ---: |" + " ---: |" * len(metrics))
        for row in others:
            cells = [f"{_fmt(row[f'{k}_diff'], 4)} [{_fmt(row[f'{k}_low'])}, {_fmt(row[f'{k}_high'])}] "
                     f"p={_fmt(row[f'{k}_p'], 3)}" for k in metrics]
            out.append(f"| {row['method']} | {row['paired_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
