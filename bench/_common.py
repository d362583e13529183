"""What bench/train_overhead.py and bench/data_path.py share: a local Ray, the machine, output."""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as a script


def start_local_ray(num_cpus: int) -> None:
    """A private local Ray with ``num_cpus`` logical CPUs, its files in ``$RAY_TMPDIR``.

    ``RAY_TMPDIR`` defaults to ``/tmp/mbray-bench`` (nothing goes to /tmp/ray); usage stats are
    off; no dashboard; worker output is not forwarded (the scripts print what they measure); the
    job's embedded-Ray system config (idle data workers kept between epochs).

    Ray starts its workers at nice 15 (``RAY_worker_niceness``); here they run at nice 0 like the
    plain-PyTorch side, or on a machine shared with other jobs the comparison would measure the
    kernel's scheduler rather than Ray (set ``RAY_worker_niceness=15`` to see Ray's default).
    """
    os.environ.setdefault("RAY_TMPDIR", "/tmp/mbray-bench")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    import ray
    import ray.data

    from ray_jobs.runtime.ray_setup import LOCAL_RAY_SYSTEM_CONFIG

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-epoch execution plans


def machine() -> dict:
    """Cores, load average and versions: the context every number here needs."""
    import torch

    import ray

    return {"cpu_count": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def load_avg() -> float:
    """The 1-minute load average (how busy the shared machine was)."""
    return round(os.getloadavg()[0], 2)


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain-text table, columns right-aligned except the first."""
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"json: {path}")
