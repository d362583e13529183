"""A small job for the deployment tests, submitted with `ray job submit --working-dir .`: it joins
the cluster as any medbalance job does and prints one line, ``MB-PROBE {json}``, with what the
tests check: the alive nodes, the node each of them ran a task on (one task pinned to each node),
the node a task asking for ``sys.argv[1]`` (JSON resources, e.g. '{"num_gpus": 1}') ran on, the
driver's node, and the auth mode, usage-stats setting and system config the job sees.
"""
from __future__ import annotations

import json
import os
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
def node_id() -> str:
    """The id of the node this task runs on."""
    return ray.get_runtime_context().get_node_id()


def main() -> None:
    """Run the probe and print its line."""
    ray.init()
    from ray._private.state import state

    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    ran_on = ray.get([node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                      for n in alive])
    asked = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print("MB-PROBE " + json.dumps({
        "alive": alive, "ran_on": sorted(ran_on),
        "asked_node": ray.get(node_id.options(**asked).remote(), timeout=120) if asked else None,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "usage_stats": os.environ.get("RAY_USAGE_STATS_ENABLED"),
        "system_config": state.get_system_config()}), flush=True)


if __name__ == "__main__":
    main()
