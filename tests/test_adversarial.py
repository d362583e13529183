"""Hostile but plausible inputs, as a careful user or a broken disk makes them: every job that writes
or deletes meets at least one here, and each case keeps what it must not lose (checksums before and
after).

The guarded delete (``shards/deletion.py``) first, refusal by refusal; then the jobs: ingest and
``gan synthesize --overwrite`` (manifests that point outside, symlinks, version chains),
``predict --overwrite`` (``_SUCCESS.json`` entries), compare (method names that share a folder,
trials trained with another config), sweep (statuses, seeds, a failure before the first trial, a
sampler that raises), and the folder flags of evaluate, train, GAN train and quality.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml
from PIL import Image

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.runtime.checkpoint import save_checkpoint
from ray_jobs.runtime.configs import to_dict
from shards import ingest, read_manifest, verify
from shards.deletion import OutputTree, UnsafeDeletion, check_outside, location, relative_entry
from shards.references import included_datasets, referenced_files

from conftest import REPO

CLASSES = ["0", "1", "2", "3", "4"]


# ----------------------------------------------------------------------------- helpers
def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks not followed), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_job(module: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """A job as a user runs it, in its own process (``env`` adds to a copy of this one's)."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(out: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, no traceback, one ``error:`` line holding ``words``."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), out.stderr[-3000:]


@pytest.fixture
def base(small_npz, tmp_path) -> Path:
    ingest(str(small_npz), str(tmp_path / "base"), workers=1)
    return tmp_path / "base"


@pytest.fixture
def gan_checkpoint(base, tmp_path) -> str:
    """A real (untrained) GCGAN checkpoint of class "4", made without Ray."""
    from gan import Generator

    folder = tmp_path / "gan-ckpt"
    folder.mkdir()
    config = {"image_size": 32, "nz": 8, "ngf": 4, "data": str(base), "sample_bn_mode": "train"}
    save_checkpoint({"g_ema": Generator(32, 8, 4).state_dict(), "config": config, "class_name": "4",
                     "iteration": 1}, str(folder))
    return str(folder)


@pytest.fixture
def classifier_checkpoint(tmp_path) -> str:
    """A real (untrained) resnet18 checkpoint, made without Ray."""
    from models import create_model

    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = TrainConfig(model="resnet18", data=DataSection(image_size=16))
    save_checkpoint({"model": create_model("resnet18", num_classes=5).state_dict(), "config": to_dict(cfg),
                     "class_names": CLASSES, "epoch": 0}, str(folder))
    return str(folder)


# ----------------------------------------------------------------------------- the guarded delete
@pytest.mark.parametrize("entry", ["/etc/passwd", "../victim", "a/../../victim", "a/..", "", ".", "./a", "a//b",
                                   "a\\..\\b", "a\x00b", "s3://bucket/x", None, 7, ["a"]])
def test_entries_read_from_disk_must_be_plain_relative_paths(entry):
    with pytest.raises(UnsafeDeletion, match="_SUCCESS.json"):
        relative_entry(entry, "out/_SUCCESS.json")


def test_relative_entries_pass_unchanged():
    assert relative_entry("predictions-x/part-0.parquet", "w") == "predictions-x/part-0.parquet"
    assert relative_entry("shards-1", "w") == "shards-1"


def test_output_tree_refuses_symlinks_out_the_root_and_protected_data(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "f").write_text("x")
    victim.mkdir()
    (victim / "precious").write_text("keep")
    (out / "escape").symlink_to(victim)
    (out / "self").symlink_to(out)
    (out / "shared").mkdir()
    before = checksums(tmp_path)
    fs = pafs.LocalFileSystem()
    tree = OutputTree(fs, str(out), str(out))
    with pytest.raises(UnsafeDeletion, match="outside"):
        tree.delete(["mine", "escape"], where="test")        # every entry is checked before any delete
    with pytest.raises(UnsafeDeletion, match="outside"):
        tree.delete(["self"], where="test")                  # the output itself, through a link
    with pytest.raises(UnsafeDeletion, match="still references"):
        tree.delete(["shared"], where="test", protect=[location(fs, str(out / "shared" / "a.parquet"))])
    assert checksums(tmp_path) == before and (out / "mine" / "f").exists()
    tree.delete(["mine", "gone-already"], where="test")
    assert not (out / "mine").exists() and (victim / "precious").read_text() == "keep"


@pytest.mark.parametrize("how", ["same", "inside", "contains", "symlink"])
def test_check_outside_sees_through_paths_and_links(tmp_path, how):
    fs = pafs.LocalFileSystem()
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    output = {"same": data, "inside": data / "v2", "contains": tmp_path, "symlink": tmp_path / "link"}[how]
    with pytest.raises(UnsafeDeletion, match="overlaps"):
        check_outside(str(output), location(fs, str(output)), [(str(data), location(fs, str(data)))])
    check_outside(str(tmp_path / "elsewhere"), location(fs, str(tmp_path / "elsewhere")),
                  [(str(data), location(fs, str(data)))])


# ----------------------------------------------------------------------------- ingest --overwrite
def test_ingest_overwrite_refuses_a_manifest_path_out_of_the_dataset(small_npz, base, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x").write_text("a sibling's data")
    manifest = json.loads((base / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../victim/x"
    (base / "manifest.json").write_text(json.dumps(manifest))
    before = checksums(tmp_path)
    with pytest.raises(UnsafeDeletion, match=r"\.\./victim/x"):
        ingest(str(small_npz), str(base), workers=1, overwrite=True)
    assert checksums(tmp_path) == before, "a refused overwrite must leave everything as it was"


def test_ingest_overwrite_never_follows_a_shard_folder_symlink_out(small_npz, base, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train-00000.parquet").write_text("not ours")
    (base / "shards-evil").symlink_to(outside)          # an unlisted shards-* folder that is a link
    before = checksums(tmp_path)
    with pytest.raises(UnsafeDeletion, match="shards-evil"):
        ingest(str(small_npz), str(base), workers=1, overwrite=True)
    assert checksums(tmp_path) == before


# ----------------------------------------------------------------------------- gan synthesize
def test_synthesize_refuses_to_overwrite_a_dataset_its_version_includes(gan_checkpoint, base, tmp_path):
    from ray_jobs.gcgan.synthesize import synthesize

    v1 = tmp_path / "v1"
    synthesize(gan_checkpoint, str(v1), per_class=2, data=str(base))
    v2 = tmp_path / "v2"
    synthesize(gan_checkpoint, str(v2), per_class=2, data=str(v1))   # a chain: v2 -> v1 -> base
    assert [u for u, _ in included_datasets(str(v2))] == [str(v2), str(v1), str(base)]
    (tmp_path / "link").symlink_to(base)
    before = checksums(tmp_path)
    for output, data in ((base, v1), (tmp_path / "link", v1), (base, v2), (v1, v2), (base / "inner", v2),
                         (tmp_path, v1)):
        with pytest.raises(ConfigError, match="which the new version includes"):
            synthesize(gan_checkpoint, str(output), per_class=2, data=str(data), overwrite=True)
        assert checksums(tmp_path) == before, (output, data)
    assert verify(str(v2)).rows == verify(str(base)).rows + 4
    protected = referenced_files(read_manifest(str(v2)), str(v2))
    assert {str(base / s.path) for s in read_manifest(str(base)).shards} <= {p for _, p in protected}


# ----------------------------------------------------------------------------- predict --overwrite
@pytest.mark.ray
@pytest.mark.parametrize("entry", ["../victim/x", "ABSOLUTE", "predictions-link/part.parquet"])
def test_predict_overwrite_refuses_success_entries_out_of_the_output(ray_cluster, classifier_checkpoint,
                                                                     tmp_path, entry):
    from ray_jobs.classifier.prediction import predict

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(images / f"img{i}.png")
    out, victim = tmp_path / "out", tmp_path / "victim"
    predict(classifier_checkpoint, str(images), str(out))
    victim.mkdir()
    (victim / "x").write_text("a sibling's data")
    (out / "predictions-link").symlink_to(victim)
    entry = str(victim / "x") if entry == "ABSOLUTE" else entry
    success = json.loads((out / "_SUCCESS.json").read_text())
    success["files"].append(entry)
    (out / "_SUCCESS.json").write_text(json.dumps(success))
    before = checksums(tmp_path)
    with pytest.raises(UnsafeDeletion, match="(?i)nothing was deleted"):
        predict(classifier_checkpoint, str(images), str(out), overwrite=True)
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("job, flag", [("ray_jobs.predict", "--output"), ("ray_jobs.evaluate", "--out"),
                                       ("ray_jobs.train", "--storage"), ("ray_jobs.prepare", "--output")])
def test_a_file_given_as_a_folder_is_one_line(classifier_checkpoint, small_npz, base, tmp_path, job, flag):
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    target = str(afile / "sub") if job == "ray_jobs.train" else str(afile)
    args = {"ray_jobs.predict": ["--checkpoint", classifier_checkpoint, "--input", str(base), "--output", target],
            "ray_jobs.evaluate": ["--checkpoint", classifier_checkpoint, "--data", str(base), "--out", target],
            "ray_jobs.train": ["--data", str(base), "--storage", target, "--epochs", "1"],
            "ray_jobs.prepare": ["--input", str(small_npz), "--output", target]}[job]
    out = run_job(job, *args)
    one_error_line(out, flag, "file")
    assert afile.read_text() == "mine"


def test_gan_train_and_quality_refuse_a_file_as_folder(base, tmp_path):
    from ray_jobs.gcgan.config import GanConfig
    from ray_jobs.gcgan.driver import fit_classes
    from ray_jobs.gcgan.quality_report import quality

    afile = tmp_path / "a-file"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match="--storage .* is a file"):
        fit_classes(GanConfig(data=str(base), storage=str(afile), image_size=32, iterations=1), resume="auto")
    with pytest.raises(ConfigError, match="--out .* is a file"):
        quality(str(base), str(afile), extractor=str(afile))
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("key, value", [("nz", 0), ("lr", -0.1), ("lr", 5.0), ("ema_decay", 1.5),
                                        ("keep_checkpoints", 0), ("cpus_per_worker", 0.0), ("seed", -1)])
def test_gan_config_ranges(key, value):
    from ray_jobs.gcgan.config import GanConfig
    from ray_jobs.runtime.configs import load_config

    with pytest.raises(ConfigError, match=rf"^{key} = {value!r}.*expected"):
        GanConfig(data="runs/data/x", **{key: value}).check()
    with pytest.raises(ConfigError, match=rf"^{key} = {value!r} \(from --set {key}={value}\): expected"):
        load_config(GanConfig, overrides=[f"{key}={value}"])


# ----------------------------------------------------------------------------- compare
def test_compare_refuses_method_names_that_share_a_folder(base, tmp_path):
    from ray_jobs import compare

    preset = tmp_path / "compare.yaml"
    preset.write_text(yaml.safe_dump({
        "methods": {"r18 ce": {"model": "resnet18", "loss": "ce"}, "r18_ce": {"model": "resnet18", "loss": "fafl"}},
        "seeds": [0], "base": {"epochs": 1, "data": {"uri": str(base), "image_size": 16}}}))
    with pytest.raises(ConfigError, match=r"'r18 ce' and 'r18_ce' would train in the same folder"):
        compare.main(["--config", str(preset), "--storage", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_compare_checks_each_trial_config_before_the_table(base, tmp_path):
    from ray_jobs.runtime.run_dir import RunDir
    from ray_jobs.sweeps import comparison as compare
    from ray_jobs.sweeps import tuning
    from ray_jobs.sweeps.config import CompareConfig

    cfg = CompareConfig(methods={"ce": {"loss": "ce"}, "fafl": {"loss": "fafl"}}, seeds=[0],
                        storage=str(tmp_path), name="c")
    cfg.base.data.uri = str(base)
    overlays = compare.check_compare(cfg)
    folder = RunDir(cfg.storage, cfg.name)
    rows = [{"method": m, "seed": 0, "trial_id": f"t{i}", "status": "finished"} for i, m in enumerate(cfg.methods)]
    trials = tmp_path / "c" / tuning.TRIALS_DIR
    for method in cfg.methods:   # as two trials would save them: each with its own method
        built = tuning.trial_config({"method": method, "seed": 0}, to_dict(cfg.base), overlays, str(trials), "t")
        (trials / f"{method}-seed0").mkdir(parents=True)
        (trials / f"{method}-seed0" / "config.yaml").write_text(yaml.safe_dump(to_dict(built)))
    compare.check_trial_configs(cfg, folder, overlays, rows)
    saved = yaml.safe_load((trials / "fafl-seed0" / "config.yaml").read_text())
    saved["loss"] = "ce"                       # fafl's folder holds a run trained with ce
    (trials / "fafl-seed0" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"method 'fafl' seed 0 \(loss: 'ce' instead of 'fafl'\)"):
        compare.check_trial_configs(cfg, folder, overlays, rows)


# ----------------------------------------------------------------------------- sweep
def sweep_preset(path: Path, data: Path, **over) -> str:
    doc = {"name": "s", "trials": 2, "seed": 0, "status_interval": 30, "metric": "val_macro_f1",
           "search": "random", "scheduler": {"name": "none"},
           "space": {"epochs": {"type": "choice", "values": [1, 2]}},
           "points_to_evaluate": [{"epochs": 1}, {"epochs": 2}],
           "base": {"model": "resnet18", "loss": "ce", "epochs": 2, "num_workers": 1,
                    "data": {"uri": str(data), "image_size": 16, "augment": "none", "batch_size": 8}}}
    doc.update(over)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1.5"])
def test_sweep_seed_is_checked_before_ray_and_before_anything_is_written(base, tmp_path, seed):
    from ray_jobs import sweep

    preset = sweep_preset(tmp_path / "sweep.yaml", base)
    with pytest.raises(ConfigError, match="seed"):
        sweep.main(["--config", preset, "--storage", str(tmp_path / "runs"), "--set", f"seed={seed}"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_a_sweep_the_cluster_cannot_run_leaves_nothing_and_the_name_stays_usable(ray_cluster, base, tmp_path):
    from ray_jobs import sweep

    preset = sweep_preset(tmp_path / "sweep.yaml", base)
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="64 worker"):    # found once Ray says what the cluster holds
        sweep.main(["--config", preset, "--storage", str(runs), "--num-workers", "64"])
    assert not (runs / "s").exists() or not any((runs / "s").iterdir()), list((runs / "s").iterdir())
    with pytest.raises(ConfigError, match="has no sweep to resume"):   # nothing saved the bad value
        sweep.main(["--config", preset, "--storage", str(runs), "--resume"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_without_scheduler_reports_trials_that_ran_their_own_epochs_as_finished(ray_cluster, base,
                                                                                        tmp_path, capsys):
    from ray_jobs import sweep

    runs = tmp_path / "runs"
    assert sweep.main(["--config", sweep_preset(tmp_path / "sweep.yaml", base), "--storage", str(runs)]) == 0
    with open(runs / "s" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["epochs_run"]), r["status"]) for r in rows) == [(1, "finished"), (2, "finished")], rows
    printed = capsys.readouterr()
    assert "stopped early by ASHA" not in printed.out + printed.err
    assert "2 finished, 0 stopped early, 0 failed" in printed.out + printed.err


@pytest.mark.ray
def test_a_sampler_error_ends_the_sweep_with_one_line_and_leaves_nothing(ray_cluster, base, tmp_path):
    preset = sweep_preset(tmp_path / "sweep.yaml", base, search="tpe", points_to_evaluate=[])
    script = ("import sys, optuna\n"
              "def boom(*a, **k):\n    raise ValueError('sampler exploded')\n"
              "optuna.samplers.TPESampler.sample_relative = boom\n"
              "optuna.samplers.TPESampler.sample_independent = boom\n"
              "from ray_jobs.runtime.cli import run_main\nfrom ray_jobs.sweep import main\n"
              "sys.exit(run_main(main))\n")
    env = {k: v for k, v in os.environ.items()}
    env["RAY_ADDRESS"] = ray_cluster["address"]
    out = subprocess.run([sys.executable, "-c", script, "--config", preset, "--storage", str(tmp_path / "runs")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    one_error_line(out, "sampler exploded")
    folder = tmp_path / "runs" / "s"
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def test_ray_startup_timeout_is_one_line_with_advice():
    from ray_jobs.runtime.ray_setup import start_failure

    problem = start_failure(Exception("The current node timed out during startup. This could happen because "
                                      "some of the raylet failed to startup"), None)
    assert "did not start in time" in problem and "free the machine" in problem and "\n" not in problem
    assert "RAY_ADDRESS=1.2.3.4:6379" in start_failure(ConnectionError("refused"), "1.2.3.4:6379")
    assert start_failure(ValueError("something else"), None) is None


# ----------------------------------------------------------------------------- after the switch-over
def test_a_failure_after_the_manifest_is_written_keeps_the_new_dataset(small_npz, base, tmp_path, monkeypatch):
    """An object store that stores the manifest but times out answering (or a signal after the
    rename): abort() must not delete the shards the manifest on disk now lists."""
    from shards import storage as storage_module
    from shards.writer import ShardWriter

    real_write = storage_module.write_bytes_atomic

    def write_then_fail(fs, path, data, uri):
        real_write(fs, path, data, uri)
        if path.endswith("manifest.json"):
            raise TimeoutError("the PUT landed but the answer timed out")

    writer = ShardWriter(str(tmp_path / "out"), CLASSES)
    writer.add({"image": b"\x89PNG", "height": 1, "width": 1, "channels": 3, "label": 0, "split": "train",
                "source": "a.png", "synthetic": False, "sha256": "0" * 64})
    monkeypatch.setattr(storage_module, "write_bytes_atomic", write_then_fail)
    with pytest.raises(TimeoutError):
        writer.publish({})
    writer.abort()
    manifest = read_manifest(str(tmp_path / "out"))
    assert all((tmp_path / "out" / s.path).exists() for s in manifest.shards)


def test_success_json_may_list_only_prediction_files():
    from ray_jobs.classifier.prediction import _success_files

    assert _success_files({"files": ["predictions-1/part-0.parquet"]}, "o/_SUCCESS.json") == ["predictions-1/part-0.parquet"]
    for entry in ("_SUCCESS.json", "report.csv", "predictions-1", "other/x.parquet"):
        with pytest.raises(UnsafeDeletion, match="nothing was deleted"):
            _success_files({"files": [entry]}, "o/_SUCCESS.json")


@pytest.mark.ray
def test_sigterm_handling_survives_ray_init(ray_cluster):
    """ray.init installs its own SIGTERM handler; the job's (clean-up, exit 143) is put back."""
    code = ("import signal\nfrom ray_jobs.runtime import cli\nfrom ray_jobs.runtime.ray_setup import init_ray\n"
            "signal.signal(signal.SIGTERM, cli._on_sigterm)\ninit_ray()\n"
            "print(signal.getsignal(signal.SIGTERM) is cli._on_sigterm)\n")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]
