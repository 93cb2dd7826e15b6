"""The cluster manager: one backend, elected through etcd, turns observations into cluster state.

Every backend campaigns for ``/kahu/manager`` with its heartbeat lease; the one that creates the key
is manager until its lease ends (it stops, or is cut off), and then another takes over. The manager's
duties are level-triggered reconciliations, re-run whenever what they depend on changes:

- node health: a node is up exactly while its heartbeat key exists. The manager records each change
  (``/kahu/state/health/<node>``) with an event, fenced on still being manager, so a deposed manager
  that comes back cannot overwrite its successor's view.
- the event log: the oldest events beyond MAX_EVENTS are dropped.
- drains: a draining drive becomes removed once nothing on it needs moving. No data is placed on
  drives yet (the file system layer comes later), so a drain completes on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from ..tasks import first_completed
from .etcd import EtcdError, put_op, value_is, version_is
from .heartbeat import HeartbeatLease
from .schema import DRIVES, HEARTBEATS, MANAGER_KEY, DriveState, Health
from .store import ClusterStore, event_op

log = logging.getLogger(__name__)
MAX_EVENTS = 10_000  # the event log keeps the newest this many


class Manager:
    def __init__(self, store: ClusterStore, heartbeat: HeartbeatLease, node: str):
        self.store = store
        self.etcd = store.etcd
        self.heartbeat = heartbeat
        self.node = node
        self.is_manager = asyncio.Event()

    async def run(self) -> None:
        """Campaign with each new lease; serve while it lasts; forever (cancel to stop)."""
        lost = 0
        while True:
            lease, generation = await self.heartbeat.wait_for_lease(lost)
            try:
                value = await self._campaign(lease)
                if value is None:
                    await self._wait_vacancy_or_loss(generation)
                    continue
                log.info("%s is the cluster manager", self.node)
                self.is_manager.set()
                await self._serve(value, generation)
            except EtcdError as e:
                log.warning("manager duties of %s interrupted: %s", self.node, e)
                await asyncio.sleep(0.2)  # pause before campaigning again, not synchronisation
            finally:
                self.is_manager.clear()
            if self.heartbeat.generation != generation or not self.heartbeat.lease:
                lost = generation

    async def _campaign(self, lease: int) -> bytes | None:
        """Become manager with ``lease``; returns the key's value (our fence), None if someone else is."""
        value = json.dumps({"node": self.node, "lease": lease, "since": time.time()}).encode()
        won = await self.etcd.txn([version_is(MANAGER_KEY, 0)], [
            put_op(MANAGER_KEY, value, lease), event_op("manager.elected", self.node,
                                                        f"{self.node} is the cluster manager")])
        if won.succeeded:
            return value
        current = await self.etcd.get(MANAGER_KEY)
        if current is not None and current.json().get("node") == self.node and current.lease != lease:
            # Our own node's previous process: it is gone (we replaced its heartbeat), take over.
            taken = await self.etcd.txn([value_is(MANAGER_KEY, current.value)],
                                        [put_op(MANAGER_KEY, value, lease)])
            if taken.succeeded:
                return value
        return None

    async def _wait_vacancy_or_loss(self, generation: int) -> None:
        """Until the manager key is deleted (its holder's lease ended) or our own lease is lost."""
        kv, revision = await self.etcd.get_prefix_at(MANAGER_KEY)
        if not kv:
            return

        async def vacancy() -> None:
            start = revision + 1
            while (event := await self.etcd.next_change(MANAGER_KEY, start)).kind != "delete":
                start = event.revision + 1

        await first_completed(vacancy(), self.heartbeat.wait_lost(generation))

    async def _serve(self, fence: bytes, generation: int) -> None:
        dirty = asyncio.Event()
        dirty.set()

        async def watch(prefix: str, revision: int) -> None:
            async for _ in self.etcd.watch(prefix, revision + 1):
                dirty.set()

        async def reconcile_loop() -> None:
            while True:
                await dirty.wait()
                dirty.clear()
                await self.reconcile(fence)

        revision = await self.etcd.revision()
        await first_completed(watch(HEARTBEATS, revision), watch(DRIVES, revision), reconcile_loop(),
                     self.heartbeat.wait_lost(generation))
        log.warning("%s lost its lease: no longer manager", self.node)

    async def reconcile(self, fence: bytes) -> None:
        """One pass: health follows heartbeats; finished drains become removals."""
        config = await self.store.config()
        observed = await self.store.observed()
        for name in config.nodes:
            up = name in observed.heartbeats
            want = Health.UP if up else Health.DOWN
            have = observed.health.get(name)
            if have is None and not up:
                continue  # never seen: stays "unknown" until its first heartbeat
            if have is None or have.state is not want:
                why = "heartbeat present" if up else "no heartbeat within the node timeout"
                if not await self.store.mark_health(name, want, fence, why):
                    raise EtcdError("no longer the manager (fence failed)")
                log.info("node %s marked %s", name, want)
        await self.store.trim_events(MAX_EVENTS)
        for drive in config.drives.values():
            if drive.state is DriveState.DRAINING:
                with contextlib.suppress(ValueError):  # refused: it changed meanwhile; next pass sees it
                    await self.store.set_drive_state(drive.id, DriveState.REMOVED, "drained: no data to move")
