"""``kahu status``: the cluster at a glance — identity, etcd, nodes, drives, capacity, recent events."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from ..cluster.etcd import EtcdError
from ..cluster.store import ClusterStore
from ..units import human_size
from .context import add_cluster_arguments, table, with_store
from .views import config_and_observed, drive_row, node_row, nodes_table

MEMBER_TIMEOUT = 0.5  # a member that does not answer this fast is shown as unreachable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="the cluster at a glance")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--events", type=int, default=8, help="how many recent events to show")
    add_cluster_arguments(parser)
    parser.set_defaults(func=status)


async def gather_status(store: ClusterStore, events: int = 8) -> dict[str, Any]:
    """Everything ``kahu status`` shows, as one JSON-able document."""
    config, observed = await config_and_observed(store)
    assert config.cluster is not None
    nodes = [node_row(n, config, observed) for n in sorted(config.nodes.values(), key=lambda n: n.name)]
    drives = [drive_row(d, observed) for d in config.live_drives()]
    usable = config.usable_capacity(observed.drive_reports)
    return {
        "cluster": {"name": config.cluster.name, "uuid": config.cluster.uuid,
                    "protection": {"data": config.cluster.policy.data, "parity": config.cluster.policy.parity,
                                   "hot_spares": config.cluster.policy.hot_spares},
                    "node_timeout": config.cluster.node_timeout,
                    "failure_domains": len(config.failure_domains())},
        "etcd": await etcd_members(store),
        "manager": observed.manager,
        "nodes": nodes,
        "nodes_up": sum(1 for n in nodes if n["health"] == "up"),
        "drives": drives,
        "capacity": {"raw": config.raw_capacity(observed.drive_reports), "usable": usable,
                     "provisioned": config.provisioned()},
        "filesystems": [{"name": f.name, "id": f.id, "capacity": f.capacity}
                        for f in sorted(config.filesystems.values(), key=lambda f: f.name)],
        "events": [{"time": e.time, "kind": e.kind, "subject": e.subject, "message": e.message,
                    "severity": str(e.severity)} for e in await store.events(events)],
    }


async def etcd_members(store: ClusterStore) -> list[dict[str, Any]]:
    """Each etcd member, whether it answers, and which is leader; members are asked in parallel."""
    members = await store.etcd.members()

    async def one(member: dict[str, Any]) -> dict[str, Any]:
        url = (member.get("clientURLs") or ["?"])[0]
        row = {"name": member.get("name", "?"), "url": url, "healthy": False, "leader": False}
        try:
            answer = await asyncio.wait_for(store.etcd.status(url), MEMBER_TIMEOUT)
        except (EtcdError, TimeoutError):
            return row
        row.update(healthy=True, leader=answer.get("leader") == member.get("ID"))
        return row

    return list(await asyncio.gather(*(one(m) for m in members)))


def status(args: argparse.Namespace) -> int:
    doc = with_store(args, lambda store: gather_status(store, args.events))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render(doc))
    return 0


def render(doc: dict[str, Any]) -> str:
    c = doc["cluster"]
    p = c["protection"]
    cap = doc["capacity"]
    lines = [
        f"cluster {c['name']}  ({c['uuid']})",
        f"protection {p['data']}+{p['parity']}, {p['hot_spares']} hot spare(s); "
        f"{c['failure_domains']} failure domain(s); node timeout {c['node_timeout']}s",
        f"nodes {doc['nodes_up']}/{len(doc['nodes'])} up; manager {doc['manager'] or 'none'}",
        "etcd " + ", ".join(f"{m['name']} {'leader' if m['leader'] else 'ok' if m['healthy'] else 'DOWN'}"
                            for m in doc["etcd"]),
        f"capacity raw {human_size(cap['raw'])}, usable {human_size(cap['usable'])}, "
        f"provisioned {human_size(cap['provisioned'])}",
        "",
        nodes_table(doc["nodes"]),
    ]
    exported = sum(1 for d in doc["drives"] if d["exported"])
    lines += ["", f"drives {exported}/{len(doc['drives'])} exported"]
    if doc["filesystems"]:
        lines += ["", table(["FILE SYSTEM", "CAPACITY"],
                            [[f["name"], human_size(f["capacity"])] for f in doc["filesystems"]])]
    if doc["events"]:
        lines += ["", "recent events:"]
        for e in doc["events"]:
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} "
                         f"{e['severity']:<7} {e['message']}")
    return "\n".join(lines)
