"""What a sweep leaves: one row per trial (``trials.csv``), the best config, and Optuna's plots.

Rows come from Tune's ``ResultGrid`` (every epoch each trial reported) and each trial's training
run (``result.json``: a failed run's message). Status comes from what happened to the trial:
``failed`` (with the reason), ``stopped early`` (only when ASHA stopped it: ``tuning.asha``
records whom), ``finished`` (it ran all of its own epochs), or ``incomplete`` (it ended without an
error and without ASHA, short of its epochs: the message says how far it got). The plots are drawn by
``optuna.visualization.matplotlib`` on a study rebuilt from these rows (one trial per row, its best
value, its per-epoch values as intermediate values), so they can be redrawn from ``trials.csv`` and
Tune's results alone.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import warnings

from medbalance.errors import MedbalanceError
from ray_jobs.runtime.run_dir import RESULT_FILE, RunDir, checkpoint_uri
from ray_jobs.sweeps.tuning import CLOCK, TRIALS_DIR, run_name
from shards import storage

FINISHED, STOPPED, FAILED, INCOMPLETE = "finished", "stopped early", "failed", "incomplete"
MIN_TRIALS_FOR_IMPORTANCE = 4


def failure_reason(error, run_summary: dict | None) -> str:
    """One line: the training run's own message (non-finite loss, damaged data), else the error's."""
    if run_summary and run_summary.get("status") not in (None, "ok") and run_summary.get("message"):
        return run_summary["message"]
    cause = getattr(error, "cause", None)
    if isinstance(cause, MedbalanceError):
        return str(cause)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _read_summary(run: RunDir) -> dict | None:
    """The training run's ``result.json`` (written when ``fit`` returned or stopped on its own)."""
    fs, path = storage.resolve(run.uri)
    if not storage.exists(fs, f"{path}/{RESULT_FILE}", run.uri):
        return None
    return run.read_json(RESULT_FILE)


def trial_rows(results, *, sweep_uri: str, metric: str, mode: str, keys: list[str],
               stopped: set[str] = frozenset()) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """One row per trial of a ``ResultGrid``, and each trial's (epoch, metric) history.

    Args:
        stopped: ids of the trials the scheduler stopped early (``tuning.stopped_by_asha``).

    Returns:
        ``(rows, histories)``; a row has ``trial_id``, ``status``, the parameters (``keys``),
        ``best_<metric>``, ``best_epoch`` (1-based), ``epochs_run``, ``checkpoint`` (the best
        epoch's checkpoint URI), ``run`` (the training run's folder) and ``message``.
    """
    rows, histories = [], {}
    for result in results:
        trial_id = os.path.basename(result.path.rstrip("/"))
        params = {k: result.config.get(k) for k in keys}
        run = RunDir(storage.join(sweep_uri, TRIALS_DIR), run_name(result.config, trial_id))
        summary = _read_summary(run)
        frame = result.metrics_dataframe
        history, best = [], None
        if frame is not None and metric in frame and CLOCK in frame:
            for _, report in frame.iterrows():
                value = report[metric]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                epoch = int(report[CLOCK])
                history.append((epoch, float(value)))
                if best is None or (value > best[1] if mode == "max" else value < best[1]):
                    best = (epoch, float(value), report.get("checkpoint_path"))
        epochs_run = max((e for e, _ in history), default=0)
        status, message = _status(result, summary, trial_id in stopped, epochs_run)
        checkpoint = None
        if best is not None and isinstance(best[2], str) and best[2]:
            checkpoint = checkpoint_uri(sweep_uri, _Path(best[2]))
        elif summary and summary.get("best_checkpoint"):
            checkpoint = summary["best_checkpoint"]
        rows.append({"trial_id": trial_id, "status": status, **params,
                     f"best_{metric}": best[1] if best else float("nan"),
                     "best_epoch": best[0] if best else 0, "epochs_run": epochs_run,
                     "checkpoint": checkpoint or "", "run": run.uri, "message": message})
        histories[trial_id] = history
    rows.sort(key=lambda r: r["trial_id"])
    return rows, histories


def _status(result, summary: dict | None, stopped: bool, epochs_run: int) -> tuple[str, str]:
    """A trial's ``(status, message)`` from what happened to it (module docstring)."""
    if result.error is not None:
        return FAILED, failure_reason(result.error, summary)
    if stopped:
        return STOPPED, f"stopped by ASHA after {epochs_run} epoch(s)"
    own = (summary or {}).get("epochs_requested")
    if own and epochs_run < own:
        return INCOMPLETE, f"ended after {epochs_run} of its {own} epochs, not stopped by the scheduler"
    return FINISHED, ""


class _Path:
    """What ``checkpoint_uri`` reads of a Ray ``Checkpoint``: its path."""

    def __init__(self, path: str):
        self.path = path


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The row with the best value among trials that did not fail."""
    scored = [r for r in rows if r["status"] != FAILED and not math.isnan(r[f"best_{metric}"])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[f"best_{metric}"])


def table(rows: list[dict], columns: list[str]) -> str:
    """The rows as an aligned text table (floats to 4 significant digits)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns)
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame(rows, columns=columns).to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def rebuild_study(rows: list[dict], histories: dict, distributions: dict, metric: str, mode: str):
    """An Optuna study with one trial per row (failed rows as FAIL), for the plots."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for row in rows:
        params = {k: row[k] for k in distributions}
        failed = row["status"] == FAILED or math.isnan(row[f"best_{metric}"])
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions,
            value=None if failed else row[f"best_{metric}"],
            state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
            intermediate_values={epoch: value for epoch, value in histories.get(row["trial_id"], [])},
            user_attrs={"trial_id": row["trial_id"], "status": row["status"]}))
    return study


def write_plots(study, out_uri: str, metric: str) -> list[str]:
    """PNG plots of the study under ``out_uri``; returns their names.

    Always: optimisation history, slice, learning curves (intermediate values). With 2+
    parameters: parallel coordinates; with 2+ parameters and at least
    :data:`MIN_TRIALS_FOR_IMPORTANCE` scored trials: parameter importances.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState


    scored = len(study.get_trials(states=(TrialState.COMPLETE,)))
    params = list(study.trials[0].distributions) if study.trials else []
    plots = {"optimization_history.png": lambda: ovm.plot_optimization_history(study, target_name=metric),
             "slice.png": lambda: ovm.plot_slice(study, target_name=metric),
             "learning_curves.png": lambda: ovm.plot_intermediate_values(study)}
    if len(params) >= 2:
        plots["parallel_coordinate.png"] = lambda: ovm.plot_parallel_coordinate(study, target_name=metric)
        if scored >= MIN_TRIALS_FOR_IMPORTANCE:
            plots["param_importances.png"] = lambda: ovm.plot_param_importances(study, target_name=metric)
    if not scored:
        return []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, draw in plots.items():
            axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(4 * len(params) if name == "slice.png" and len(params) > 1 else 8, 5)
            figure.savefig(os.path.join(tmp, name), dpi=110, bbox_inches="tight")
            plt.close(figure)
        storage.copy_dir(tmp, out_uri)
    return list(plots)
