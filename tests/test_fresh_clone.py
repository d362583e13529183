"""A user's first run: a fresh clone with nothing beside it runs the demo, and its output is ours.

The clone is made from the committed tree (``git clone`` of this checkout) into an empty temporary
folder, so it reads nothing outside the checkout; the demo runs there on its own embedded Ray, as after
``make demo``, with one short epoch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Ray lines a user cannot act on (ray_jobs.runtime.ray_setup silences them with Ray's own settings).
SUPPRESSED = (
    "Token authentication is enabled",
    "constructor arguments in the object store",
    "RayDeprecationWarning",
    "Progress bars disabled",
    "PYTHON worker processes have been started",
    "Started a local Ray instance",
    "Reporting training result",
)


@pytest.mark.slow
@pytest.mark.embedded_ray
def test_fresh_clone_runs_the_demo_quietly(tmp_path):
    clone = tmp_path / "medbalance"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists()
    assert (clone / "data" / "retinamnist" / "retinamnist.npz").is_file(), "the bundled data is not committed"
    ray_tmp = Path(f"/tmp/mbclone-{os.getpid()}")  # short: Ray's socket paths are length-limited
    shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ray_jobs.demo", "--set", "epochs=1", "--set", "data.image_size=28"],
            cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    # the demo ran from the clone, on the clone's bundled data, writing into the clone
    assert f"ingest {clone}/data/retinamnist/retinamnist.npz" in text
    assert (clone / "runs" / "demo" / "demo-adsr18-cws" / "eval-test" / "report.json").is_file()
    # what a user needs is there ...
    assert "[medbalance] epoch 1/1" in text
    assert "| Macro-F1 |" in text and "| AUC (macro OvR) |" in text
    assert "report: " in text and "demo finished" in text
    # ... and nothing they cannot act on
    assert [line for line in text.splitlines() if any(s in line for s in SUPPRESSED)] == []
    assert len(text.splitlines()) < 60, text
