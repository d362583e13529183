"""Bad input loses nothing and leaks nothing: predict --overwrite, planted secrets, interrupted
ingest, damaged shards (missing, truncated, a flipped byte), unreachable S3, decompression bombs.

Each test plants the fault itself on small real data (a slice of the bundled RetinaMNIST).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medbalance.errors import ConfigError, DataError, StorageError
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.runtime.checkpoint import save_checkpoint
from ray_jobs.runtime.configs import to_dict
from ray_jobs.runtime.run_dir import RunDir
from shards import ingest, read_manifest, storage

from conftest import PLANTED_KEY, PLANTED_SECRET, REPO, stop_process_group

CLASSES = ["0", "1", "2", "3", "4"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, retina_npz) -> Path:
    """RetinaMNIST, a few images of every class in every split."""
    npz = np.load(retina_npz)
    arrays = {}
    for split, per_class in (("train", 12), ("val", 4), ("test", 4)):
        labels = npz[f"{split}_labels"][:, 0]
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(5)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = npz[f"{split}_images"][keep], npz[f"{split}_labels"][keep]
    path = tmp_path_factory.mktemp("safety") / "small.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture
def dataset(small_npz, tmp_path) -> str:
    uri = str(tmp_path / "data")
    ingest(str(small_npz), uri, workers=1)
    return uri


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A real (untrained) resnet18 checkpoint, made without Ray."""
    from models import create_model

    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = TrainConfig(model="resnet18", data=DataSection(image_size=28))
    save_checkpoint({"model": create_model("resnet18", num_classes=5).state_dict(), "config": to_dict(cfg),
                     "class_names": CLASSES, "epoch": 0}, str(folder))
    return str(folder)


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


# ----------------------------------------------------------------------------- part 0: data loss


