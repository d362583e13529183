"""Sizing work to the cluster: CPUs per training worker, leaving some to Ray Data.

With every CPU given to training workers the Ray Data pipeline that feeds them stalls (DESIGN 5:
read -> map_batches -> streaming split needs free CPUs), so each job sizes its workers from what
``ray.cluster_resources()`` reports, never from a fixed number.

An autoscaling cluster (the Ray cluster launcher, KubeRay) may start with no worker node at all:
0 GPUs, and 0 CPUs where the head keeps its CPUs to itself. Before sizing from such a cluster,
:func:`cluster_resources` asks its autoscaler for the job's nodes
(``ray.autoscaler.sdk.request_resources``) and waits for them with a progress line. A cluster
without an autoscaler (the embedded local Ray, a fixed cluster) is sized as it is.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import time

from medbalance.errors import ClusterError, ConfigError

# How long a job waits for an autoscaler to add the nodes it needs (cloud GPU nodes take minutes;
# a KubeRay pod also pulls the image). MEDBALANCE_SCALE_UP_TIMEOUT_S overrides it.
SCALE_UP_TIMEOUT_S = 1800.0
SCALE_UP_POLL_S = 2.0
SCALE_UP_SAY_EVERY_S = 30.0
DATA_FRACTION = 0.25   # of the cluster's CPUs kept for Ray Data (at least 1 CPU): see data_reserve


def data_reserve(total_cpus: float, data_fraction: float = DATA_FRACTION) -> float:
    """CPUs left to Ray Data's tasks (read, decode, augment): ``max(1, data_fraction * CPUs)``."""
    return max(1.0, data_fraction * total_cpus)


def plan_cpus(num_workers: int, use_gpu: bool, cpus_per_worker: float | None = None,
              data_fraction: float = DATA_FRACTION, total_cpus: float | None = None) -> float:
    """CPUs per training worker, leaving about ``data_fraction`` of the cluster to Ray Data.

    Each of ``num_workers`` gets ``(cluster CPUs - reserve) / num_workers``, reserve =
    ``max(1, data_fraction * cluster CPUs)``, rounded down to whole CPUs when it is one or more
    (:func:`whole_cpus`). On 2 CPUs with 2 workers: 0.5 each, 1 for data; on two nodes of 2 CPUs
    with 2 workers: 1 each (not 1.5), so each node keeps a whole CPU for the data tasks.
    GPU workers get at most 8 CPUs each (they feed a GPU; the rest serve the data pipeline).

    Args:
        cpus_per_worker: a fixed value, returned as it is.
        total_cpus: the CPUs to plan for (default: the connected cluster's).
    """
    if cpus_per_worker is not None:
        return float(cpus_per_worker)
    if total_cpus is None:
        need = least_cluster(0.11 * num_workers, num_workers if use_gpu else 0, data_fraction)
        total_cpus = float(cluster_resources(need, worker_bundles(num_workers, use_gpu)).get("CPU", 0))
    reserve = data_reserve(total_cpus, data_fraction)
    per_worker = (total_cpus - reserve) / num_workers
    if per_worker < 0.1:
        raise ConfigError(
            f"the cluster has {total_cpus:g} CPUs: too few for {num_workers} training workers plus "
            f"the data pipeline ({reserve:g} CPUs); use fewer --num-workers or a bigger cluster"
        )
    return round(min(whole_cpus(per_worker), 8.0 if use_gpu else per_worker), 2)


def whole_cpus(share: float) -> float:
    """A share of one CPU or more, rounded down to whole CPUs (a smaller share is kept as it is).

    Ray Data's tasks each need one whole CPU on one node. On a cluster of several nodes, fractional
    shares leave every node a fraction of a CPU free: 4 CPUs on two nodes shared as 1.5 + 1.5 leave
    0.5 + 0.5, where no data task fits, and training waits for data for ever.
    """
    return float(math.floor(share)) if share >= 1.0 else share


# The trial driver of a sweep (a Tune function trainable that fits a TorchTrainer) mostly waits on
# its workers; it gets this much CPU so that it never takes a CPU from the data pipelines.
TRIAL_DRIVER_CPUS = 0.05


