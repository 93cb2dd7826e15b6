"""``kahu cluster create``: a new cluster's identity, protection policy and first nodes, in one step."""

from __future__ import annotations

import argparse

from ..cluster.schema import DEFAULT_NODE_TIMEOUT, ClusterError, Node, ProtectionPolicy
from .context import add_cluster_arguments, with_store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="create the cluster")
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a cluster with a protection policy and its first nodes")
    create.add_argument("name")
    create.add_argument("--data", "-k", type=int, required=True, help="data chunks per stripe (k)")
    create.add_argument("--parity", "-m", type=int, required=True, help="parity chunks per stripe (m, 2..4)")
    create.add_argument("--hot-spares", type=int, default=0,
                        help="failure domains' worth of capacity kept free for rebuilds")
    create.add_argument("--node-timeout", type=int, default=DEFAULT_NODE_TIMEOUT,
                        help="seconds without a heartbeat before a node is marked down "
                             f"(default {DEFAULT_NODE_TIMEOUT})")
    create.add_argument("--node", action="append", default=[], metavar="NAME=ADDRESS[,fd=DOMAIN][,port=P]",
                        help="a first node (repeat); its failure domain defaults to the node itself")
    add_cluster_arguments(create)
    create.set_defaults(func=create_cluster)


def parse_node(text: str) -> Node:
    """``node1=10.0.0.1,fd=rack1,port=4420,discovery-port=8009``."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ClusterError(f"--node {text!r}: must look like NAME=ADDRESS[,fd=DOMAIN][,port=P]")
    address, *options = rest.split(",")
    fields: dict[str, object] = {"name": name, "address": address}
    names = {"fd": "failure_domain", "port": "nvme_port", "discovery-port": "discovery_port"}
    for option in options:
        key, sep, value = option.partition("=")
        if key not in names or not sep:
            raise ClusterError(f"--node {text!r}: unknown option {option!r} (known: {', '.join(names)})")
        if key == "fd":
            fields[names[key]] = value
        else:
            try:
                fields[names[key]] = int(value)
            except ValueError:
                raise ClusterError(f"--node {text!r}: {key} must be a number") from None
    return Node(**fields)  # type: ignore[arg-type]


def create_cluster(args: argparse.Namespace) -> int:
    policy = ProtectionPolicy(args.data, args.parity, args.hot_spares)
    nodes = [parse_node(n) for n in args.node]
    info = with_store(args, lambda store: store.create_cluster(args.name, policy, nodes, args.node_timeout))
    print(f"cluster {info.name} created: uuid {info.uuid}, protection {policy}, {len(nodes)} node(s)")
    return 0
