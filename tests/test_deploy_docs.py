"""The documented commands, read as a user reads them (README.md, cluster/README.md, the usage lines at
the top of the cluster files, the RayJob's entrypoint), run as far as they can without Ray:

* every `ray job submit` runs in token mode: ``RAY_AUTH_MODE=token`` on the line or exported before
  it in the same block (a client sends its token only in token mode, and the cluster files'
  heads refuse a client without it);
* every job command (``python -m ray_jobs.<job> ...``) goes through the job's own parser
  (``get_args_parser``) and, where the job has one, its config loading with every check
  (``config_from_args``: presets, ``--set`` keys, the values' ranges), which is what the job does
  before it starts Ray. A preset that exits 2 as written (``configs/adsr_paper.yaml`` without
  ``pretrained``) fails here.

Placeholders in the docs: ``...`` stands for more arguments (dropped) and ``[--flag value]`` for
an optional part (checked both with and without it).
"""
from __future__ import annotations

import importlib
import re
import shlex

import pytest
import yaml

from conftest import REPO
from deploy_support import CLUSTER, shell_commands
from medbalance.errors import MedbalanceError

DOCS = [REPO / "README.md", CLUSTER / "README.md"]
# The image's copy of the repository (cluster/Dockerfile: WORKDIR, COPY . .); the RayJob's entrypoint
# names its files there.
IMAGE_WORKDIR = "/home/ray/medbalance/"


def bash_blocks() -> list[tuple[str, list[str]]]:
    """``(where, commands)`` for every ```bash block of the docs and the usage comment at the top
    of each cluster file (its ``#   command`` lines)."""
    blocks = []
    for doc in DOCS:
        for index, block in enumerate(re.findall(r"```bash\n(.*?)```", doc.read_text(), re.DOTALL)):
            blocks.append((f"{doc.relative_to(REPO)} block {index + 1}", shell_commands(f"```bash\n{block}```")))
    for path in sorted(CLUSTER.glob("*.yaml")):
        usage = "\n".join(m.group(1) for m in re.finditer(r"^#   (.*)$", path.read_text(), re.MULTILINE))
        blocks.append((f"{path.relative_to(REPO)} usage", shell_commands(f"```bash\n{usage}\n```")))
    return blocks


def test_every_ray_job_submit_runs_in_token_mode():
    submits = 0
    for where, commands in bash_blocks():
        exported: dict[str, str] = {}
        for command in commands:
            words = shlex.split(command, comments=True)
            if words[:1] == ["export"]:
                exported.update(w.split("=", 1) for w in words[1:] if "=" in w)
                continue
            prefix = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                prefix.update([words.pop(0).split("=", 1)])
            if words[:3] == ["ray", "job", "submit"]:
                submits += 1
                mode = {**exported, **prefix}.get("RAY_AUTH_MODE")
                assert mode == "token", f"{where}: `{command[:90]}...` runs without RAY_AUTH_MODE=token"
    assert submits >= 5, submits  # the command logs are there


def job_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, job module, argv)`` of every documented ``python -m ray_jobs.<job> ...``."""
    found = []
    for where, commands in bash_blocks():
        for command in commands:
            for match in re.finditer(r"python -m (ray_jobs\.\w+)((?:\s+(?!&&|\||;)\S+)*)", command):
                found.append((where, match.group(1), match.group(2)))
    rayjob = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())["spec"]["entrypoint"]
    match = re.fullmatch(r"python -m (ray_jobs\.\w+)(.*)", rayjob.strip(), re.DOTALL)
    assert match, rayjob
    found.append(("cluster/kuberay-rayjob.yaml entrypoint", match.group(1),
                  match.group(2).replace(IMAGE_WORKDIR, str(REPO) + "/")))
    return [(where, module, variant) for where, module, text in found for variant in argv_variants(text)]


def argv_variants(text: str) -> list[list[str]]:
    """The arguments of a documented command: with its ``[...]`` optional parts and without them;
    ``...`` dropped."""
    def words(part: str) -> list[str]:
        return [w for w in shlex.split(part) if w != "..."]

    without = words(re.sub(r"\[[^\]]*\]", " ", text))
    with_all = words(re.sub(r"\[([^\]]*)\]", r" \1 ", text))
    return [without] if without == with_all else [without, with_all]


JOB_COMMANDS = job_commands()


def test_the_docs_have_job_commands():
    modules = {module for _, module, _ in JOB_COMMANDS}
    assert {"ray_jobs.train", "ray_jobs.prepare", "ray_jobs.evaluate", "ray_jobs.sweep"} <= modules, modules
    assert any("adsr_paper.yaml" in " ".join(argv) for _, _, argv in JOB_COMMANDS)


@pytest.mark.parametrize("where,module,argv", JOB_COMMANDS,
                         ids=[f"{w}: {m} {' '.join(a)[:60]}" for w, m, a in JOB_COMMANDS])
def test_documented_job_command_parses_and_its_config_loads(where, module, argv, monkeypatch):
    """The job's own parser and config checks accept the command as written (run from the
    repository root, as the docs say); nothing starts Ray."""
    monkeypatch.chdir(REPO)
    job = importlib.import_module(module)
    assert hasattr(job, "get_args_parser"), f"{where}: {module} has no get_args_parser to check the command with"
    try:
        args = job.get_args_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `python -m {module} {' '.join(argv)}` exits {exc.code} in its parser")
    if hasattr(job, "config_from_args") and getattr(args, "command", "train") == "train":
        try:
            job.config_from_args(args)
        except MedbalanceError as exc:
            pytest.fail(f"{where}: `python -m {module} {' '.join(argv)}` exits 2: {exc}")