def plan_trials(num_workers: int, use_gpu: bool, trials: int, max_concurrent: int = 0,
                cpus_per_worker: float | None = None, data_fraction: float = DATA_FRACTION,
                total_cpus: float | None = None, total_gpus: float | None = None) -> tuple[int, float]:
    """Trials run at once and CPUs per training worker of each, so that Ray Data never starves.

    The cluster's CPUs minus a reserve of ``max(1, data_fraction * CPUs)`` (as :func:`plan_cpus`)
    are shared by the concurrent trials, each needing ``num_workers`` workers plus its driver
    (:data:`TRIAL_DRIVER_CPUS`). Without ``max_concurrent``, as many trials as fit with 1 CPU per
    worker (at least 1, at most ``trials``; GPU trials also at most GPUs // num_workers); without
    ``cpus_per_worker``, each trial gets an equal share of the rest, rounded down to whole CPUs
    (:func:`whole_cpus`), split over its driver and workers (GPU workers at most 8).

    Raises:
        ConfigError: when one trial does not fit next to the data reserve.
    """
    if total_cpus is None or total_gpus is None:
        # Needed: one trial (max_concurrent trials, when set) at the least CPUs this plan accepts.
        # Asked for: every trial at once (max_concurrent at most), 1 CPU per worker.
        at_once = max(1, max_concurrent)
        least = num_workers * (cpus_per_worker or 0.11) + TRIAL_DRIVER_CPUS
        least = math.ceil(least) if least >= 1 and cpus_per_worker is None else least  # see whole_cpus
        need = least_cluster(at_once * least, at_once * num_workers if use_gpu else 0, data_fraction)
        trial = worker_bundles(num_workers, use_gpu, cpus_per_worker or 1.0, data=False) + [{"CPU": TRIAL_DRIVER_CPUS}]
        resources = cluster_resources(need, trial * min(max_concurrent or trials, trials) + [{"CPU": 1.0}])
        total_cpus = float(resources.get("CPU", 0)) if total_cpus is None else total_cpus
        total_gpus = float(resources.get("GPU", 0)) if total_gpus is None else total_gpus
    reserve = data_reserve(total_cpus, data_fraction)
    budget = total_cpus - reserve
    if use_gpu and total_gpus < num_workers:
        raise ConfigError(f"a trial needs {num_workers} GPUs but the cluster has {total_gpus:g}; "
                          "use fewer --num-workers")
    per_trial = num_workers * (cpus_per_worker or 1.0) + TRIAL_DRIVER_CPUS
    concurrent = max_concurrent or max(1, int(budget // per_trial))
    concurrent = max(1, min(concurrent, trials))
    if use_gpu:
        concurrent = min(concurrent, int(total_gpus // num_workers))
    if cpus_per_worker is None:  # each trial's footprint (driver + workers) in whole CPUs: see whole_cpus
        cpus_per_worker = math.floor((whole_cpus(budget / concurrent) - TRIAL_DRIVER_CPUS) / num_workers * 100) / 100
        cpus_per_worker = min(cpus_per_worker, 8.0) if use_gpu else cpus_per_worker
    need = concurrent * (num_workers * cpus_per_worker + TRIAL_DRIVER_CPUS)
    if cpus_per_worker < 0.1 or need > budget + 1e-6:
        raise ConfigError(
            f"the cluster has {total_cpus:g} CPUs: too few for {concurrent} concurrent trial(s) of "
            f"{num_workers} worker(s) at {cpus_per_worker:g} CPUs plus the data pipelines "
            f"({reserve:g} CPUs); lower max_concurrent_trials, --num-workers or base.cpus_per_worker")
    return concurrent, float(cpus_per_worker)


# ----------------------------------------------------------------------------- autoscaling clusters
def worker_bundles(num_workers: int, use_gpu: bool, cpus: float = 1.0, data: bool = True) -> list[dict]:
    """What one run needs from the cluster: a bundle per training worker (``cpus`` CPUs, plus one
    GPU with ``use_gpu``), and one whole CPU for the data pipeline when ``data``."""
    worker = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    return [dict(worker) for _ in range(num_workers)] + ([{"CPU": 1.0}] if data else [])


def least_cluster(budget_cpus: float, gpus: float, data_fraction: float = DATA_FRACTION) -> list[dict]:
    """The smallest cluster (as one bundle of totals) whose CPUs, less the data reserve
    ``max(1, data_fraction * CPUs)``, leave ``budget_cpus``, with ``gpus`` GPUs."""
    cpus = math.ceil((max(budget_cpus + 1.0, budget_cpus / (1.0 - data_fraction)) + 1e-6) * 100) / 100
    return [{"CPU": cpus, **({"GPU": float(gpus)} if gpus else {})}]


def _sum(bundles: list[dict]) -> dict[str, float]:
    """The resources of ``bundles`` added up."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _lacks(resources: dict, bundles: list[dict]) -> dict[str, float]:
    """What the cluster's totals lack of ``bundles``' sum (empty when they fit)."""
    return {k: v - resources.get(k, 0.0) for k, v in _sum(bundles).items() if resources.get(k, 0.0) + 1e-9 < v}


def _describe(resources: dict) -> str:
    """``"3 CPUs, 2 GPUs"`` (CPUs and GPUs only)."""
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def cluster_resources(need: list[dict], want: list[dict] | None = None,
                      timeout: float | None = None) -> dict:
    """``ray.cluster_resources()``, once the cluster has the resources of ``need`` (added up).

    A cluster that already has them, or has no autoscaler, is returned as it is (the caller's
    sizing then says what is missing). Otherwise the autoscaler is asked for the bundles ``want``
    (default ``need``: what the job would use, e.g. every trial of a sweep at once) with
    ``request_resources``, and this waits, with a progress line every 30 s, until ``need`` is
    there and the autoscaler has no node still coming up for ``want`` (or ``want`` is there). The
    request is withdrawn when the job's process exits.

    Raises:
        ClusterError: ``need`` is not there after ``timeout`` seconds (default
            ``MEDBALANCE_SCALE_UP_TIMEOUT_S`` or :data:`SCALE_UP_TIMEOUT_S`).
    """
    import ray

    resources = ray.cluster_resources()
    if not _lacks(resources, need) or autoscaler_pending() is None:
        return resources
    want = want or need
    if timeout is None:
        timeout = float(os.environ.get("MEDBALANCE_SCALE_UP_TIMEOUT_S", SCALE_UP_TIMEOUT_S))
    from ray.autoscaler.sdk import request_resources

    from ray_jobs.runtime.progress import say

    request_resources(bundles=want)
    _withdraw_at_exit()
    started = said = time.monotonic()
    asked = "" if _sum(want) == _sum(need) else f" (asked for up to {_describe(_sum(want))})"
    say(f"waiting for the autoscaler to add nodes: this job needs {_describe(_sum(need))}{asked}; "
        f"the cluster has {_describe(resources)}")
    while _lacks(resources, need) or (_lacks(resources, want) and autoscaler_pending()):
        waited = time.monotonic() - started
        if waited > timeout:
            if not _lacks(resources, need):
                break
            raise ClusterError(
                f"the cluster has {_describe(resources)} after {waited:.0f} s of waiting for the autoscaler; this "
                f"job needs {_describe(_sum(need))}. See `ray status` (a node type that fits, max_workers, the "
                "cloud's quota), or wait longer: MEDBALANCE_SCALE_UP_TIMEOUT_S (seconds)")
        if time.monotonic() - said >= SCALE_UP_SAY_EVERY_S:
            said = time.monotonic()
            say(f"still waiting for the autoscaler ({waited:.0f} s): the cluster has {_describe(resources)}")
        time.sleep(SCALE_UP_POLL_S)
        resources = ray.cluster_resources()
    say(f"the cluster has {_describe(resources)} (after {time.monotonic() - started:.0f} s)")
    return resources


def autoscaler_pending() -> int | None:
    """The nodes the cluster's autoscaler is still adding (launches asked for plus nodes starting),
    or None when nothing can add nodes. Read from what the autoscaler reports to the GCS: v1 (the
    launcher's monitor, KubeRay's sidecar) its status in the internal KV, v2 its cluster status.

    Every head runs an autoscaler; on a cluster started without a cluster config (the embedded
    local Ray, plain `ray start`) it has the read-only provider, whose node types are the nodes
    themselves (``format_readonly_node_type``) and which adds nothing: None.
    """
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(internal_kv_get_gcs_client().address)
        nodes = status.active_nodes + status.idle_nodes
        if status.stats.autoscaler_version in ("", "0", None) or all(
                n.ray_node_type_name == format_readonly_node_type(n.node_id or "") for n in nodes):
            return None
        return sum(launch.count for launch in status.pending_launches) + len(status.pending_nodes)
    report = _autoscaler_report()
    types = (report or {}).get("node_type_mapping") or {}
    if not report or all(kind == format_readonly_node_type(node) for node, kind in types.items()):
        return None
    return len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())


def _autoscaler_report(wait_s: float = 15.0) -> dict | None:
    """The v1 autoscaler's last summary (``ray status``'s source), waiting up to ``wait_s`` for the
    first one on a cluster that has just started; None if none comes."""
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while True:
        raw = _internal_kv_get("__autoscaling_status")  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS
        report = json.loads(raw).get("autoscaler_report") if raw else None
        if report or time.monotonic() > deadline:
            return report
        time.sleep(1.0)


_WITHDRAW_REGISTERED = False


def _withdraw_at_exit() -> None:
    """Withdraw this job's ``request_resources`` when its process exits, so the autoscaler can
    remove the nodes once they are idle (a request stays in force until another replaces it)."""
    global _WITHDRAW_REGISTERED
    if _WITHDRAW_REGISTERED:
        return
    _WITHDRAW_REGISTERED = True

    def withdraw() -> None:
        import ray
        from ray.autoscaler.sdk import request_resources

        if ray.is_initialized():
            try:
                request_resources(bundles=[])
            except Exception:  # noqa: BLE001 (the cluster may be gone already; nothing to withdraw then)
                pass

    atexit.register(withdraw)
