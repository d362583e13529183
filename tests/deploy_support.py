"""Helpers for the deployment tests: Ray nodes started from the files in cluster/ the way KubeRay and
the Ray cluster launcher start them, and the client environment cluster/README.md documents.

Nothing here invents a node's settings: the `ray start` flags and the environment come from the
files, and only what cannot be the same on one machine is overridden (ports, addresses, CPU
counts, and a temp dir of the test's own). Each node is a `bash -c "<start line>"` child process in
a process group of its own, ended by that group's id (never `ray stop`).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import REPO, RAY_NODE_STOP_S, run_ray_job_submit, stop_process_groups

CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
KUBERAY_ULIMIT = "ulimit -n 65536"  # KubeRay puts this before every generated `ray start`


def load_yaml(name: str) -> dict:
    """A file of cluster/, parsed."""
    return yaml.safe_load((CLUSTER / name).read_text())


# ----------------------------------------------------------------------------- the pins
def pinned(package: str) -> str:
    """The version constraints.txt pins ``package`` to (``name==version``)."""
    match = re.search(rf"^{re.escape(package)}==(\S+)\s*$", (REPO / "constraints.txt").read_text(),
                      re.MULTILINE | re.IGNORECASE)
    assert match, f"constraints.txt pins no {package}"
    return match.group(1)


def pyproject() -> dict:
    """pyproject.toml, parsed."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def image_tag() -> str:
    """The tag every cluster file runs: the project's version (cluster/Dockerfile's build command)."""
    return pyproject()["project"]["version"]


def node_base_env(home: Path, temp_dir: Path) -> dict[str, str]:
    """What a fresh machine or container gives a node: no RAY_*/AWS_* variable of this process, an
    empty home of its own (no ~/.ray/auth_token unless the files put one there), our venv's `ray`
    and `python` first on PATH, and Ray's temp dir in ``temp_dir`` (short: socket paths)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=str(temp_dir))
    return env


# ----------------------------------------------------------------------------- KubeRay
def kuberay_cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a RayCluster or RayJob manifest."""
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def kuberay_group(spec: dict, name: str) -> dict:
    """The head group (``name="head"``) or the worker group of that name."""
    if name == "head":
        return spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r} (groups: {sorted(groups)})"
    return groups[name]


def ray_container(group: dict) -> dict:
    """The Ray container: KubeRay's RayContainerIndex is 0."""
    return group["template"]["spec"]["containers"][0]


def kuberay_container_env(spec: dict, group: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The Ray container's environment as Kubernetes and KubeRay give it: ``env`` (literal values and
    ``secretKeyRef``s resolved from ``secrets``), ``envFrom`` secrets, then what KubeRay adds with
    ``authOptions.mode: token`` (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the secret's
    ``auth_token`` key, each unless the container sets it: ``SetContainerTokenAuthEnvVars``)."""
    container = ray_container(group)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["secretRef"]
        env.update(secrets.get(ref["name"], {}) if ref.get("optional") else secrets[ref["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    auth = spec.get("authOptions") or {}
    if auth and auth.get("mode", "token") == "token":
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_AUTH_TOKEN", secrets[auth["secretName"]]["auth_token"])
    return env


def k8s_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity as a number: "7" -> 7, "500m" -> 0.5, "26Gi" -> bytes."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and match.group(2) in ("", *units), f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1.0)


def kuberay_start_params(spec: dict, group: dict, head: bool, head_address: str = "") -> dict[str, str]:
    """The group's ``rayStartParams`` completed as KubeRay v1.6 does (``setMissingRayStartParams``,
    ``generateRayStartCommand``): the worker's address, the head's dashboard host and ``no-monitor``
    (in-tree autoscaling), the metrics and agent ports, ``block``, and num-cpus / memory / num-gpus
    from the container's limits."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
        if spec.get("enableInTreeAutoscaling"):
            params["no-monitor"] = "true"
    else:
        params.setdefault("address", head_address)
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits = ray_container(group)["resources"]["limits"]
    params.setdefault("num-cpus", str(int(k8s_quantity(limits["cpu"]))))
    params.setdefault("memory", str(int(k8s_quantity(limits["memory"]))))
    for key, value in limits.items():
        if key.endswith("gpu"):
            params.setdefault("num-gpus", str(int(k8s_quantity(value))))
    return params


