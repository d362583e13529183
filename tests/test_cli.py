"""The command line: `medbalance <job>` (and `python -m ray_jobs <job>`), every job's --help,
--print-config without Ray, and no colour codes when output goes to a pipe."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
import yaml

import medbalance
from conftest import REPO

JOBS = ["prepare", "train", "evaluate", "predict", "sweep", "compare", "gan", "demo"]


def medbalance_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m ray_jobs ...``, the same entry as the ``medbalance`` console script."""
    return subprocess.run([sys.executable, "-m", "ray_jobs", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_console_script_and_version():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["medbalance"] == "ray_jobs.__main__:main"
    out = medbalance_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"medbalance {medbalance.__version__}"
    listing = medbalance_cli("--help").stdout
    assert all(f"  {job} " in listing for job in JOBS), listing
    unknown = medbalance_cli("trian")
    assert unknown.returncode == 2 and "unknown job 'trian'" in unknown.stderr


@pytest.mark.parametrize("job", JOBS)
def test_every_flag_has_help_and_the_description_is_whole(job, capsys):
    import importlib

    module = importlib.import_module(f"ray_jobs.{job}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: medbalance {job}"), out[:200]
    first = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    assert first in " ".join(out.split()), (first, out[:600])   # the docstring's whole first paragraph
    parser = module.get_args_parser() if hasattr(module, "get_args_parser") else None
    parsers = [parser] if parser else []
    if parser and parser._subparsers:
        parsers += list(parser._subparsers._group_actions[0].choices.values())
    for p in parsers:
        for action in p._actions:
            if action.dest not in ("help", "command"):
                assert action.help, f"{job}: {action.option_strings} has no help"


@pytest.mark.parametrize("args", [["train", "--config", "configs/demo.yaml", "--epochs", "3"],
                                  ["sweep", "--config", "configs/sweep-cws.yaml", "--trials", "5"],
                                  ["compare", "--config", "configs/compare-retina.yaml", "--seeds", "0", "1"],
                                  ["gan", "train", "--config", "configs/gcgan_paper.yaml", "--iterations", "7"]])
def test_print_config_prints_the_resolved_yaml_without_ray(args):
    # An address nothing answers: a job that tried to reach Ray would fail here.
    out = medbalance_cli(*args, "--print-config", env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    value = {"train": ("epochs", 3), "sweep": ("trials", 5), "compare": ("seeds", [0, 1]),
             "gan": ("iterations", 7)}[args[0]]
    assert resolved[value[0]] == value[1]


def test_output_to_a_pipe_gets_no_colour_codes():
    code = ("import os, sys\nfrom ray_jobs.runtime.cli import run_main\n"
            "sys.exit(run_main(lambda argv: print(os.environ.get('RAY_COLOR_PREFIX')) or 0, []))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "0"


@pytest.mark.parametrize("job, presets", [("train", ["demo", "adsr_paper", "lrf_paper"]),
                                          ("sweep", ["sweep-cws", "sweep-fafl"]), ("compare", ["compare-retina"]),
                                          ("gan", ["gcgan_paper"])])
def test_print_schema_describes_the_presets_and_refuses_a_typo(job, presets, capsys):
    import importlib
    import json

    import jsonschema

    module = importlib.import_module(f"ray_jobs.{job}")
    assert module.main((["train"] if job == "gan" else []) + ["--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for preset in presets:
        doc = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())
        assert not list(validator.iter_errors(doc)), (preset, [e.message for e in validator.iter_errors(doc)])
    assert list(validator.iter_errors({"epochz" if job != "gan" else "iteratons": 3}))   # unknown keys
