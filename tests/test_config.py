"""Typed config values (ray_jobs.classifier.config, runtime.configs + runtime.config_checks), the paper presets and the authors' schedule.

Every bad value is a ConfigError naming the key, the value and where it came from, raised while the
config is built: through the CLI that is exit status 2 before Ray starts.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import OptimSection, TrainConfig
from ray_jobs.classifier.optim import lr_factor
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.cli import run_main
from ray_jobs.train import config_from_args, get_args_parser

from conftest import REPO

CONFIGS = REPO / "configs"


def load(*overrides: str, path: str | None = str(CONFIGS / "demo.yaml")) -> TrainConfig:
    return config_lib.load_config(TrainConfig, path, list(overrides))


def test_exponent_without_a_dot_is_a_float():
    cfg = load("optim.lr=1e6", "optim.weight_decay=5E-4", "optim.warmup_epochs=1", "epochs=3.0")
    assert cfg.optim.lr == 1000000.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0005
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    # the same through the job's own argument parser (flags and --set)
    args = get_args_parser().parse_args(["--data", "d", "--set", "optim.lr=1e6", "--loss-params", "weight=1e-3"])
    cfg = config_from_args(args)
    assert cfg.optim.lr == 1000000.0 and cfg.loss_params == {"weight": 0.001}


@pytest.mark.parametrize("override, message", [
    ("epochs=two", r"^epochs = 'two' \(from --set epochs=two\): expected an integer >= 1$"),
    ("loss=nope", r"^loss = 'nope' \(from --set loss=nope\): expected one of .*cws.*fafl"),
    ("data.image_size=-3", r"^data.image_size = -3 \(from --set data.image_size=-3\): expected an integer >= 8$"),
    ("optim.lr=0", r"optim.lr = 0 .*expected a number > 0"),
    ("optim.lr=fast", r"optim.lr = 'fast' .*expected a number > 0"),
    ("optim.momentum=1.0", r"optim.momentum = 1.0 .*expected a number >= 0 and < 1"),
    ("epochs=0", r"epochs = 0 .*expected an integer >= 1"),
    ("data.batch_size=0", r"data.batch_size = 0 .*>= 1"),
    ("num_workers=1.5", r"num_workers = 1.5 .*expected an integer >= 1"),
    ("use_gpu=maybe", r"use_gpu = 'maybe' .*expected true or false"),
    ("model=resnet5", r"model = 'resnet5' .*expected one of .*adsr_resnet18"),
    ("data.augment=heavy", r"data.augment = 'heavy' .*one of adsr, adsr_paper, lrf, light, none"),
    ("data.sampling=oversample", r"data.sampling .*one of none, class_balanced, sqrt"),
    ("optim.schedule=linear", r"optim.schedule .*one of cosine, step, multistep, adsr_authors, none"),
    ("optim.name=lbfgs", r"optim.name .*one of sgd, adam, adamw"),
    ("amp=fp8", r"amp = 'fp8' .*one of auto, bf16, fp16, off"),
    ("data.channels=2", r"data.channels = 2 .*one of 1, 3"),
    ("data.normalize=z", r"data.normalize .*one of imagenet, dataset"),
    ("optim.milestones=[10,x]", r"optim.milestones .*a list of integers"),
    ("optim.clip_grad_norm=-1", r"optim.clip_grad_norm = -1 .*a number > 0"),
    ("loss_params.wieght=2", r"loss_params \(from --set loss_params.wieght=2\): loss 'cws' has no option.*weight=1.0"),
    ("loss_params.weight=heavy", r"loss_params.weight = 'heavy' .*expected a number"),
    ("model_kwargs={gsa: faithful, depth: 3}", r"model_kwargs .*model 'adsr_resnet18' has no option.*depth"),
    ("name=", r"name = '' .*not empty"),
])
def test_bad_values_name_the_key_and_what_is_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load(override)


def test_values_yaml_reads_oddly_are_still_understood():
    cfg = load("amp=off", "name=2024", "optim.clip_grad_norm=null", "use_gpu=true", "optim.milestones=[5, 9]")
    assert cfg.amp == "off" and cfg.name == "2024" and cfg.optim.clip_grad_norm is None
    assert cfg.use_gpu is True and cfg.optim.milestones == [5, 9]


def test_yaml_values_are_checked_and_name_their_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  momentum: 2\n")
    with pytest.raises(ConfigError, match=rf"optim.momentum = 2 \(from {bad}\): expected a number >= 0 and < 1"):
        load(path=str(bad))
    bad.write_text("optim:\n  lr: 1e-3\n")
    assert load(path=str(bad)).optim.lr == 0.001


def test_every_preset_and_the_defaults_are_accepted():
    assert config_lib.from_dict(TrainConfig, {}) == TrainConfig()
    from ray_jobs.gcgan.config import GanConfig
    from ray_jobs.sweeps.config import CompareConfig, SweepConfig
    from ray_jobs.sweeps.search_space import parse_space

    kinds = {"sweep-": SweepConfig, "compare-": CompareConfig, "gcgan": GanConfig}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cls = next((c for prefix, c in kinds.items() if path.name.startswith(prefix)), TrainConfig)
        overrides = ["pretrained=scratch"] if path.name == "adsr_paper.yaml" else []
        cfg = config_lib.load_config(cls, str(path), overrides)
        if cls is SweepConfig:  # the search space too: every end of every range builds a valid TrainConfig
            assert parse_space(cfg.space, cfg.base)


def test_cli_bad_value_exits_2_before_ray_starts(tmp_path, capsys):
    """In-process for three cases; one real subprocess proves that no Ray session was started."""
    for override, key in (("loss=nope", "loss"), ("data.image_size=-3", "data.image_size"),
                          ("optim.lr=0", "optim.lr")):
        assert run_main(__import__("ray_jobs.train", fromlist=["main"]).main,
                        ["--data", str(tmp_path), "--set", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key} = ") and "Traceback" not in err
    ray_tmp = tmp_path / "raytmp"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--data", str(tmp_path), "--set", "epochs=two"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("error: epochs = 'two' (from --set epochs=two): expected an integer >= 1")
    assert not ray_tmp.exists() or not any(ray_tmp.iterdir())  # Ray never started


# ----------------------------------------------------------------------------- presets


def test_adsr_paper_needs_weights_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match=r"(?s)pretrained = 'required' \(from .*adsr_paper.yaml\).*"
                                          r"torchvision.models.resnet50\(weights='IMAGENET1K_V1'\).*pretrained=scratch"):
        load(path=str(CONFIGS / "adsr_paper.yaml"))
    cfg = load("pretrained=scratch", path=str(CONFIGS / "adsr_paper.yaml"))
    assert cfg.pretrained_path() is None
    assert (cfg.model, cfg.model_kwargs, cfg.epochs, cfg.amp) == ("adsr_resnet50", {"paper_exact": True}, 150, "off")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.schedule) == (
        "sgd", 0.002, 0.9, 1e-4, "adsr_authors")
    assert (cfg.data.augment, cfg.data.image_size, cfg.data.total_batch_size, cfg.data.batch_size) == (
        "adsr_paper", 224, 32, 32)
    cfg = load("pretrained=/w/resnet50.pth", "num_workers=4", path=str(CONFIGS / "adsr_paper.yaml"))
    assert cfg.data.batch_size == 8 and cfg.pretrained_path() == "/w/resnet50.pth"  # 32 split over 4 workers
    with pytest.raises(ConfigError, match=r"data.total_batch_size = 32 .*does not split evenly over num_workers = 3"):
        load("pretrained=scratch", "num_workers=3", path=str(CONFIGS / "adsr_paper.yaml"))


def test_lrf_paper_is_the_authors_run():
    cfg = load(path=str(CONFIGS / "lrf_paper.yaml"))
    assert cfg.loss == "fafl" and cfg.loss_params == {"m": 1.0, "alpha0": 0.5, "beta0": 3.0}
    assert (cfg.data.normalize, cfg.data.image_size, cfg.data.batch_size, cfg.data.augment) == ("dataset", 299, 8, "lrf")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.step_size,
            cfg.optim.gamma, cfg.epochs) == ("adam", 1e-4, 1e-5, "step", 20, 0.5, 100)
    assert cfg.model_kwargs == {"drop_rate": 0.5, "init": "authors"}


def test_adsr_authors_schedule_matches_their_adjust_learning_rate():
    cfg = OptimSection(schedule="adsr_authors", warmup_epochs=0)

    def theirs(epoch: int, base: float = 1.0) -> float:  # their main_loss.py, written out by hand
        lr = base
        if epoch <= 9:
            lr = base + base * epoch / 10.0
        if epoch >= 100:
            lr /= 10
        if epoch >= 150:
            lr /= 10
        return lr

    for epoch in (0, 1, 5, 9, 10, 50, 99, 100, 120, 149, 150, 160):
        for fraction in (0.0, 0.5, 0.99):  # constant within an epoch, as theirs (set once per epoch)
            assert lr_factor(epoch + fraction, cfg, 150) == pytest.approx(theirs(epoch))
