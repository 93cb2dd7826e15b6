"""A node's heartbeat: a leased key in etcd that exists exactly while the node's backend is alive.

The backend holds one lease with the cluster's heartbeat TTL and renews it at a third of the TTL, so
two renewals can be lost before it lapses. When the node is cut off, the lease expires in etcd,
the key disappears and the manager marks the node down; when the node is back, it finds its lease
gone, takes a new one and puts the key again. Everything else the backend owns through etcd (the
manager role, metadata buckets) hangs off the same lease, so it all lapses together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from .etcd import Etcd, EtcdError
from .schema import HEARTBEATS, Heartbeat, dumps

log = logging.getLogger(__name__)


class HeartbeatLease:
    """Keep ``/kahu/heartbeats/<node>`` alive; ``lease`` is the live lease id (0 while there is none)."""

    def __init__(self, etcd: Etcd, node: str, ttl: int):
        self.etcd = etcd
        self.node = node
        self.ttl = ttl
        self.lease = 0
        self.generation = 0  # bumped on every new lease: holders of the old one must let go
        self._changed = asyncio.Condition()

    async def wait_for_lease(self, newer_than: int = 0) -> tuple[int, int]:
        """Wait until there is a lease of a generation after ``newer_than``; returns (lease, generation)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.lease and self.generation > newer_than)
            return self.lease, self.generation

    async def wait_lost(self, generation: int) -> None:
        """Return once the lease of ``generation`` is no longer the live one."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation != generation or not self.lease)

    async def run(self) -> None:
        """Register, then renew forever; re-register whenever the lease was lost. Cancel to stop."""
        while True:
            try:
                await self._register()
                await self._renew()
            except EtcdError as e:  # unreachable or refused: the lease may lapse; try again
                log.warning("heartbeat of %s: %s", self.node, e)
            old = self.lease
            await self._set(0)
            with contextlib.suppress(EtcdError, TimeoutError):  # let go of what hangs off it, if alive
                await asyncio.wait_for(self.etcd.lease_revoke(old), self.ttl / 3)
            await asyncio.sleep(self.ttl / 6)  # a pause before trying again, not synchronisation

    async def revoke(self) -> None:
        """End the heartbeat now (a clean shutdown): the node is marked down without waiting."""
        lease, self.lease = self.lease, 0
        if lease:
            await self.etcd.lease_revoke(lease)

    async def _register(self) -> None:
        lease, _ = await self.etcd.lease_grant(self.ttl)
        # Put unconditionally: a restarted backend takes over its node's key from its predecessor,
        # whose lease then ends without deleting it, so a quick restart is not a node failure.
        value = dumps(Heartbeat(self.node, os.getpid(), time.time(), lease))
        await self.etcd.put(HEARTBEATS + self.node, value, lease)
        await self._set(lease)
        log.info("heartbeat of %s registered (lease %x, ttl %ds)", self.node, lease, self.ttl)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)  # the renewal period itself
            if await self.etcd.lease_keepalive(self.lease) == 0:
                log.warning("heartbeat lease of %s expired; registering again", self.node)
                return
            if await self.etcd.get(HEARTBEATS + self.node) is None:
                log.warning("heartbeat key of %s was deleted; registering again", self.node)
                return

    async def _set(self, lease: int) -> None:
        async with self._changed:
            if lease:
                self.generation += 1
            self.lease = lease
            self._changed.notify_all()
