"""A simulated two-node Ray cluster in its own process, for tests that need nodes of their own.

Run as a script: it starts `ray.cluster_utils.Cluster` (two raylets, each with its own CPU
count), prints `address <gcs address>`, then answers commands on stdin until stdin closes:
  placement <prefix>   one JSON line: {bundle index: node id} of the CREATED placement group
                       whose name starts with <prefix>
Closing stdin shuts down only this cluster's processes (never `ray stop`, which would take down
every Ray on the machine).
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster


def _placement(prefix: str) -> dict[int, str]:
    for group in ray.util.placement_group_table().values():
        if group["name"].startswith(prefix) and group["state"] == "CREATED":
            return {int(index): node for index, node in group["bundles_to_node_id"].items()}
    return {}


def main(cpus_per_node: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    print("address", cluster.address, flush=True)
    try:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "placement":
                print(json.dumps(_placement(argument)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
