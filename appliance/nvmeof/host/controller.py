"""An NVMe-oF controller as the host sees it: admin queue, enable sequence, namespaces, I/O queues.

The bring-up follows SPDK's host (``nvme_ctrlr_process_init``) so real targets see a familiar
order: Connect, Property Get VS/CAP/CC, Set CC.EN, poll CSTS.RDY, Identify Controller, AER
config and AERs, Get Features KATO, Number of Queues, the namespace scan, then the I/O queues.
After a connection loss a supervisor task rebuilds every queue with bounded backoff while I/O
waits and is re-issued; commands that timed out fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ..identify import IdentifyController, IdentifyNamespace, NamespaceIds, unpack_nsid_list
from ..pdu import Sqe
from ..spec import (
    CC_EN,
    CC_SHN_MASK,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK,
    DISCOVERY_NQN,
    NVME_PORT,
    VS_1_3,
    AdminOpcode,
    Cns,
    FabricsType,
    Feature,
    IoOpcode,
    LogPage,
    Property,
    Status,
    status_name,
)
from .errors import NvmeError, NvmeTimeout, NvmeTransportError
from .queue import Queue, new_hostid

ADMIN_SQSIZE = 31  # 0's based, as Linux and SPDK hosts send
CONTROLLER_ID_DYNAMIC = 0xFFFF
CC_IO_ENTRY_SIZES = (6 << 16) | (4 << 20)  # IOSQES 64 bytes, IOCQES 16 bytes
CC_SHN_NORMAL = 1 << 14
CSTS_CFS = 0x2
MAX_AERS = 8
AEN_NOTICE = 2
AEN_NS_CHANGED = 0x00
AEC_CRITICAL_WARNINGS = 0x1F
AEC_DISCOVERY_CHANGE = 1 << 31
OAES_NOTICES = (1 << 8) | (1 << 9) | (1 << 11)
MAX_NLB = 1 << 16
POLL_INTERVAL = 0.01
IO_ATTEMPTS = 3
_TO_TARGET = {IoOpcode.READ: False, IoOpcode.WRITE: True, IoOpcode.COMPARE: True}

T = TypeVar("T")

IoDone = Callable[[Any, BaseException | None], None]
"""The callback of :meth:`Controller.start_io`: ``done(ctx, error)``, error None on success."""


def default_hostnqn() -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuidlib.uuid4()}"


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    nsid: int
    block_size: int
    num_blocks: int
    nguid: bytes
    eui64: bytes
    uuid: uuidlib.UUID | None


class AdminResult(NamedTuple):
    result: int  # CQE DW0 | DW1 << 32
    data: bytes


class _Session(NamedTuple):
    """Everything one successful bring-up produced; replaced as a whole on reconnect."""

    admin: Queue
    io: list[Queue]
    cntlid: int
    cap: int
    vs: int
    identify: IdentifyController
    kato_ms: int
    aers: int
    namespaces: dict[int, NamespaceInfo]


class Controller:
    """A connected controller; build it with :meth:`connect`, end it with :meth:`close`."""

    def __init__(
        self, traddr: str, trsvcid: int, subnqn: str, hostnqn: str, hostid: bytes, io_queues: int,
        queue_depth: int, hdgst: bool, ddgst: bool, kato_ms: int, timeout: float, reconnect_timeout: float,
    ):  # fmt: skip
        self.traddr = traddr
        self.trsvcid = trsvcid
        self.subnqn = subnqn
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.requested_io_queues = io_queues
        self.queue_depth = queue_depth
        self.hdgst = hdgst
        self.ddgst = ddgst
        self.kato_ms = kato_ms
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self.events: list[int] = []  # DW0 of every asynchronous event received
        self._session: _Session | None = None
        self._io: list[Queue] = []
        self._limits: dict[int, tuple[int, int]] = {}
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._failure: NvmeError | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._supervisor: asyncio.Task | None = None
        self._ns_changed = asyncio.Event()
        self._io_tasks: set[asyncio.Task] = set()  # slow-path I/O of start_io

    # ------------------------------------------------------------------ connect / close

    @classmethod
    async def connect(
        cls,
        traddr: str,
        trsvcid: int | str = NVME_PORT,
        subnqn: str = DISCOVERY_NQN,
        hostnqn: str | None = None,
        hostid: bytes | uuidlib.UUID | None = None,
        io_queues: int = 1,
        queue_depth: int = 128,
        hdgst: bool = False,
        ddgst: bool = False,
        kato_ms: int = 10000,
        timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
    ) -> Controller:
        """Connect the admin queue, bring the controller up and connect ``io_queues`` I/O queues."""
        if not 1 <= int(trsvcid) <= 65535:
            raise ValueError(f"port {trsvcid} out of range 1..65535")
        if io_queues < 1 or queue_depth < 1:
            raise ValueError("io_queues and queue_depth must be at least 1")
        if isinstance(hostid, uuidlib.UUID):
            hostid = hostid.bytes
        ctrl = cls(
            traddr, int(trsvcid), subnqn, hostnqn or default_hostnqn(), hostid or new_hostid(), io_queues,
            queue_depth, hdgst, ddgst, kato_ms, timeout, reconnect_timeout,
        )  # fmt: skip
        ctrl._activate(await ctrl._bring_up())
        ctrl._supervisor = asyncio.create_task(ctrl._supervise(), name=f"nvme-supervisor {subnqn}")
        return ctrl

    @classmethod
    async def connect_discovered(cls, entry, **options) -> Controller:
        """Connect to a subsystem named by a discovery log entry."""
        return await cls.connect(entry.traddr.strip(), int(entry.trsvcid.strip()), entry.subnqn, **options)

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Shut down like Linux: close I/O queues, CC.SHN=01, wait for SHST=10 (bounded), close admin."""
        if self._closing:
            return
        self._closing = True
        tasks = [*self._tasks, *([self._supervisor] if self._supervisor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session = self._session
        if session is None:
            return
        for queue in session.io:
            await queue.close()
        if not session.admin.closed:
            with contextlib.suppress(NvmeError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    cc = await self._prop_get(session.admin, Property.CC)
                    await self._prop_set(session.admin, Property.CC, (cc & ~CC_SHN_MASK) | CC_SHN_NORMAL)
                    while (await self._prop_get(session.admin, Property.CSTS)) & CSTS_SHST_MASK != (
                        CSTS_SHST_COMPLETE
                    ):
                        await asyncio.sleep(POLL_INTERVAL)
        await session.admin.close()
        self._ready.set()

    # ------------------------------------------------------------------ public state

    @property
    def identify(self) -> IdentifyController:
        return self._current().identify

    @property
    def cntlid(self) -> int:
        return self._current().cntlid

    @property
    def namespaces(self) -> dict[int, NamespaceInfo]:
        return self._current().namespaces

    @property
    def is_discovery(self) -> bool:
        return self.subnqn == DISCOVERY_NQN

    @property
    def io_queues(self) -> int:
        return len(self._io)

    @property
    def digests(self) -> tuple[bool, bool]:
        """(header, data) digests in use, as negotiated on the admin queue."""
        return self._current().admin.digests

    @property
    def cap(self) -> int:
        return self._current().cap

    @property
    def kato(self) -> int:
        """The keep-alive timeout in effect, ms (what Get Features KATO reported)."""
        return self._current().kato_ms

    def namespace_change(self):
        """Awaitable completed by the next rescan after an event; take it before causing the change."""
        return self._ns_changed.wait()

    def _current(self) -> _Session:
        if self._session is None:
            raise NvmeTransportError(f"controller {self.subnqn} is not connected")
        return self._session

    # ------------------------------------------------------------------ bring-up

    async def _bring_up(self) -> _Session:
        admin = await Queue.open(
            self.traddr, self.trsvcid, qid=0, depth=ADMIN_SQSIZE, hdgst=self.hdgst, ddgst=self.ddgst,
            timeout=self.timeout, on_lost=self._queue_lost,
        )  # fmt: skip
        io: list[Queue] = []
        try:
            cntlid = await self._connect_queue(admin, CONTROLLER_ID_DYNAMIC, ADMIN_SQSIZE)
            vs = await self._prop_get(admin, Property.VS)
            cap = await self._prop_get(admin, Property.CAP, wide=True)
            await self._enable(admin, cap)
            ident = IdentifyController.unpack(await self._identify(admin, Cns.CONTROLLER))
            discovery = self.is_discovery or ident.cntrltype == 2
            aers = await self._configure_events(admin, ident, discovery)
            kato = await self._keep_alive_timeout(admin, ident, discovery)
            namespaces: dict[int, NamespaceInfo] = {}
            if not discovery:
                nqueues = await self._negotiate_queues(admin)
                namespaces = await self._scan(admin, ident, vs)
                io = await self._connect_io(cntlid, cap, ident, nqueues)
        except BaseException:
            for queue in [admin, *io]:
                await queue.close()
            raise
        return _Session(admin, io, cntlid, cap, vs, ident, kato, aers, namespaces)

    def _activate(self, session: _Session) -> None:
        """Make a freshly built session current and start its keep-alive and event tasks."""
        self._session = session
        self._io = session.io
        self._limits_for(session.namespaces, session.identify, session.cap)
        self._failure = None
        name = self.subnqn
        self._tasks = [asyncio.create_task(self._events(session), name=f"nvme-aen {name}")]
        if session.kato_ms:
            self._tasks.append(asyncio.create_task(self._keep_alive(session), name=f"nvme-keepalive {name}"))
        self._ready.set()
        if any(q.closed for q in [session.admin, *session.io]):
            self._queue_lost(session.admin)

    async def _connect_queue(self, queue: Queue, cntlid: int, sqsize: int) -> int:
        kato = self.kato_ms if queue.qid == 0 else 0
        try:
            return await queue.connect(self.subnqn, self.hostnqn, self.hostid, cntlid, sqsize, kato)
        except NvmeError as e:
            if isinstance(e, NvmeTransportError | NvmeTimeout):
                raise
            raise NvmeError(
                e.status,
                f"Connect to {self.subnqn} at {self.traddr}:{self.trsvcid} as {self.hostnqn} "
                f"(qid {queue.qid}) "
                f"failed: {status_name(e.status)}{_connect_detail(e)}",
            ) from e

    async def _enable(self, admin: Queue, cap: int) -> None:
        """CC.EN=1 with 64/16-byte entries, first disabling a controller left enabled; poll CSTS.RDY."""
        ready_timeout = max(((cap >> 24) & 0xFF) * 0.5, 0.5)
        cc = await self._prop_get(admin, Property.CC)
        await self._prop_get(admin, Property.CSTS)
        if cc & CC_EN:
            await self._wait_ready(admin, True, ready_timeout)
            await self._prop_set(admin, Property.CC, cc & ~CC_EN)
            await self._wait_ready(admin, False, ready_timeout)
        await self._prop_set(admin, Property.CC, CC_EN | CC_IO_ENTRY_SIZES)
        await self._wait_ready(admin, True, ready_timeout)

    async def _wait_ready(self, admin: Queue, ready: bool, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                while True:
                    csts = await self._prop_get(admin, Property.CSTS)
                    if csts & CSTS_CFS:
                        raise NvmeError(
                            Status.INTERNAL_ERROR, f"controller {self.subnqn} reports fatal status"
                        )
                    if bool(csts & CSTS_RDY) == ready:
                        return
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            raise NvmeTimeout(
                f"controller {self.subnqn}: CSTS.RDY did not become {int(ready)} in {limit}s"
            ) from None

    async def _configure_events(self, admin: Queue, ident: IdentifyController, discovery: bool) -> int:
        """Set Features AEC (failure tolerated, then no AERs); returns how many AERs to keep posted."""
        aec = AEC_DISCOVERY_CHANGE if discovery else AEC_CRITICAL_WARNINGS | (ident.oaes & OAES_NOTICES)
        try:
            await self._admin(
                admin, Sqe(AdminOpcode.SET_FEATURES, cdw10=Feature.ASYNC_EVENT_CONFIG, cdw11=aec)
            )
        except NvmeError as e:
            if isinstance(e, NvmeTransportError | NvmeTimeout):
                raise
            return 0
        return min(ident.aerl + 1, MAX_AERS)

    async def _keep_alive_timeout(self, admin: Queue, ident: IdentifyController, discovery: bool) -> int:
        """Get Features KATO like SPDK: Invalid Field means 'use ours', other errors fail the bring-up."""
        if not self.kato_ms or (ident.kas == 0 and not discovery):
            return 0
        try:
            sqe = Sqe(AdminOpcode.GET_FEATURES, cdw10=Feature.KEEP_ALIVE_TIMER)
            return (await self._admin(admin, sqe)).result & 0xFFFFFFFF or self.kato_ms
        except NvmeError as e:
            if e.status != Status.INVALID_FIELD:
                raise
            return self.kato_ms

    async def _negotiate_queues(self, admin: Queue) -> int:
        n = self.requested_io_queues - 1
        sqe = Sqe(AdminOpcode.SET_FEATURES, cdw10=Feature.NUMBER_OF_QUEUES, cdw11=n | (n << 16))
        granted = (await self._admin(admin, sqe)).result
        return max(1, min(self.requested_io_queues, (granted & 0xFFFF) + 1, ((granted >> 16) & 0xFFFF) + 1))

    async def _scan(self, admin: Queue, ident: IdentifyController, vs: int) -> dict[int, NamespaceInfo]:
        """Active NSID list (CNS 2, paged), then CNS 0 and CNS 3 (failure tolerated) per namespace."""
        if vs < 0x00010100:
            nsids = list(range(1, ident.nn + 1))
        else:
            nsids, last = [], 0
            while True:
                page = unpack_nsid_list(await self._identify(admin, Cns.ACTIVE_NS_LIST, last))
                nsids += page
                if len(page) < 1024:
                    break
                last = page[-1]
        found = {}
        for nsid in nsids:
            ns = IdentifyNamespace.unpack(await self._identify(admin, Cns.NAMESPACE, nsid))
            if ns.nsze == 0:
                continue
            ids = NamespaceIds()
            if vs >= VS_1_3:
                try:
                    ids = NamespaceIds.unpack(await self._identify(admin, Cns.NS_DESC_LIST, nsid))
                except NvmeError as e:
                    if isinstance(e, NvmeTransportError | NvmeTimeout):
                        raise
            found[nsid] = NamespaceInfo(nsid, ns.block_size, ns.nsze, ns.nguid, ns.eui64, ids.uuid)
        return found

    async def _connect_io(self, cntlid: int, cap: int, ident: IdentifyController, count: int) -> list[Queue]:
        """Open and connect I/O queues in parallel: SQSIZE = min(depth, MQES) so SQ flow control holds."""
        mqes = cap & 0xFFFF
        sqsize = max(1, min(self.queue_depth, mqes))
        outstanding = min(sqsize, ident.maxcmd or sqsize)
        inline = max(0, ident.ioccsz * 16 - 64)

        async def one(qid: int) -> Queue:
            queue = await Queue.open(
                self.traddr, self.trsvcid, qid=qid, depth=outstanding, hdgst=self.hdgst, ddgst=self.ddgst,
                timeout=self.timeout, on_lost=self._queue_lost,
            )  # fmt: skip
            try:
                await self._connect_queue(queue, cntlid, sqsize)
            except BaseException:
                await queue.close()
                raise
            queue.inline_limit = inline
            return queue

        results = await asyncio.gather(*(one(qid) for qid in range(1, count + 1)), return_exceptions=True)
        queues = [r for r in results if isinstance(r, Queue)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for queue in queues:
                await queue.close()
            raise failure
        return queues

    # ------------------------------------------------------------------ background tasks

    async def _keep_alive(self, session: _Session) -> None:
        """Keep Alive every KATO/2; on failure drop the admin connection so the supervisor reconnects."""
        period = session.kato_ms / 2000
        while True:
            await asyncio.sleep(period)
            try:
                await self._admin(session.admin, Sqe(AdminOpcode.KEEP_ALIVE))
            except NvmeError:
                session.admin.abort()
                return

    async def _events(self, session: _Session) -> None:
        """Keep the AERs posted; on a namespace notice read the changed-NS log and rescan."""
        admin = session.admin
        aer = Sqe(AdminOpcode.ASYNC_EVENT_REQUEST)
        pending = {admin.submit(aer, expires=False) for _ in range(session.aers)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
                for fut in done:
                    if fut.exception() is not None:
                        if isinstance(fut.exception(), NvmeTransportError):
                            return
                        continue  # e.g. AER limit exceeded: keep the others
                    dw0 = fut.result() & 0xFFFFFFFF
                    self.events.append(dw0)
                    lid = (dw0 >> 16) & 0xFF
                    if lid:  # reading the log page re-arms the event on the controller
                        with contextlib.suppress(NvmeError):
                            await self.get_log_page(lid, 4096 if lid == LogPage.CHANGED_NS_LIST else 512)
                    if dw0 & 0x7 == AEN_NOTICE and (dw0 >> 8) & 0xFF == AEN_NS_CHANGED:
                        await self._rescan(session)
                    pending.add(admin.submit(aer, expires=False))
        finally:
            for fut in pending:
                fut.cancel()  # outstanding AERs end with the connection; nobody awaits them

    async def _rescan(self, session: _Session) -> None:
        namespaces = await self._scan(session.admin, session.identify, session.vs)
        self._session = session._replace(namespaces=namespaces)
        self._limits_for(namespaces, session.identify, session.cap)
        event, self._ns_changed = self._ns_changed, asyncio.Event()
        event.set()

    def _queue_lost(self, queue: Queue) -> None:
        session = self._session
        if self._closing or session is None or (queue is not session.admin and queue not in session.io):
            return
        self._ready.clear()
        self._lost.set()

    async def _supervise(self) -> None:
        """Reconnect every queue after a loss, backing off from 50 ms to 2 s within ``reconnect_timeout``."""
        loop = asyncio.get_running_loop()
        while True:
            await self._lost.wait()
            self._lost.clear()
            old = self._session
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            if old is not None:
                for queue in [*old.io, old.admin]:
                    await queue.close()
            deadline = loop.time() + self.reconnect_timeout
            delay = 0.05
            while True:
                try:
                    session = await self._bring_up()
                    break
                except (NvmeError, OSError) as e:
                    if loop.time() + delay > deadline:
                        self._failure = NvmeTransportError(
                            f"controller {self.subnqn} at {self.traddr}:{self.trsvcid} lost and not "
                            f"reconnected within {self.reconnect_timeout:g}s: {e}"
                        )
                        self._ready.set()
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.reconnects += 1
            self._activate(session)

    async def _await_ready(self) -> None:
        """Wait for a reconnect in progress; raise if the controller is closed or gave up."""
        if not self._ready.is_set():
            async with asyncio.timeout(self.reconnect_timeout + self.timeout):
                await self._ready.wait()
        if self._closing:
            raise NvmeTransportError(f"controller {self.subnqn} is closed")
        if self._failure is not None:
            raise self._failure

    # ------------------------------------------------------------------ admin commands

    async def _admin(self, admin: Queue, sqe: Sqe, data_in_len: int = 0, data_out=b"") -> AdminResult:
        buf = bytearray(data_in_len)
        result = await admin.command(sqe, memoryview(buf) if data_in_len else None, data_out or None)
        return AdminResult(result, bytes(buf))

    async def _identify(self, admin: Queue, cns: int, nsid: int = 0) -> bytes:
        """The 4 KiB data structure of Identify ``cns``."""
        return (await self._admin(admin, Sqe(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns), 4096)).data

    async def admin(self, sqe: Sqe, data_in_len: int = 0, data_out: bytes = b"") -> AdminResult:
        """Raw admin passthrough: returns (CQE DW0 | DW1 << 32, data read)."""
        await self._await_ready()
        return await self._admin(self._current().admin, sqe, data_in_len, data_out)

    async def get_log_page(self, lid: int, length: int, offset: int = 0, nsid: int = 0xFFFFFFFF) -> bytes:
        if length <= 0 or length % 4 or offset % 4:
            raise ValueError("log page length and offset must be positive multiples of 4")
        numd = length // 4 - 1
        sqe = Sqe(
            AdminOpcode.GET_LOG_PAGE, nsid=nsid, cdw10=(lid & 0xFF) | ((numd & 0xFFFF) << 16),
            cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32,
        )  # fmt: skip
        return (await self.admin(sqe, length)).data

    async def get_features(self, fid: int, cdw11: int = 0, sel: int = 0, nsid: int = 0) -> int:
        sqe = Sqe(AdminOpcode.GET_FEATURES, nsid=nsid, cdw10=(fid & 0xFF) | ((sel & 0x7) << 8), cdw11=cdw11)
        return (await self.admin(sqe)).result & 0xFFFFFFFF

    async def set_features(self, fid: int, value: int, save: bool = False, nsid: int = 0) -> int:
        sqe = Sqe(
            AdminOpcode.SET_FEATURES, nsid=nsid, cdw10=(fid & 0xFF) | (1 << 31 if save else 0), cdw11=value
        )
        return (await self.admin(sqe)).result & 0xFFFFFFFF

    async def _prop_get(self, admin: Queue, prop: int, wide: bool = False) -> int:
        sqe = Sqe(AdminOpcode.FABRICS, nsid=FabricsType.PROPERTY_GET, cdw10=int(wide), cdw11=prop)
        return await admin.command(sqe)

    async def _prop_set(self, admin: Queue, prop: int, value: int) -> None:
        sqe = Sqe(AdminOpcode.FABRICS, nsid=FabricsType.PROPERTY_SET, cdw11=prop, cdw12=value)
        await admin.command(sqe)

    # ------------------------------------------------------------------ I/O

    def _pick(self) -> Queue:
        """The I/O queue with the fewest commands outstanding."""
        queues = self._io
        return queues[0] if len(queues) == 1 else min(queues, key=_outstanding)

    def _limits_for(self, namespaces: dict[int, NamespaceInfo], ident: IdentifyController, cap: int) -> None:
        """Per namespace: (block size, most blocks per command given MDTS and the 16-bit NLB)."""
        page = 4096 << ((cap >> 48) & 0xF)
        limits = {}
        for nsid, ns in namespaces.items():
            most = MAX_NLB if not ident.mdts else min(MAX_NLB, (page << ident.mdts) // ns.block_size)
            limits[nsid] = (ns.block_size, max(1, most))
        self._limits = limits

    async def read(self, nsid: int, slba: int, buf) -> None:
        """Read ``len(buf) // block_size`` blocks into ``buf``; the data lands there without copies."""
        await self._transfer(IoOpcode.READ, nsid, slba, buf, False)

    async def write(self, nsid: int, slba: int, data) -> None:
        await self._transfer(IoOpcode.WRITE, nsid, slba, data, True)

    async def compare(self, nsid: int, slba: int, data) -> None:
        """Raises NvmeError COMPARE_FAILURE when the blocks differ from ``data``."""
        await self._transfer(IoOpcode.COMPARE, nsid, slba, data, True)

    def start_io(self, opcode: int, nsid: int, slba: int, buf, done: IoDone, ctx: Any = None) -> None:
        """Start a Read, Write or Compare; ``done(ctx, error)`` runs when it has ended (error None if ok).

        For load generators: it behaves like :meth:`read`/:meth:`write` (MDTS splitting, waiting out
        a reconnect, re-issue after a transport error), but the common case, one command on a
        queue with a free slot, costs no Future or task. Bad arguments raise here.
        """
        to_target = _TO_TARGET.get(opcode)
        if to_target is None:
            raise ValueError(f"start_io takes Read, Write or Compare, not opcode 0x{opcode:02x}")
        view, nlb, chunk = self._io_buffer(nsid, buf, to_target)
        queue = self._pick()
        if nlb <= chunk and queue.can_start:
            args = (opcode, nsid, slba, nlb, view, to_target, done, ctx)
            queue.start_rw(opcode, nsid, slba, nlb, view, to_target, self._io_done, args)
        else:
            self._io_task(self._transfer(opcode, nsid, slba, view, to_target), done, ctx)

    def _io_done(self, args: tuple, result: int, error: NvmeError | None) -> None:
        """Queue callback of :meth:`start_io`: after a transport error re-issue like :meth:`_transfer`."""
        opcode, nsid, slba, nlb, view, to_target, done, ctx = args
        if isinstance(error, NvmeTransportError) and not self._closing:
            self._io_task(self._reissue(opcode, nsid, slba, nlb, view, to_target), done, ctx)
        else:
            done(ctx, error)

    def _io_task(self, work: Coroutine[Any, Any, None], done: IoDone, ctx: Any) -> None:
        """Run ``work`` as a task that reports to ``done`` (the slow path of :meth:`start_io`)."""
        task = asyncio.create_task(work)
        self._io_tasks.add(task)

        def finished(task: asyncio.Task) -> None:
            self._io_tasks.discard(task)
            done(ctx, asyncio.CancelledError() if task.cancelled() else task.exception())

        task.add_done_callback(finished)

    def _io_buffer(self, nsid: int, buf, to_target: bool) -> tuple[memoryview, int, int]:
        """Check an I/O buffer: (byte view of it, blocks, most blocks per command)."""
        limits = self._limits.get(nsid)
        if limits is None:
            raise NvmeError(Status.INVALID_NAMESPACE, f"{self.subnqn} has no active namespace {nsid}")
        block_size, chunk = limits
        view = buf if type(buf) is memoryview else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        if not size or size % block_size or not view.contiguous:
            raise ValueError(f"buffer length {size} is not a positive multiple of {block_size}")
        if not to_target and view.readonly:
            raise ValueError("read buffer must be writable")
        return view, size // block_size, chunk

    async def _transfer(self, opcode: int, nsid: int, slba: int, buf, to_target: bool) -> None:
        view, nlb, chunk = self._io_buffer(nsid, buf, to_target)
        block_size = len(view) // nlb
        if nlb <= chunk:
            try:  # the common case, without the retry loop
                return await self._pick().rw(opcode, nsid, slba, nlb, view, to_target)
            except NvmeTransportError:
                if self._closing:
                    raise
            return await self._reissue(opcode, nsid, slba, nlb, view, to_target)
        parts = [
            self._rw(opcode, nsid, slba + i, min(chunk, nlb - i),
                     view[i * block_size : (i + min(chunk, nlb - i)) * block_size], to_target)
            for i in range(0, nlb, chunk)
        ]  # fmt: skip
        await asyncio.gather(*parts)

    async def _reissue(
        self, opcode: int, nsid: int, slba: int, nlb: int, view: memoryview, to_target: bool
    ) -> None:
        """After a transport error: wait for the reconnect, then run the command again."""
        await self._await_ready()
        await self._rw(opcode, nsid, slba, nlb, view, to_target)

    async def _retrying(self, run: Callable[[Queue], Awaitable[T]]) -> T:
        """``run`` on the least busy I/O queue; after a transport error wait for the reconnect and retry."""
        for _ in range(IO_ATTEMPTS - 1):
            try:
                return await run(self._pick())
            except NvmeTransportError:
                if self._closing:
                    raise
            await self._await_ready()
        return await run(self._pick())

    async def _rw(
        self, opcode: int, nsid: int, slba: int, nlb: int, view: memoryview, to_target: bool
    ) -> None:
        await self._retrying(lambda queue: queue.rw(opcode, nsid, slba, nlb, view, to_target))

    async def _io_command(self, sqe: Sqe, data_out: bytes | None = None) -> int:
        return await self._retrying(lambda queue: queue.command(sqe, data_out=data_out))

    async def flush(self, nsid: int) -> None:
        await self._io_command(Sqe(IoOpcode.FLUSH, nsid=nsid))

    async def write_zeroes(self, nsid: int, slba: int, nlb: int, deallocate: bool = False) -> None:
        if not 1 <= nlb <= MAX_NLB:
            raise ValueError(f"write_zeroes of {nlb} blocks: must be 1..{MAX_NLB}")
        cdw12 = (nlb - 1) | ((1 << 25) if deallocate else 0)
        await self._io_command(
            Sqe(IoOpcode.WRITE_ZEROES, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=cdw12)
        )

    async def deallocate(self, nsid: int, ranges: list[tuple[int, int]]) -> None:
        """Dataset Management with AD for up to 256 (slba, nlb) ranges."""
        if not 1 <= len(ranges) <= 256:
            raise ValueError("deallocate takes 1..256 ranges")
        data = bytearray(16 * len(ranges))
        for i, (slba, nlb) in enumerate(ranges):
            data[16 * i + 4 : 16 * i + 8] = nlb.to_bytes(4, "little")
            data[16 * i + 8 : 16 * i + 16] = slba.to_bytes(8, "little")
        sqe = Sqe(IoOpcode.DATASET_MANAGEMENT, nsid=nsid, cdw10=len(ranges) - 1, cdw11=0x4)
        await self._io_command(sqe, bytes(data))


_outstanding = operator.attrgetter("outstanding")


def _connect_detail(error: NvmeError) -> str:
    """Say which Connect parameter the controller rejected (IATTR/IPO in DW0)."""
    if error.status == Status.CONNECT_INVALID_HOST:
        return ": host NQN not allowed"
    if error.status != Status.CONNECT_INVALID_PARAMETERS:
        return ""
    result = getattr(error, "result", 0)
    ipo, iattr = result & 0xFFFF, (result >> 16) & 0xFF
    if iattr == 1:
        field = {16: "CNTLID", 256: "SUBNQN", 512: "HOSTNQN"}.get(ipo, f"connect data offset {ipo}")
    else:
        field = {42: "QID", 44: "SQSIZE"}.get(ipo, f"SQE offset {ipo}")
    return f": invalid {field}"
