"""Helpers of the tests that plant faults on small real data (a slice of the bundled RetinaMNIST):
processes, files, jobs run as a user runs them, a flipped byte inside a shard. The fixtures
(``small_npz``, ``dataset``, ``checkpoint``) are in conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from shards import read_manifest

from conftest import REPO

CLASSES = ["0", "1", "2", "3", "4"]


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive (and not zombies) after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def image_folder(root: Path, count: int, start: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.fromarray(np.full((20, 20, 3), 10 * i % 255, np.uint8)).save(root / f"img{i}.png")
    return root


def run_job(module: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """A job as a user runs it: its own process, no RAY_ADDRESS (so no Ray unless it starts one)."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def flip_first_image_byte(uri: str, split: str = "train") -> str:
    """Flip one byte inside the first PNG's compressed data of a shard (size unchanged)."""
    manifest = read_manifest(uri)
    shard = manifest.shards_of(split)[0]
    path = Path(uri) / shard.path
    data = bytearray(path.read_bytes())
    first_image = pq.read_table(path, columns=["image"])["image"][0].as_py()
    at = data.find(first_image)
    idat = first_image.find(b"IDAT")
    assert at > 0 and idat > 0
    data[at + idat + 4] ^= 0xFF  # the zlib header of the pixel data
    path.write_bytes(bytes(data))
    return shard.path


