"""How nodes and drives are shown: one row shape shared by their list commands and ``kahu status``."""

from __future__ import annotations

import time
from typing import Any

from ..cluster.schema import Config, Drive, Node
from ..cluster.store import ClusterStore, Observed
from .context import table


async def config_and_observed(store: ClusterStore) -> tuple[Config, Observed]:
    """What the list commands show: the configuration (a cluster must exist) and what is observed."""
    return await store.require(), await store.observed()


def node_row(node: Node, config: Config, observed: Observed) -> dict[str, Any]:
    """One node as ``kahu node list`` and ``kahu status`` show it."""
    health = observed.health.get(node.name)
    return {
        "name": node.name, "address": node.address, "nvme_port": node.nvme_port,
        "discovery_port": node.discovery_port, "failure_domain": node.domain,
        "health": str(health.state) if health else "unknown",
        "since": time.strftime("%H:%M:%S", time.localtime(health.since)) if health else "-",
        "heartbeat": node.name in observed.heartbeats,
        "drives": len(config.live_drives(node.name)),
        "manager": observed.manager == node.name,
    }


def drive_row(drive: Drive, observed: Observed) -> dict[str, Any]:
    parsed = drive.parsed()
    report = observed.drive_reports.get(drive.id)
    size = parsed.size or (report.size if report else 0)
    return {"id": drive.id, "node": drive.node, "kind": str(parsed.kind), "source": parsed.source or "-",
            "size": size, "state": str(drive.state), "uuid": str(parsed.uuid),
            "exported": bool(report and report.exported), "error": report.error if report else ""}


def nodes_table(rows: list[dict[str, Any]]) -> str:
    return table(["NODE", "ADDRESS", "DOMAIN", "HEALTH", "SINCE", "DRIVES", "MANAGER"],
                 [[r["name"], f"{r['address']}:{r['nvme_port']}", r["failure_domain"], r["health"],
                   r["since"], r["drives"], "*" if r["manager"] else ""] for r in rows])