@pytest.mark.ray
def test_predict_overwrite_onto_its_own_input_deletes_nothing(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import predict

    images = image_folder(tmp_path / "images", 3)
    (images / "notes.txt").write_text("not an image, not ours to delete")
    before = files_under(tmp_path)
    for output in (images, images / "preds", tmp_path):  # is, lies inside, contains the input
        with pytest.raises(ConfigError, match="overlaps --input"):
            predict(checkpoint, str(images), str(output), overwrite=True)
    assert files_under(tmp_path) == before


@pytest.mark.ray
def test_predict_overwrite_never_deletes_a_foreign_folder(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import predict

    images = image_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("someone else's file")
    with pytest.raises(ConfigError, match="not a medbalance predictions folder"):
        predict(checkpoint, str(images), str(out), overwrite=True)
    assert (out / "report.csv").read_text() == "someone else's file"


@pytest.mark.ray
def test_failing_overwrite_keeps_the_previous_predictions(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import SUCCESS, predict, read_predictions

    out = tmp_path / "preds"
    first = predict(checkpoint, str(image_folder(tmp_path / "a", 3)), str(out))
    kept = files_under(out)
    broken = image_folder(tmp_path / "b", 2)
    (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        predict(checkpoint, str(broken), str(out), overwrite=True)
    assert files_under(out) == kept                       # nothing lost, nothing half-written
    assert read_predictions(str(out)).num_rows == first["rows"] == 3

    second = predict(checkpoint, str(image_folder(tmp_path / "c", 5)), str(out), overwrite=True)
    table = read_predictions(str(out))
    assert table.num_rows == second["rows"] == 5
    assert sorted(table["source"].to_pylist()) == [f"img{i}.png" for i in range(5)]
    assert json.loads((out / SUCCESS).read_text())["files"] == second["files"]
    # the first run's files are gone; a plain recursive reader sees the new ones only
    assert not any(f.split("/")[0] in {p.split("/")[0] for p in first["files"]} for f in files_under(out))
    assert pq.read_table(out).num_rows == 5


def test_ingest_overwrite_only_deletes_shard_folders(small_npz, tmp_path):
    """An --overwrite removes the replaced dataset's shards-* folders and nothing else."""
    uri = tmp_path / "data"
    ingest(str(small_npz), str(uri), workers=1)
    (uri / "my-notes.txt").write_text("keep me")
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "elsewhere/" + manifest["shards"][0]["path"].split("/", 1)[1]
    (uri / "elsewhere").mkdir()
    (uri / "elsewhere" / "precious").write_text("not a shard folder")
    (uri / "manifest.json").write_text(json.dumps(manifest))
    ingest(str(small_npz), str(uri), workers=1, overwrite=True)
    assert (uri / "my-notes.txt").read_text() == "keep me"
    assert (uri / "elsewhere" / "precious").exists()


# ----------------------------------------------------------------------------- part 0: secrets
@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.embedded_ray
def test_planted_secret_appears_nowhere(s3_server, small_npz, tmp_path):
    """prepare -> train -> evaluate on S3 with the embedded Ray; grep every file for the secret."""
    fs = s3_server["fs"]
    bucket = f"leak-{os.getpid()}"
    fs.create_dir(bucket)
    ray_tmp = Path(f"/tmp/mbleak-{os.getpid()}")  # short: Ray's socket paths are length-limited
    shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_tmp.mkdir()
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": PLANTED_KEY,
           "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_REGION": "us-east-1", "RAY_TMPDIR": str(ray_tmp)}
    data, runs = f"s3://{bucket}/data", f"s3://{bucket}/runs"
    logs = []
    try:
        for args in (("ray_jobs.prepare", "--input", str(small_npz), "--output", data, "--workers", "1"),
                     ("ray_jobs.train", "--data", data, "--model", "resnet18", "--loss", "ce", "--epochs", "1",
                      "--batch-size", "16", "--image-size", "28", "--num-workers", "2", "--storage", runs,
                      "--name", "leak", "--set", "data.augment=none"),
                     ("ray_jobs.evaluate", "--checkpoint", f"{runs}/leak", "--data", data, "--split", "test",
                      "--out", f"{runs}/leak/eval")):
            out = run_job(*args, env=env)
            logs.append(out.stdout + out.stderr)
            assert out.returncode == 0, logs[-1][-3000:]
        # every file Ray wrote, every object in the bucket, everything the jobs printed
        hits = [str(p) for p in ray_tmp.rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
        import pyarrow.fs as pafs
        objects = [i.path for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
                   if i.type == pafs.FileType.File]
        assert any(o.endswith("checkpoint.pt") for o in objects) and any(o.endswith("report.json") for o in objects)
        hits += [o for o in objects if PLANTED_SECRET.encode() in fs.open_input_stream(o).read()]
        hits += [f"job output {i}" for i, text in enumerate(logs) if PLANTED_SECRET in text]
        assert hits == []
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "the embedded Ray's logs were not where expected"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_s3_filesystems_carry_no_credentials_when_pickled(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-planted-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.resolve("s3://bucket/prefix")
    assert path == "bucket/prefix"
    blob = pickle.dumps(fs)
    assert PLANTED_SECRET.encode() not in blob and b"AKIA-planted-id" not in blob


# ----------------------------------------------------------------------------- part 0: interrupted ingest
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


# ----------------------------------------------------------------------------- part 0: bad rows, markers
def test_csv_row_with_an_empty_label_is_refused(tmp_path):
    image_folder(tmp_path / "imgs", 3)
    (tmp_path / "labels.csv").write_text("path,label\nimgs/img0.png,a\nimgs/img1.png,\nimgs/img2.png,b\n")
    with pytest.raises(DataError, match=r"labels.csv line 3: the label of 'imgs/img1.png' is empty"):
        ingest(str(tmp_path / "labels.csv"), str(tmp_path / "out"), val=0, test=0, small_classes="train-only")
    assert not list((tmp_path / "out").glob("shards-*"))


def test_a_failed_first_run_does_not_block_the_name(tmp_path):
    run = RunDir(str(tmp_path), "first")
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / ".validate_storage_marker").write_text("")
    assert not run.has_results()
    assert run.check_resume("fresh") is False
    (tmp_path / "first" / "checkpoint_2026-11-28_10-00-00.000000").mkdir()
    with pytest.raises(ConfigError, match="already has results"):
        run.check_resume("fresh")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_checkpoint_cut_off_mid_copy_is_passed_over_on_resume(request, tmp_path, where, capsys):
    """A driver killed while Ray Train copied a checkpoint folder to storage leaves a cut-off
    checkpoint.pt; resuming takes the newest whole one and says which it passed over."""
    import torch

    from ray_jobs.runtime.checkpoint import is_complete, load_checkpoint

    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path / "runs")
    local = tmp_path / "local"
    local.mkdir()
    whole = Path(save_checkpoint({"epoch": 0, "weights": torch.arange(5000.0)}, str(local)))
    data = whole.read_bytes()
    older, newer = (f"{root}/run/checkpoint_2026-11-28_10-00-0{i}.000000" for i in (1, 2))
    for uri, body in ((older, data), (newer, data[: len(data) - 100])):
        target_fs, path = storage.resolve(f"{uri}/checkpoint.pt")
        storage.ensure_dir(target_fs, path.rsplit("/", 1)[0], uri)
        with target_fs.open_output_stream(path) as f:
            f.write(body)
    assert is_complete(older) and not is_complete(newer) and not is_complete(f"{root}/run/no-such")
    assert RunDir(root, "run").latest_checkpoint() == older
    assert "passing over " + newer in capsys.readouterr().out
    assert load_checkpoint(older, required=())["epoch"] == 0


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (PIL refuses it at open)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_exit_2_names_the_file(tmp_path):
    for cls in ("a", "b"):
        image_folder(tmp_path / "in" / cls, 3)
    (tmp_path / "in" / "a" / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    out = run_job("ray_jobs.prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                  "--workers", "1", "--val", "0.2", "--test", "0.2")
    assert out.returncode == 2, out.stderr
    assert "a/bomb.png" in out.stderr and "decompression bomb" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "out").glob("shards-*"))


@pytest.mark.slow
def test_s3_endpoint_that_never_answers_fails_within_30_s(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(100)], daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    started = time.monotonic()
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        read_manifest("s3://bucket/dataset")
    assert time.monotonic() - started < 30
    server.close()


# ----------------------------------------------------------------------------- part 3: damaged shards
def _damage(uri: str, how: str) -> str:
    """Damage the first train shard: ``missing``, ``truncated`` or ``flipped``; returns its path."""
    shard = read_manifest(uri).shards_of("train")[0].path
    path = Path(uri) / shard
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_first_image_byte(uri)
    return shard


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_missing_or_truncated_shard_fails_before_ray(dataset, checkpoint, tmp_path, how):
    shard = _damage(dataset, how)
    jobs = {
        "ray_jobs.train": ("--data", dataset, "--model", "resnet18", "--epochs", "1", "--image-size", "28",
                           "--storage", str(tmp_path / "runs"), "--name", "damaged"),
        "ray_jobs.evaluate": ("--checkpoint", checkpoint, "--data", dataset, "--split", "train",
                              "--out", str(tmp_path / "eval")),
        "ray_jobs.predict": ("--checkpoint", checkpoint, "--input", dataset, "--output", str(tmp_path / "pred")),
    }
    for module, args in jobs.items():
        started = time.monotonic()
        out = run_job(module, *args)
        seconds = time.monotonic() - started
        assert out.returncode == 2, (module, out.stdout + out.stderr)
        assert shard in out.stderr and "--verify" in out.stderr, (module, out.stderr)
        assert "Traceback" not in out.stderr
        assert seconds < 15, f"{module} took {seconds:.1f} s to refuse a {how} shard"
    assert not (tmp_path / "pred").exists() and not (tmp_path / "eval").exists()


@pytest.mark.ray
def test_flipped_byte_stops_training_once_naming_the_shard(ray_cluster, dataset, tmp_path):
    from ray_jobs.classifier.driver import fit

    shard = _damage(dataset, "flipped")
    starts = tmp_path / "starts"
    cfg = TrainConfig(name="flipped", storage=str(tmp_path / "runs"), model="resnet18", loss="ce", epochs=2,
                      num_workers=2, fault_injection={"start_log": str(starts)}, max_failures=2,
                      data=DataSection(uri=dataset, image_size=28, augment="none", batch_size=16))
    with pytest.raises(DataError) as info:
        fit(cfg)
    message = str(info.value)
    assert shard in message and "--verify" in message and "cannot decode image" in message
    assert "epoch 0" in message
    assert starts.read_text().split() in (["0", "1"], ["1", "0"])  # one attempt: no retries
    assert json.loads((tmp_path / "runs" / "flipped" / "result.json").read_text())["status"] == "data_error"


@pytest.mark.ray
def test_flipped_byte_in_evaluate_and_predict_names_the_shard(ray_cluster, dataset, checkpoint, tmp_path):
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.classifier.prediction import predict

    shard = _damage(dataset, "flipped")
    with pytest.raises(DataError) as info:
        evaluate(checkpoint, dataset, "train", str(tmp_path / "eval"))
    assert shard in str(info.value) and "--verify" in str(info.value)
    with pytest.raises(DataError) as info:
        predict(checkpoint, dataset, str(tmp_path / "pred"), split="train")
    assert shard in str(info.value) and "--verify" in str(info.value)
    assert not any((tmp_path / "pred").glob("**/*.parquet"))
