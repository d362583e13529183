"""An ingest stopped by SIGTERM or SIGKILL leaves no half-written shards and no orphan workers;
what a killed ingest left is reported and removed by --overwrite."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


from conftest import REPO, stop_process_group
from safety_support import child_pids, run_job, wait_gone


@pytest.fixture(scope="module")
def slow_npz(tmp_path_factory) -> Path:
    """Enough noise images that encoding takes several seconds on one worker."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6000, 96, 96, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=(6000, 1))
    path = tmp_path_factory.mktemp("slow") / "slow.npz"
    np.savez(path, train_images=images, train_labels=labels, val_images=images[:30], val_labels=labels[:30],
             test_images=images[:30], test_labels=labels[:30])
    return path


def start_ingest(npz: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ray_jobs.prepare", "--input", str(npz), "--output", str(out),
           "--workers", "2", "--shard-mb", "0.5", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_shards(proc: subprocess.Popen, out: Path) -> list[int]:
    """Wait until the ingest has written a shard; return its encoding workers."""
    deadline = time.time() + 120
    while not list(out.glob("shards-*/*.parquet")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no shard written within 120 s"
        time.sleep(0.1)
    children = child_pids(proc.pid)
    assert children, "the ingest has no encoding workers"
    return children


def test_sigterm_during_ingest_leaves_no_shards_and_no_workers(slow_npz, tmp_path):
    out = tmp_path / "out"
    proc = start_ingest(slow_npz, out)
    try:
        children = wait_for_shards(proc, out)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hangs
            stacks = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(proc.pid)],
                                    capture_output=True, text=True).stdout
            raise AssertionError(f"the ingest did not exit within 120 s of SIGTERM:\n{stacks}")
        assert code == 143, proc.stdout.read()
    finally:
        stop_process_group(proc)
    assert "terminated" in proc.stdout.read()
    assert not list(out.glob("shards-*")) and not (out / "manifest.json").exists()
    alive = wait_gone(children, timeout=10)
    assert not alive, f"encoding workers still running: {alive}"


def test_stopping_the_pool_frees_a_thread_reading_a_half_written_result():
    """A worker killed while sending its result leaves the pool's manager thread reading the rest
    of that message; Python joins that thread at exit, so an ingest given SIGTERM could hang there
    (the SIGTERM test above once waited 120 s for it). Here the half message is written by hand:
    4 bytes of length, then 10 of the promised 1000."""
    import multiprocessing
    import struct as st
    from concurrent.futures import ProcessPoolExecutor

    from shards.encoding import stop_pool

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    assert pool.submit(abs, -1).result(timeout=60) == 1
    manager = pool._executor_manager_thread
    os.write(pool._result_queue._writer.fileno(), st.pack("!i", 1000) + b"x" * 10)
    time.sleep(0.5)  # the manager thread is now waiting for the other 990 bytes
    stop_pool(pool)
    manager.join(timeout=10)
    assert not manager.is_alive(), "the pool's manager thread still waits for a result no worker will send"


def test_sigkill_during_ingest_workers_die_and_the_leftover_is_reported(slow_npz, small_npz, tmp_path):
    out = tmp_path / "out"
    proc = start_ingest(slow_npz, out)
    try:
        children = wait_for_shards(proc, out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_process_group(proc)
    alive = wait_gone(children, timeout=15)
    assert not alive, f"encoding workers outlived their killed parent: {alive}"
    leftover = [p.name for p in out.glob("shards-*")]
    assert leftover  # SIGKILL cannot clean up: the next run must say so

    rerun = run_job("ray_jobs.prepare", "--input", str(small_npz), "--output", str(out), "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert "interrupted ingest" in rerun.stderr and leftover[0] in rerun.stderr
    verify = run_job("ray_jobs.prepare", "--verify", str(out))
    assert verify.returncode == 0 and "interrupted ingest" in verify.stdout and leftover[0] in verify.stdout
    again = run_job("ray_jobs.prepare", "--input", str(small_npz), "--output", str(out), "--workers", "1",
                    "--overwrite")
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("shards-*"))) == 1 and not any((out / name).exists() for name in leftover)