def kuberay_start_line(params: dict[str, str], head: bool) -> str:
    """The container command KubeRay generates (``convertParamMap``): ``--key=value`` with the value
    as written (the line is run by ``/bin/bash -c``, so the shell parses it), ``"true"`` as a bare
    ``--key``, ``"false"`` dropped (except log-color, include-dashboard, include-log-monitor)."""
    special = {"log-color", "include-dashboard", "include-log-monitor"}
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in special:
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={value}")
    return f"{KUBERAY_ULIMIT}; ray start {'--head ' if head else ''}{' '.join(flags)}"


# ----------------------------------------------------------------------------- Ray cluster launcher
def launcher_start_line(commands: list[str], set_flags: dict, drop: tuple[str, ...] = ()) -> str:
    """The one `ray start` line of a launcher's ``*_start_ray_commands`` (``ray stop`` skipped), its
    ``ray start --key=value`` flags overridden by ``set_flags`` (a value; ``None``: a bare ``--key``;
    a function: of the file's value) and those named in ``drop`` removed; the rest of the line
    (``ulimit``, variables) is kept. Values with ``$`` stay unquoted, so the shell expands them
    (``--address=$RAY_HEAD_IP:6379``), as when the launcher runs the line."""
    lines = [c for c in commands if c.strip() != "ray stop"]
    assert len(lines) == 1 and lines[0].count("ray start") == 1, f"expected one `ray start` line: {commands}"
    before, after = lines[0].split("ray start", 1)
    flags = {}
    for token in shlex.split(after):
        assert token.startswith("--"), f"`ray start` argument {token!r} is not a --flag[=value]"
        key, _, value = token[2:].partition("=")
        flags[key] = value if "=" in token else None
    for key in drop:
        flags.pop(key, None)
    for key, value in set_flags.items():
        flags[key] = value(flags.get(key)) if callable(value) else value
    rendered = [f"--{k}" if v is None else f"--{k}={_shell_word(str(v))}" for k, v in flags.items()]
    return f"{before}ray start {' '.join(rendered)}"


def _shell_word(value: str) -> str:
    """``value`` as one shell word: as it is when plain or a ``$VARIABLE`` reference, else quoted."""
    return value if re.fullmatch(r"[$\w:./,@%+-]*", value) else shlex.quote(value)


# ----------------------------------------------------------------------------- processes
class Nodes:
    """`bash -c <line>` node processes, each in its own process group, logs in ``log_dir``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, line: str, env: dict[str, str]) -> subprocess.Popen:
        """Start one node from its start line; its output goes to ``<log_dir>/<name>.log``."""
        (self.log_dir / f"{name}.cmd").write_text(line + "\n")
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(["/bin/bash", "-c", "--", line], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The tail of a node's output (for failure messages)."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM every node's process group, SIGKILL after a short grace (conftest's helper)."""
        stop_process_groups(self.procs, timeout=RAY_NODE_STOP_S)


def wait_until(check, proc: subprocess.Popen, what: str, log=lambda: "", timeout: float = 120) -> None:
    """Poll ``check()`` every 2 s until true; fail when ``proc`` exits or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what}: the node's process exited ({proc.returncode}):\n{log()}"
        if check():
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s:\n{log()}"
        time.sleep(2)


ALIVE_NODES = """
import sys
from ray._raylet import GcsClient
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).values()
print(sum(1 for n in nodes if n.state == 0))  # GcsNodeInfo.ALIVE
"""


def alive_nodes(address: str, env: dict[str, str]) -> int:
    """How many alive nodes the GCS at ``address`` lists, asked with ``env`` (its token); 0 while
    it does not answer. (Not `ray status`: it reads the autoscaler's report, and a KubeRay head runs
    with ``--no-monitor``, its autoscaler being a sidecar.)"""
    out = subprocess.run([sys.executable, "-c", ALIVE_NODES, address], env=env, capture_output=True, text=True,
                         timeout=60)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def open_files_limits(proc: subprocess.Popen, name: str = "raylet") -> list[int]:
    """The soft open-files limit of each ``name`` process in ``proc``'s process group."""
    limits = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            limits_text = (stat.parent / "limits").read_text()
        except OSError:
            continue
        comm, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        if int(fields[2]) == proc.pid and comm == name:
            limits.append(int(re.search(r"^Max open files\s+(\d+)", limits_text, re.MULTILINE).group(1)))
    return limits


