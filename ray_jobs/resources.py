"""Sizing work to the cluster: CPUs per training worker, leaving some to Ray Data.

With every CPU given to training workers the Ray Data pipeline that feeds them stalls (DESIGN 5:
read -> map_batches -> streaming split needs free CPUs), so each job sizes its workers from what
``ray.cluster_resources()`` reports, never from a fixed number.
"""
from __future__ import annotations

import math

from medbalance.errors import ConfigError


def plan_cpus(num_workers: int, use_gpu: bool, cpus_per_worker: float | None = None,
              data_fraction: float = 0.25, total_cpus: float | None = None) -> float:
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
        import ray

        total_cpus = float(ray.cluster_resources().get("CPU", 0))
    reserve = max(1.0, data_fraction * total_cpus)
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
                cpus_per_worker: float | None = None, data_fraction: float = 0.25,
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
        import ray

        resources = ray.cluster_resources()
        total_cpus = float(resources.get("CPU", 0)) if total_cpus is None else total_cpus
        total_gpus = float(resources.get("GPU", 0)) if total_gpus is None else total_gpus
    reserve = max(1.0, data_fraction * total_cpus)
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
