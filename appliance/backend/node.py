"""A node's backend process: joins the cluster in etcd and keeps the node's part of it running.

It owns, for as long as it runs:
- the node's drive target (SPDK, else the soft target), reconciled with the node's drives *as etcd
  says*: a drive added, drained or removed with ``kahu drive ...`` is exported or withdrawn here, and
  what the target really exports is reported back (``/kahu/state/drives/<id>``);
- the node's heartbeat lease, which is how the cluster knows the node is up;
- a campaign for the cluster-manager role (``appliance.cluster.manager``).
Nothing is kept on local disk beyond the drive target's runtime files: etcd is the only memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cluster.etcd import Etcd, EtcdError
from ..cluster.heartbeat import HeartbeatLease
from ..cluster.manager import Manager
from ..cluster.schema import CONFIG, EXPORTED_STATES, ClusterError, Config, Drive, DriveReport, Node
from ..cluster.store import ClusterStore
from ..spdk_rpc.lifecycle import NodeTarget
from ..spdk_rpc.nodeconfig import NodeConfig, parse_node_config
from ..spdk_rpc.reconciler import desired_state
from ..spdk_rpc.rpc import RpcError
from ..tasks import first_completed

log = logging.getLogger(__name__)

RPC_SOCKET_NAME = "spdk.sock"
RETRY_PAUSE = 0.5


class NodeRemoved(Exception):
    """This node was removed from the cluster while its backend ran."""


def node_config(node: Node, config: Config, home: Path) -> NodeConfig:
    """The drive target's configuration for ``node``: its address and ports, its exported drives."""
    drives = [{**d.spec, "name": d.name} for d in config.live_drives(node.name) if d.state in EXPORTED_STATES]
    return parse_node_config({
        "name": node.name,
        "failure_domain": node.domain,
        "data_addresses": [{"address": node.address, "port": node.nvme_port}],
        "discovery_port": node.discovery_port,
        "allow_any_host": True,
        "drives": drives,
        "spdk": {"rpc_socket": str(home / RPC_SOCKET_NAME)},
    }, min_drives=0)


class NodeBackend:
    def __init__(self, endpoints: list[str], name: str, home: Path, soft: bool | None = None,
                 ready: Callable[[], None] | None = None):
        self.endpoints = endpoints
        self.name = name
        self.home = home
        self.soft = soft
        self.ready = ready or (lambda: None)
        self._applied: tuple[NodeConfig, dict[int, Drive]] | None = None  # what the target last got

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (then leave cleanly) or the node is removed from the cluster."""
        self.home.mkdir(parents=True, exist_ok=True)
        async with Etcd(self.endpoints) as etcd:
            store = ClusterStore(etcd)
            config = await store.require()
            node = config.nodes.get(self.name)
            if node is None:
                raise ClusterError(f"node {self.name} is not a member of cluster {config.cluster.name}: "
                                   f"add it with `kahu node add {self.name} --address ADDRESS`")
            heartbeat = HeartbeatLease(etcd, self.name, config.cluster.heartbeat_ttl)
            empty = node_config(node, Config(), self.home)
            async with NodeTarget(empty, self.home, soft=self.soft) as target:
                log.info("drive target of %s is %s (pid %s)", self.name, target.kind, target.process.pid)
                try:
                    await self._serve(store, heartbeat, target, stop)
                finally:
                    await _quietly(heartbeat.revoke())

    async def _serve(self, store: ClusterStore, heartbeat: HeartbeatLease, target: NodeTarget,
                     stop: asyncio.Event) -> None:
        first_apply = asyncio.Event()

        async def announce() -> None:
            await first_apply.wait()
            await heartbeat.wait_for_lease()
            self.ready()
            await asyncio.Future()  # stay, so that finishing is always a reason to stop

        tasks = [
            self._follow_config(store, target, first_apply),
            heartbeat.run(),
            Manager(store, heartbeat, self.name).run(),
            target.wait(),  # returns only when the target's supervision gave up (raises why)
            announce(),
            stop.wait(),
        ]
        await first_completed(*tasks)

    async def _follow_config(self, store: ClusterStore, target: NodeTarget, applied: asyncio.Event) -> None:
        """Export what etcd says this node should export, now and after every change.

        Losing etcd (a cut link, an election) only pauses this: the target keeps serving what it
        has, and the loop reads everything again once etcd answers.
        """
        while True:
            try:
                config, revision = await store.config_at()
                node = config.nodes.get(self.name)
                if node is None:
                    raise NodeRemoved(f"node {self.name} was removed from the cluster")
                await self._apply(store, config, node, target)
                applied.set()
                await store.etcd.next_change(CONFIG, revision + 1)  # then read it all again (level-triggered)
            except EtcdError as e:
                log.warning("following the configuration of %s: %s; retrying", self.name, e)
                await asyncio.sleep(RETRY_PAUSE)  # a pause between attempts, not synchronisation

    async def _apply(self, store: ClusterStore, config: Config, node: Node, target: NodeTarget) -> None:
        """Reconcile the target with this node's part of ``config`` and report each drive; nothing to
        do when the change was elsewhere in the cluster (the target keeps its own state on restarts)."""
        wanted = node_config(node, config, self.home)
        drives = {d.id: d for d in config.drives.values() if d.node == self.name}
        if (wanted, drives) == self._applied:
            return
        error = ""
        try:
            plan = await target.apply(desired_state(wanted))
            if plan.steps:
                log.info("applied %d step(s) for %s", len(plan.steps), self.name)
        except (RpcError, OSError) as e:
            error = str(e)
            log.error("cannot export the drives of %s: %s", self.name, e)
        bdevs = {b["name"]: b for b in await asyncio.to_thread(target.rpc.bdev_get_bdevs)}
        now = time.time()
        for drive in drives.values():
            spec = drive.parsed()
            bdev = bdevs.get(spec.name) or bdevs.get(f"{spec.name}n1")
            wanted_out = drive.state in EXPORTED_STATES
            problem = "" if bdev or not wanted_out else error or "not exported"
            await store.report_drive(drive.id, DriveReport(bdev is not None, _bdev_size(bdev), problem, now))
        self._applied = None if error else (wanted, drives)  # a failure is tried again on the next change


def _bdev_size(bdev: dict[str, Any] | None) -> int:
    return int(bdev["num_blocks"]) * int(bdev["block_size"]) if bdev else 0


async def _quietly(aw: Any) -> None:
    try:
        await asyncio.wait_for(aw, 2.0)
    except (EtcdError, TimeoutError) as e:
        log.warning("could not end the heartbeat cleanly: %s", e)
