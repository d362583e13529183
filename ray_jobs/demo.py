"""The main job on the embedded default: ingest ../shared/data/bccd-wbc and print its table.

    python -m ray_jobs.demo [--data-root ../shared/data] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_jobs import prepare
from ray_jobs.cli import run_main

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.demo", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "runs" / "demo"))
    args = p.parse_args(argv)
    return prepare.main(["--input", f"{args.data_root}/bccd-wbc", "--output", f"{args.out}/bccd-wbc",
                         "--overwrite"])


if __name__ == "__main__":
    sys.exit(run_main(main))
