"""The ingest's encoding workers: a process pool that reads and checks image files (or encodes
npz arrays) in parallel, dies with the ingest that started it, and can be stopped at once.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow.fs as pafs

from shards import storage
from shards.image import Encoded, Pixels, encode_array_png, encode_file_bytes, image_summary
from shards.intensity import Window


def die_with_parent(parent_pid: int) -> None:
    """Encoding-worker initializer: end this process when the ingest that started it is gone.

    On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG), even if the
    parent was SIGKILLed; a watchdog thread covers the other systems. Without this, a killed
    ingest would leave its encoding workers (hundreds of MB each) running, adopted by PID 1.
    """
    import signal
    import threading

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the encoding workers now (not after their current chunk).

    Two threads of the pool would otherwise hang the ingest's exit after SIGTERM:

    * the call queue's feeder, blocked writing a chunk into a pipe no worker reads any more
      (Python joins it at exit): ``cancel_join_thread`` lets the process exit without it (the data
      is abandoned on purpose);
    * the pool's manager thread, blocked reading a result that a killed worker had half written
      (Python joins it at exit too). It reads on until end-of-file, which never comes while this
      process holds the pipe's write end as well: closing that end once the workers are gone
      gives it end-of-file, and it stops.

    Python 3.14 has ``terminate_workers``; before it, these private fields are the way.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    call_queue = getattr(pool, "_call_queue", None)
    result_queue = getattr(pool, "_result_queue", None)  # shutdown() drops the pool's reference
    if call_queue is not None:
        call_queue.cancel_join_thread()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
    if result_queue is not None and not any(p.is_alive() for p in processes):
        result_queue._writer.close()


@lru_cache(maxsize=4)
def _input_fs(input_uri: str) -> pafs.FileSystem:
    return storage.resolve(input_uri)[0]


def encode_files(input_uri: str, items: list[tuple[str, str]], window: Window,
                  frames: str | None) -> list[Encoded]:
    """Worker: read and check image files; ``items`` are ``(where, path-on-input-fs)``."""
    fs = _input_fs(input_uri)
    out = []
    for where, path in items:
        data = storage.read_bytes(fs, path, where)
        out.append(encode_file_bytes(data, where, window, frames))
    return out


def encode_arrays(images: np.ndarray, window: Window) -> list[Encoded]:
    """Worker: encode N x H x W [x C] uint8 (or N x H x W uint16) images as PNG."""
    out = []
    for image in images:
        hwc = image if image.ndim == 3 else image[:, :, None]
        windowed = image.dtype == np.uint16
        pixels = Pixels(hwc.astype(np.float64) if windowed else hwc, windowed)
        out.append(Encoded(encode_array_png(image), hwc.shape[0], hwc.shape[1], hwc.shape[2],
                           summary=image_summary(pixels, window, image.tobytes()[:4096])))
    return out


class Progress:
    def __init__(self, total: int, every: float = 2.0):
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.perf_counter()

    def step(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-9)
            print(f"  encoded {self.done}/{self.total} images ({rate:.0f} images/s)",
                  file=sys.stderr, flush=True)
            self.last = now
