"""cluster/Dockerfile and .dockerignore, checked without building the image (no container engine or
registry is reachable here; cluster/README.md says so).

* The base image's Ray and Python are the pins: ``FROM rayproject/ray:<constraints.txt ray>-py<the
  requires-python floor>-gpu``; any drift between the three files fails.
* The image installs the pinned set: ``pip install -c constraints.txt`` with extras that exist, and
  every package that install asks for is pinned in constraints.txt.
* The image's own build-time check (Ray and Python equal the pins) runs here, in the venv that has
  the pins, as the shell in the image runs it.
* .dockerignore's patterns, matched as Docker matches them, keep the code, configs and pins in the
  build context and leave data, runs, the venv, git and the tests out.
* The CUDA build of the pinned torch and the NVIDIA driver branch it needs are the ones
  cluster/README.md ("Versions") and the Dockerfile name.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from deploy_support import CLUSTER, markdown_section, pinned, pyproject

DOCKERFILE = CLUSTER / "Dockerfile"
# The oldest driver branch each CUDA major version runs on (NVIDIA's CUDA toolkit release notes,
# "minor version compatibility": CUDA 12.x needs >= 525.60.13, CUDA 13.x >= 580).
DRIVER_BRANCH_FOR_CUDA = {12: 525, 13: 580}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as Docker reads them: comments dropped, ``\\``-continued lines
    joined (the backslash and the line break removed), ``(KEYWORD, arguments)``."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", "", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)]


def python_floor() -> tuple[int, int]:
    """pyproject.toml's ``requires-python`` floor, e.g. (3, 11)."""
    spec = pyproject()["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert match, f"requires-python = {spec!r}: expected '>=3.N'"
    return int(match.group(1)), int(match.group(2))


def test_base_image_is_the_pinned_ray_and_python():
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-gpu", froms[0].strip())
    assert match, f"FROM {froms[0]}: expected rayproject/ray:<ray version>-py3NN-gpu"
    assert match.group("ray") == pinned("ray"), f"image Ray {match.group('ray')} != constraints.txt ray=={pinned('ray')}"
    assert (int(match.group("py")), int(match.group("minor"))) == python_floor(), (
        f"image Python {match.group('py')}.{match.group('minor')} != requires-python floor {python_floor()}")
    ray_floor = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray["))
    assert ray_floor.endswith(f">={'.'.join(pinned('ray').split('.')[:2])}"), ray_floor  # floor = tested minor


def requirement_name(requirement: str) -> str:
    """The normalised package name of a requirement string ("ray[tune]>=2.60" -> "ray")."""
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_image_installs_the_pinned_set():
    runs = [args for keyword, args in instructions() if keyword == "RUN" and "pip install" in args]
    assert len(runs) == 1, runs
    install = re.search(r"pip install (?P<flags>[^&]*?)\"?\.\[(?P<extras>[\w,-]+)\]\"?", runs[0])
    assert install and "-c constraints.txt" in install.group("flags"), runs[0]
    project = pyproject()["project"]
    extras = install.group("extras").split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras
    assert "dicom-jpeg" in extras  # compressed DICOM decodes in the image
    asked = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    pins = {requirement_name(line) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    unpinned = sorted({requirement_name(r) for r in asked} - pins)
    assert not unpinned, f"the image would install these unpinned: {unpinned} (pin them in constraints.txt)"


def test_images_own_version_check_passes_with_the_pins(tmp_path):
    """The build's ``python -c`` check, run by ``sh -c`` as the image's shell runs it, in a folder with
    the two files it reads (the image's WORKDIR has them), with this venv's Python and Ray (the pins);
    and the same check failing when constraints.txt pins another Ray."""
    run = next(args for keyword, args in instructions() if keyword == "RUN" and "pip install" in args)
    check = run.split("&&", 1)[1].strip()
    assert check.startswith("python -c "), check
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name, constraints in (("pins", (REPO / "constraints.txt").read_text()), ("drift", "ray==0.0.1\n")):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
        (workdir / "constraints.txt").write_text(constraints)
        out = subprocess.run(["/bin/sh", "-c", check], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=120)
        if name == "pins":
            assert out.returncode == 0, out.stderr[-2000:]
        else:
            assert out.returncode != 0 and "0.0.1" in out.stderr, out.stderr[-2000:]


def dockerignore_patterns() -> list[str]:
    """.dockerignore's patterns (comments and blank lines dropped; no ``!`` exceptions used)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line.strip("/") for line in lines if line and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"
    return patterns


def docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker matches it against a path from the context root
    (Go's filepath.Match, plus ``**`` for any number of folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def build_context() -> list[str]:
    """The files `docker build .` sends from the repository root: a path is left out when it or a
    folder above it matches a pattern."""
    patterns = [docker_pattern(p) for p in dockerignore_patterns()]
    ignored = lambda rel: any(p.fullmatch(rel) for p in patterns)  # noqa: E731
    files = []
    for root, dirs, names in os.walk(REPO):
        base = Path(root).relative_to(REPO).as_posix()
        rel = (lambda name: name) if base == "." else (lambda name: f"{base}/{name}")
        dirs[:] = [d for d in dirs if not ignored(rel(d))]
        files += [rel(n) for n in names if not ignored(rel(n))]
    return files


def test_build_context_holds_the_code_and_leaves_data_runs_and_venv_out():
    files = build_context()
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "configs/adsr_paper.yaml", "ray_jobs/train.py"):
        assert needed in files, f"{needed} is not in the build context"
    for package in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert any(f.startswith(f"{name}/") for f in files), f"package {name} is not in the build context"
    left_out = ("data/", ".venv/", ".git/", "runs/", "tests/", "out/")
    assert not [f for f in files if f.startswith(left_out)], "data, venv, git, runs or tests in the context"
    assert not [f for f in files if f.endswith((".npz", ".parquet", ".pt", ".pth", ".pyc"))]
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 5_000_000, f"{size} bytes: something big is in the build context"


def test_cuda_build_and_driver_requirement_are_documented():
    """The pinned torch's CUDA version and the driver branch it needs appear in cluster/README.md's
    "Versions" section (with the Ray, Python and KubeRay versions the files assume) and in the
    Dockerfile; so do the commands to check a node's driver."""
    torch = pytest.importorskip("torch")
    assert torch.__version__.split("+")[0] == pinned("torch")
    cuda = torch.version.cuda
    assert cuda, "the pinned torch is a CUDA build (the image's GPU nodes need it)"
    branch = DRIVER_BRANCH_FOR_CUDA[int(cuda.split(".")[0])]
    versions = markdown_section((CLUSTER / "README.md").read_text(), "Versions")
    dockerfile = DOCKERFILE.read_text()
    for text, where in ((versions, "cluster/README.md, Versions"), (dockerfile, "cluster/Dockerfile")):
        assert f"CUDA {cuda}" in text and f"R{branch}" in text, f"{where}: CUDA {cuda} / R{branch} not named"
    major, minor = python_floor()
    for fact in (f"Ray {pinned('ray')}", f"Python {major}.{minor}", f"torch {pinned('torch')}", "KubeRay",
                 "nvidia-smi"):
        assert fact in versions, f"cluster/README.md, Versions: {fact!r} not named"
