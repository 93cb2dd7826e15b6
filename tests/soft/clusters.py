"""Clusters for tests: etcd members on loopback, and the spec of small, fast Kahu clusters for
``appliance.cluster.local.local_cluster`` (nodes in network namespaces as root), whose ``LocalCluster``
can crash a node, cut its link and bring it back.

Waiting is always on etcd itself: ``until`` re-checks a condition after every change under ``/kahu/``
(a watch), within a deadline, so tests never sleep to synchronise.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ports import free_port

from appliance.cluster.etcd import Etcd
from appliance.cluster.etcd_server import EtcdCluster, EtcdMemberSpec
from appliance.cluster.local import LocalSpec, netns_possible
from appliance.cluster.store import ClusterStore

T = TypeVar("T")
HEARTBEAT_MS = 50
ELECTION_MS = 500  # etcd's minimum lease TTL is ceil(1.5 * election): 1 s
CLUSTER_SUBNET = "10.78.0.0/24"  # kahu up's default is 10.77.0.0/24, test topologies use 10.79.x


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (two calls to free_port may hand out the same one)."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def make_etcd(tmp_path: Path, size: int, ports: list[int] | None = None) -> EtcdCluster:
    """``size`` etcd members on 127.0.0.1 (not started), with fast elections."""
    ports = ports or free_ports(2 * size)
    specs = [
        EtcdMemberSpec(f"etcd{i + 1}", "127.0.0.1", tmp_path / f"etcd{i + 1}", ports[2 * i], ports[2 * i + 1])
        for i in range(size)
    ]
    return EtcdCluster(specs, tmp_path / "logs", heartbeat_ms=HEARTBEAT_MS, election_ms=ELECTION_MS)


def free_port_block(size: int) -> int:
    """A base port with ``size`` free ports after it (for the loopback layout)."""
    for _ in range(100):
        base = random.randrange(30000, 60000 - size)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + size):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {size} free ports")


def cluster_spec(nodes: int = 4, etcd_members: int = 3, node_timeout: int = 3, **extra: object) -> LocalSpec:
    """A small, fast cluster: namespaces as root (else loopback), 64 MiB drives, quick etcd elections."""
    netns = netns_possible()
    layout = {"subnet": CLUSTER_SUBNET} if netns else {"base_port": free_port_block(100 + 2 * nodes + 1)}
    return LocalSpec(nodes=nodes, etcd_members=etcd_members, node_timeout=node_timeout, netns=netns,
                     drive_size=64 << 20, soft=True, etcd_heartbeat_ms=HEARTBEAT_MS,
                     etcd_election_ms=ELECTION_MS, **layout, **extra)  # type: ignore[arg-type]


async def until(etcd: Etcd, check: Callable[[ClusterStore], Awaitable[T | None]], timeout: float,
                what: str = "condition") -> T:
    """``ClusterStore.wait_until`` failing the test (not erroring it) when the time is up."""
    try:
        return await ClusterStore(etcd).wait_until(check, timeout, what)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None


async def health_of(store: ClusterStore, node: str) -> str:
    health = (await store.observed()).health.get(node)
    return str(health.state) if health else "unknown"
