"""The soft NVMe/TCP target: listening sockets, live connections and controllers.

``TargetServer`` owns a :class:`~.model.Target` (the configuration) and is its engine: the model
tells it when listeners, namespaces, hosts or subsystems change, and it opens sockets, sends
asynchronous events or drops controllers accordingly.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from .connection import Connection
from .controller import Controller
from .model import ListenAddress, Subsystem, Target

log = logging.getLogger(__name__)

MIN_CNTLID, MAX_CNTLID = 1, 0xFFEF
BDEV_WORKERS = 4
CLOSE_TIMEOUT = 10.0


class TargetServer:
    """Serves every subsystem of ``self.target`` over NVMe/TCP."""

    def __init__(self) -> None:
        self.target = Target(self)
        self.genctr = 0
        self.pool = ThreadPoolExecutor(max_workers=BDEV_WORKERS, thread_name_prefix="kahu-bdev")
        self._listeners: dict[tuple[str, str], asyncio.Server] = {}
        self._controllers: dict[str, dict[int, Controller]] = {}
        self._next_cntlid: dict[str, int] = {}
        self._connections: set[Connection] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    async def start(self) -> None:
        """Nothing to start until listeners are configured; kept for a symmetric lifetime."""

    async def stop(self) -> None:
        """Close listeners and connections, wait for blocking I/O to finish, close bdevs."""
        for key in list(self._listeners):
            srv = self._listeners.pop(key)
            srv.close()
            await srv.wait_closed()
        for sub in list(self._controllers):
            for ctrl in list(self._controllers[sub].values()):
                self.destroy_controller(ctrl)
        for conn in list(self._connections):
            conn.close()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await self._all_closed.wait()
        await asyncio.to_thread(self.pool.shutdown, True)
        for bdev in self.target.bdevs.values():
            bdev.close()
        self.target.bdevs.clear()

    async def __aenter__(self) -> TargetServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ addresses

    def bound_port(self, address: ListenAddress) -> int:
        """The port a listener really bound, e.g. when trsvcid "0" asked for any port."""
        return self._listeners[(address.traddr, address.trsvcid)].sockets[0].getsockname()[1]

    def bound_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every open listener, in the order they were opened."""
        return [srv.sockets[0].getsockname()[:2] for srv in self._listeners.values()]

    # ------------------------------------------------------------------ Engine

    async def listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: Connection(self, address), host=address.traddr, port=address.port,
            reuse_address=True, backlog=256,
        )  # fmt: skip
        self._listeners[(address.traddr, address.trsvcid)] = srv
        log.info("listening on %s:%s", address.traddr, self.bound_port(address))

    async def unlisten(self, address: ListenAddress) -> None:
        key = (address.traddr, address.trsvcid)
        srv = self._listeners.pop(key, None)
        if srv is None:
            return
        srv.close()
        for conn in list(self._connections):
            if (conn.listener.traddr, conn.listener.trsvcid) == key:
                self._drop_connection(conn)
        await srv.wait_closed()

    def namespaces_changed(self, subsystem: Subsystem, nsids: list[int]) -> None:
        for ctrl in list(self._controllers.get(subsystem.nqn, {}).values()):
            ctrl.namespaces_changed(nsids)

    def access_changed(self, subsystem: Subsystem) -> None:
        for ctrl in list(self._controllers.get(subsystem.nqn, {}).values()):
            if not subsystem.host_allowed(ctrl.hostnqn):
                log.info("host %s lost access to %s", ctrl.hostnqn, subsystem.nqn)
                self.destroy_controller(ctrl)

    def subsystem_deleted(self, subsystem: Subsystem) -> None:
        for ctrl in list(self._controllers.get(subsystem.nqn, {}).values()):
            self.destroy_controller(ctrl)
        self._controllers.pop(subsystem.nqn, None)
        self._next_cntlid.pop(subsystem.nqn, None)

    def discovery_changed(self) -> None:
        self.genctr += 1
        for controllers in self._controllers.values():
            for ctrl in list(controllers.values()):
                if ctrl.subsystem.is_discovery:
                    ctrl.discovery_changed()

    # ------------------------------------------------------------------ controllers

    def create_controller(
        self, sub: Subsystem, hostnqn: str, admin: Connection, kato: int
    ) -> Controller | None:
        """A controller with a CNTLID unique in its subsystem, or None when all are taken."""
        controllers = self._controllers.setdefault(sub.nqn, {})
        cntlid = self._next_cntlid.get(sub.nqn, MIN_CNTLID)
        for _ in range(MAX_CNTLID):
            if cntlid not in controllers:
                break
            cntlid = cntlid + 1 if cntlid < MAX_CNTLID else MIN_CNTLID
        else:
            return None
        self._next_cntlid[sub.nqn] = cntlid + 1 if cntlid < MAX_CNTLID else MIN_CNTLID
        ctrl = Controller(self, sub, cntlid, hostnqn, admin, kato)
        controllers[cntlid] = ctrl
        log.info("controller %d of %s for host %s (%s)", cntlid, sub.nqn, hostnqn, admin.peer)
        return ctrl

    def find_controller(self, sub: Subsystem, cntlid: int) -> Controller | None:
        return self._controllers.get(sub.nqn, {}).get(cntlid)

    def controllers(self, sub: Subsystem) -> list[Controller]:
        return list(self._controllers.get(sub.nqn, {}).values())

    def destroy_controller(self, ctrl: Controller) -> None:
        if ctrl.destroyed:
            return
        controllers = self._controllers.get(ctrl.subsystem.nqn, {})
        if controllers.get(ctrl.cntlid) is ctrl:
            del controllers[ctrl.cntlid]
        ctrl.close_queues()

    # ------------------------------------------------------------------ connections

    def connection_made(self, conn: Connection) -> None:
        self._connections.add(conn)
        self._all_closed.clear()

    def connection_lost(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._all_closed.set()
        self._drop_connection(conn)

    def _drop_connection(self, conn: Connection) -> None:
        """A queue went away: losing the admin queue ends its controller."""
        ctrl = conn.ctrl
        if ctrl is not None:
            if conn.qid == 0:
                self.destroy_controller(ctrl)
            elif ctrl.io_queues.get(conn.qid) is conn:
                del ctrl.io_queues[conn.qid]
        conn.close()
