"""The house layout, read from the source with ``ast`` (every import, function-local ones too).

Layers, lowest first: ``medbalance``; the domain packages ``shards``, ``models``, ``losses``,
``metrics``, ``gan`` (each imports only itself and ``medbalance``); ``ray_jobs.runtime`` (with
``ray_jobs.runtime.resources``); ``ray_jobs.classifier``; ``ray_jobs.gcgan`` and ``ray_jobs.sweeps``; the
jobs at the top of ``ray_jobs/``. A module imports its own layer or lower ones, never a job.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("medbalance", "shards", "models", "losses", "metrics", "gan", "ray_jobs")
JOBS = {"prepare", "train", "evaluate", "predict", "export", "demo", "sweep", "compare", "gan"}
# What each part of ray_jobs may import from ray_jobs (besides itself).
ALLOWED = {"runtime": {"runtime"}, "classifier": {"runtime"}, "gcgan": {"runtime", "classifier"},
           "sweeps": {"runtime", "classifier"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def part(module: str) -> str:
    """``ray_jobs.<part>`` of a ray_jobs module (a job's own name for a job)."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_layers_import_downwards_and_no_job_imports_a_job():
    wrong = []
    for module, targets in graph().items():
        top = module.split(".")[0]
        for target in targets:
            target_top = target.split(".")[0]
            if top != "ray_jobs":
                if target_top not in (top, "medbalance"):
                    wrong.append(f"{module} -> {target} (a domain package imports only itself and medbalance)")
                continue
            if target_top != "ray_jobs" or target == "ray_jobs":
                continue
            if part(target) in JOBS and target.count(".") == 1:
                wrong.append(f"{module} -> {target} (a job)")
            elif module.count(".") >= 1 and part(module) in ALLOWED:
                if part(target) not in ALLOWED[part(module)] | {part(module)}:
                    wrong.append(f"{module} -> {target} (upwards)")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_top_of_ray_jobs_holds_only_the_jobs():
    top = sorted(p.stem for p in (REPO / "ray_jobs").glob("*.py") if p.stem != "__init__")
    assert set(top) - {"__main__"} == JOBS, top   # __main__: the `medbalance <job>` dispatcher
    assert len(top) <= 10


def test_every_import_of_the_project_names_a_module_that_exists():
    """Function-local imports included: a moved module leaves no import of its old name behind."""
    modules = project_modules()
    missing = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            missing += [f"{path.relative_to(REPO)}:{node.lineno} imports {t}" for t in targets
                        if t.split(".")[0] in PACKAGES and t not in modules]
    assert not missing, "\n".join(missing)
