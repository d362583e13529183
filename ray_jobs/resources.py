"""Sizing work to the cluster: CPUs per training worker, leaving some to Ray Data.

With every CPU given to training workers the Ray Data pipeline that feeds them stalls (DESIGN 5:
read -> map_batches -> streaming split needs free CPUs), so each job sizes its workers from what
``ray.cluster_resources()`` reports, never from a fixed number.
"""
from __future__ import annotations

from medbalance.errors import ConfigError


def plan_cpus(num_workers: int, use_gpu: bool, cpus_per_worker: float | None = None,
              data_fraction: float = 0.25, total_cpus: float | None = None) -> float:
    """CPUs per training worker, leaving about ``data_fraction`` of the cluster to Ray Data.

    Each of ``num_workers`` gets ``(cluster CPUs - reserve) / num_workers``, reserve =
    ``max(1, data_fraction * cluster CPUs)``. On 2 CPUs with 2 workers: 0.5 each, 1 for data.
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
    return round(min(per_worker, 8.0 if use_gpu else per_worker), 2)
