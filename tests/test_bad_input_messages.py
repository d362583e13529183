"""Bad input gets one clear line: a CSV row without a label, a failed first run, a checkpoint cut
off mid-copy, a decompression bomb, an S3 endpoint that never answers."""
from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

from medbalance.errors import ConfigError, DataError, StorageError
from ray_jobs.runtime.checkpoint import save_checkpoint
from ray_jobs.runtime.run_dir import RunDir
from shards import ingest, read_manifest, storage

from safety_support import image_folder, run_job


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