# ----------------------------------------------------------------------------- the documented client
def shell_commands(markdown: str) -> list[str]:
    """Every command line of the ```bash blocks of a Markdown text, continuation lines joined and
    comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def markdown_section(markdown: str, heading_start: str) -> str:
    """The text of the section whose heading begins with ``heading_start``, up to the next heading
    of the same or a higher level (lines inside ``` blocks are not headings)."""
    lines, level, found, fenced = [], 0, False, False
    for line in markdown.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) ", line) if not fenced and not line.startswith("```") else None
        if heading and found and len(heading.group(1)) <= level:
            break
        if found:
            lines.append(line)
        elif heading and line[heading.end():].startswith(heading_start):
            found, level = True, len(heading.group(1))
    assert found, f"no section {heading_start!r}"
    return "".join(lines)


def documented_client_env(commands: list[str]) -> tuple[dict[str, str], list[str]]:
    """The variables a documented `ray job submit` runs with (``export`` lines before it and
    ``NAME=value`` prefixes on it, values as written) and the submit command's own words."""
    env: dict[str, str] = {}
    for command in commands:
        words = shlex.split(command)
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)
            continue
        prefix = []
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            prefix.append(words.pop(0).split("=", 1))
        if words[:3] == ["ray", "job", "submit"]:
            return {**env, **dict(prefix)}, words
    raise AssertionError("no `ray job submit` command in these commands")


def submit(dashboard: str, words: list[str], entrypoint: list[str], env: dict[str, str],
           timeout: float = 300) -> subprocess.CompletedProcess:
    """A documented `ray job submit` (``words``) with its ``--address`` pointed at ``dashboard``, its
    paths (``--working-dir .``, ``--runtime-env cluster/...``) taken from the repository root and its
    entrypoint replaced by ``entrypoint``; retried while the job agent is not up yet."""
    options = words[3: words.index("--")]
    for flag in ("--address", "--working-dir", "--runtime-env"):
        if flag in options:
            i = options.index(flag) + 1
            options[i] = dashboard if flag == "--address" else str(REPO / options[i])
    return run_ray_job_submit([RAY, "job", "submit", *options, "--", *entrypoint], env=env, timeout=timeout)


def documented_secrets(commands: list[str], token: str) -> dict[str, dict[str, str]]:
    """The Kubernetes secrets the documented ``kubectl create secret generic NAME
    --from-literal=KEY=VALUE`` commands make: a value computed by a command (``$(...)``, the
    cluster's token) becomes ``token``; other values are kept as written (placeholders)."""
    secrets: dict[str, dict[str, str]] = {}
    for command in commands:
        words = shlex.split(command)
        if words[:4] != ["kubectl", "create", "secret", "generic"]:
            continue
        data = secrets.setdefault(words[4], {})
        for word in words[5:]:
            if word.startswith("--from-literal="):
                key, value = word[len("--from-literal="):].split("=", 1)
                data[key] = token if "$(" in value else value
    return secrets


def resolve_documented_env(documented: dict[str, str], token: str) -> dict[str, str]:
    """The documented client variables with their values: literal values as written; a value
    computed by a command (``$(kubectl get secret ...)``) is the cluster's token, and only
    RAY_AUTH_TOKEN may be computed so."""
    env = {}
    for name, value in documented.items():
        if "$(" in value:
            assert name == "RAY_AUTH_TOKEN", f"{name}={value}: only the token may come from a command"
            value = token
        env[name] = value
    return env


def probe(out: subprocess.CompletedProcess) -> dict:
    """The ``MB-PROBE`` line of a job's output (tests/cluster_probe.py), parsed."""
    import json

    text = out.stdout + out.stderr
    match = re.search(r"^MB-PROBE (\{.*\})$", text, re.MULTILINE)
    assert out.returncode == 0 and match, text[-4000:]
    return json.loads(match.group(1))


def client_base_env(home: Path) -> dict[str, str]:
    """A user's shell: none of this process's RAY_*/AWS_* variables, a home of its own (no
    ~/.ray/auth_token unless the test writes one), our venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return env


# The server's answer to a request without the right token (not the client's own refusal).
REFUSED = re.compile(r"(?i)unauthori[sz]ed|401|403|forbidden|invalid (?:authentication )?token|"
                     r"authentication (?:failed|required)")
