"""A run's learning curve, kept in its own folder (local or ``s3://``) by rank 0 as it trains.

    history = RunHistory("runs/r18-cws", clock="epoch", panels=CLASSIFIER_PANELS)
    history.append({"epoch": 0, "train_loss": 1.2, "val_macro_f1": 0.31, ...})

After each append the run folder holds:

* ``metrics.csv``: one row per epoch (per logged iteration for the GAN) with every reported
  metric; a resumed run keeps the rows before the epoch it resumes at and replaces the rest.
* ``tensorboard/events.out.tfevents.medbalance``: the same rows as TensorBoard scalars
  (``tensorboard --logdir runs/``), written with tensorboardX.
* ``learning_curves.png``: one panel per group of metrics (:data:`CLASSIFIER_PANELS`,
  :data:`GAN_PANELS`), labelled axes, one line per metric.

Each file is rewritten whole from the rows and written atomically through ``shards.storage``, so
a reader never sees half a file and object stores work as local folders do. The rows are few (one
per epoch), so rewriting costs milliseconds.
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile

from shards import storage

METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE = "metrics.csv", "tensorboard", "learning_curves.png"
EVENTS_FILE = "events.out.tfevents.medbalance"
# (panel title, y label, metrics): what learning_curves.png draws.
CLASSIFIER_PANELS = (("training loss", "loss", ("train_loss",)),
                     ("validation", "score", ("val_macro_f1", "val_balanced_accuracy", "val_auc_macro")),
                     ("calibration (validation)", "error", ("val_ece", "val_brier")))
GAN_PANELS = (("discriminator", "loss", ("loss_d", "loss_d_real", "loss_d_fake")),
              ("generator", "loss", ("loss_g",)))


class RunHistory:
    """The rows of one run, appended one report at a time.

    Args:
        run_uri: the run's folder (``<storage>/<name>``, or a GAN class's folder).
        clock: the column that orders rows (``epoch`` or ``iteration``).
        panels: what the PNG draws (see :data:`CLASSIFIER_PANELS`).
    """

    def __init__(self, run_uri: str, clock: str, panels=CLASSIFIER_PANELS):
        self.uri, self.clock, self.panels = run_uri, clock, panels
        self.fs, self.path = storage.resolve(run_uri)
        self.rows = self._read()

    def _read(self) -> list[dict]:
        """The rows an earlier attempt of this run wrote (none when there is no readable file)."""
        path = f"{self.path}/{METRICS_FILE}"
        if not storage.exists(self.fs, path, self.uri):
            return []
        text = storage.read_bytes(self.fs, path, self.uri).decode("utf-8", errors="replace")
        rows = []
        for row in csv.DictReader(io.StringIO(text)):
            try:   # a cell a row did not report is empty: left out, not a reason to drop the curve
                rows.append({k: _number(v) for k, v in row.items() if k and v not in ("", None)})
            except ValueError:
                return []  # not ours or damaged: start the curve again
        return rows

    def append(self, metrics: dict) -> None:
        """Add one report (rows at or after its clock value, from an attempt that did not finish,
        are replaced) and rewrite the three files."""
        now = metrics[self.clock]
        self.rows = [r for r in self.rows if r.get(self.clock, -1) < now]
        self.rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self._write(METRICS_FILE, self._csv())
        self._write(f"{TENSORBOARD_DIR}/{EVENTS_FILE}", self._events())
        self._write(CURVES_FILE, self._png())

    def _write(self, name: str, data: bytes) -> None:
        storage.write_bytes_atomic(self.fs, f"{self.path}/{name}", data, storage.join(self.uri, name))

    def columns(self) -> list[str]:
        names = [self.clock]
        for row in self.rows:
            names += [k for k in row if k not in names]
        return names

    def _csv(self) -> bytes:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue().encode("utf-8")

    def _events(self) -> bytes:
        """The rows as TensorBoard scalars (step = the clock), one event file."""
        from tensorboardX import SummaryWriter

        with tempfile.TemporaryDirectory() as tmp:
            writer = SummaryWriter(logdir=tmp, flush_secs=3600)
            for row in self.rows:
                for key, value in row.items():
                    if key != self.clock and math.isfinite(value):
                        writer.add_scalar(key, value, global_step=int(row[self.clock]))
            writer.close()
            [name] = [n for n in os.listdir(tmp) if "tfevents" in n]
            with open(os.path.join(tmp, name), "rb") as f:
                return f.read()

    def _png(self) -> bytes:
        """learning_curves.png: a panel per group in ``panels`` that has data."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        panels = [(t, y, [m for m in ms if any(m in r for r in self.rows)]) for t, y, ms in self.panels]
        panels = [p for p in panels if p[2]] or [("(no metric)", "", [])]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        x_shift = 1 if self.clock == "epoch" else 0   # epochs are shown from 1
        for ax, (title, ylabel, metrics) in zip(axes[0], panels):
            for metric in metrics:
                points = [(r[self.clock] + x_shift, r[metric]) for r in self.rows if metric in r]
                ax.plot(*zip(*points), marker="o", markersize=3, label=metric)
            ax.set_title(title)
            ax.set_xlabel(self.clock)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs and iterations are whole
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if metrics:
                ax.legend(fontsize=8)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=100)
        plt.close(fig)
        return out.getvalue()


def _number(text: str) -> float | int:
    """A CSV cell back to a number (``nan`` included); ValueError for anything else."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
