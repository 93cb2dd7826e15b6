"""One NVMe controller: registers, features, keep-alive, asynchronous events and admin commands.

A controller is created by an admin-queue Connect and shared by that host's I/O queues; it lives
until its admin queue closes, its keep-alive timer expires or the configuration takes it away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..identify import IDENTIFY_SIZE
from ..pdu import Sqe
from ..spec import (
    CC_EN,
    CC_SHN_MASK,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK,
    VS_1_3,
    AdminOpcode,
    Cns,
    Feature,
    LogPage,
    Property,
    Status,
)
from . import pages
from .discovery import discovery_log
from .model import Subsystem

if TYPE_CHECKING:
    from .connection import Connection
    from .server import TargetServer

log = logging.getLogger(__name__)

# (status, dw0, data to return or None); None instead of a tuple means "answered later" (AER).
Reply = tuple[int, int, bytes | bytearray | memoryview | None]

AER_LIMIT = 4  # AERL + 1
AEN_NS_CHANGED = 0x2 | (0x00 << 8) | (LogPage.CHANGED_NS_LIST << 16)
AEN_DISCOVERY_CHANGED = 0x2 | (0xF0 << 8) | (LogPage.DISCOVERY << 16)
AEC_NS_ATTRIBUTE = 1 << 8
AEC_DISCOVERY = 1 << 31
CSI_NVM = 0
SEL_SUPPORTED = 3
CAPABILITY_CHANGEABLE = 0x4

DEFAULT_FEATURES = {
    Feature.ARBITRATION: 0,
    Feature.POWER_MANAGEMENT: 0,
    Feature.TEMPERATURE_THRESHOLD: 0x157,
    Feature.ERROR_RECOVERY: 0,
    Feature.VOLATILE_WRITE_CACHE: 1,
    Feature.INTERRUPT_COALESCING: 0,
    Feature.INTERRUPT_VECTOR_CONFIG: 0,
    Feature.WRITE_ATOMICITY: 0,
    Feature.ASYNC_EVENT_CONFIG: 0,
}
DISCOVERY_FEATURES = frozenset({Feature.ASYNC_EVENT_CONFIG, Feature.KEEP_ALIVE_TIMER})


def _ok(dw0: int = 0, data: bytes | bytearray | None = None) -> Reply:
    return Status.SUCCESS, dw0, data


def _err(status: int) -> Reply:
    return status, 0, None


class Controller:
    """Controller state for one host association with one subsystem."""

    def __init__(
        self, server: TargetServer, sub: Subsystem, cntlid: int, hostnqn: str, admin: Connection, kato: int
    ):
        self.server = server
        self.subsystem = sub
        self.cntlid = cntlid
        self.hostnqn = hostnqn
        self.admin = admin
        transport = server.target.tcp
        self.transport = transport
        self.cc = 0
        self.csts = 0
        self.features = dict(DEFAULT_FEATURES)
        self.num_io_queues = transport.max_io_qpairs_per_ctrlr
        self.io_queues: dict[int, Connection] = {}
        self._aers: list[int] = []
        self._events: list[int] = []
        self._changed_nsids: list[int] = []
        self._ns_event_masked = False
        self.kato = self._round_kato(kato) if kato else 0
        self._last_keep_alive = 0.0
        self._kato_timer: asyncio.TimerHandle | None = None
        self.destroyed = False
        self._arm_keep_alive()

    # ------------------------------------------------------------------ lifetime

    @property
    def enabled(self) -> bool:
        return bool(self.cc & CC_EN)

    def _round_kato(self, kato: int) -> int:
        unit = self.transport.kas * 100
        return -(-kato // unit) * unit if unit else kato

    def _arm_keep_alive(self) -> None:
        if self._kato_timer:
            self._kato_timer.cancel()
            self._kato_timer = None
        if self.kato:
            loop = asyncio.get_running_loop()
            self._last_keep_alive = loop.time()
            self._kato_timer = loop.call_later(self.kato / 1000, self._check_keep_alive)

    def _check_keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last_keep_alive + self.kato / 1000 - loop.time()
        if left > 0:
            self._kato_timer = loop.call_later(left, self._check_keep_alive)
            return
        log.warning(
            "controller %d of %s: keep-alive timeout (%d ms)", self.cntlid, self.subsystem.nqn, self.kato
        )
        self._kato_timer = None
        self.server.destroy_controller(self)

    def close_queues(self) -> None:
        """Tear the association down: stop the timer, drop AERs, close every queue's connection."""
        self.destroyed = True
        if self._kato_timer:
            self._kato_timer.cancel()
            self._kato_timer = None
        self._aers.clear()
        self._drop_io_queues()
        self.admin.close()

    def _drop_io_queues(self) -> None:
        for conn in list(self.io_queues.values()):
            conn.close()
        self.io_queues.clear()

    # ------------------------------------------------------------------ async events

    def _notify(self, dw0: int) -> None:
        if self._aers:
            self.admin.complete(self._aers.pop(0), Status.SUCCESS, dw0)
            self.admin.flush()
        elif dw0 not in self._events:
            self._events.append(dw0)

    def namespaces_changed(self, nsids: list[int]) -> None:
        for nsid in nsids:
            if nsid not in self._changed_nsids:
                self._changed_nsids.append(nsid)
        if self.features[Feature.ASYNC_EVENT_CONFIG] & AEC_NS_ATTRIBUTE and not self._ns_event_masked:
            self._ns_event_masked = True
            self._notify(AEN_NS_CHANGED)

    def discovery_changed(self) -> None:
        if self.features[Feature.ASYNC_EVENT_CONFIG] & AEC_DISCOVERY:
            self._notify(AEN_DISCOVERY_CHANGED)

    # ------------------------------------------------------------------ properties

    @property
    def cap(self) -> int:
        mqes = self.transport.max_queue_depth - 1
        return mqes | (1 << 16) | (30 << 24) | (1 << 37)

    def property_get(self, size8: bool, offset: int) -> tuple[int, int]:
        regs = {
            Property.CAP: (8, self.cap),
            Property.VS: (4, VS_1_3),
            Property.CC: (4, self.cc),
            Property.CSTS: (4, self.csts),
            Property.AQA: (4, 0),
            Property.ASQ: (8, 0),
            Property.ACQ: (8, 0),
        }
        if offset in regs:
            size, value = regs[offset]
            if size8 and size != 8:
                return Status.CONNECT_INVALID_PARAMETERS, 0
            return Status.SUCCESS, value if size8 else value & 0xFFFFFFFF
        size, value = regs.get(offset - 4, (0, 0))
        if size == 8 and not size8:
            return Status.SUCCESS, value >> 32
        return Status.CONNECT_INVALID_PARAMETERS, 0

    def property_set(self, size8: bool, offset: int, value: int) -> int:
        if offset == Property.CC and not size8:
            self._write_cc(value & 0xFFFFFFFF)
            return Status.SUCCESS
        if offset in (Property.AQA, Property.CSTS) and not size8:
            return Status.SUCCESS
        if offset in (Property.ASQ, Property.ACQ) and size8:
            return Status.SUCCESS
        return Status.CONNECT_INVALID_PARAMETERS

    def _write_cc(self, new: int) -> None:
        old, self.cc = self.cc, new
        if new & CC_EN and not old & CC_EN:
            self.csts = (self.csts & ~CSTS_SHST_MASK) | CSTS_RDY
        elif old & CC_EN and not new & CC_EN:
            self._drop_io_queues()
            self.csts &= ~CSTS_RDY
        if new & CC_SHN_MASK and not old & CC_SHN_MASK:
            self._drop_io_queues()
            self.csts = (self.csts & ~CSTS_SHST_MASK) | CSTS_SHST_COMPLETE

    # ------------------------------------------------------------------ admin commands

    def admin_command(self, sqe: Sqe, data: memoryview | bytearray | bytes) -> Reply | None:
        """Execute one admin command; None when the answer comes later (an AER)."""
        if not self.enabled:
            return _err(Status.COMMAND_SEQUENCE_ERROR)
        opc = sqe.opcode
        if opc == AdminOpcode.KEEP_ALIVE:
            if self._kato_timer:
                self._last_keep_alive = asyncio.get_running_loop().time()
            return _ok()
        if opc == AdminOpcode.IDENTIFY:
            return self._identify(sqe)
        if opc == AdminOpcode.GET_LOG_PAGE:
            return self._get_log_page(sqe)
        if opc == AdminOpcode.SET_FEATURES:
            return self._set_features(sqe)
        if opc == AdminOpcode.GET_FEATURES:
            return self._get_features(sqe)
        if opc == AdminOpcode.ASYNC_EVENT_REQUEST:
            return self._async_event_request(sqe.cid)
        if opc == AdminOpcode.ABORT:
            return _ok(1)  # command not aborted
        return _err(Status.INVALID_OPCODE)

    def _async_event_request(self, cid: int) -> Reply | None:
        if self._events:
            return _ok(self._events.pop(0))
        if len(self._aers) >= AER_LIMIT:
            return _err(Status.AER_LIMIT_EXCEEDED)
        self._aers.append(cid)
        return None

    def _namespace(self, nsid: int) -> tuple[int, object]:
        """(status, namespace or None): inactive but valid NSIDs give (SUCCESS, None)."""
        if nsid == 0 or nsid > self.subsystem.max_namespaces:
            return Status.INVALID_NAMESPACE, None
        return Status.SUCCESS, self.subsystem.namespaces.get(nsid)

    def _identify(self, sqe: Sqe) -> Reply:
        cns = sqe.cdw10 & 0xFF
        csi = sqe.cdw11 >> 24
        sub = self.subsystem
        if cns == Cns.CONTROLLER:
            return _ok(0, pages.identify_controller(sub, self.transport, self.cntlid))
        if sub.is_discovery:
            return _err(Status.INVALID_FIELD)
        if cns in (Cns.ACTIVE_NS_LIST, Cns.CSI_ACTIVE_NS_LIST):
            if cns == Cns.CSI_ACTIVE_NS_LIST and csi != CSI_NVM:
                return _err(Status.INVALID_FIELD)
            if sqe.nsid >= 0xFFFFFFFE:
                return _err(Status.INVALID_NAMESPACE)
            return _ok(0, pages.active_namespaces(sub, sqe.nsid))
        if cns == Cns.CSI_CONTROLLER:
            return _ok(0, bytes(IDENTIFY_SIZE)) if csi == CSI_NVM else _err(Status.INVALID_FIELD)
        if cns == Cns.IO_COMMAND_SET:
            return _ok(0, pages.command_set_vector())
        if cns not in (Cns.NAMESPACE, Cns.NS_DESC_LIST, Cns.CSI_NAMESPACE, Cns.INDEPENDENT_NAMESPACE):
            return _err(Status.INVALID_FIELD)
        if cns == Cns.CSI_NAMESPACE and csi != CSI_NVM:
            return _err(Status.INVALID_FIELD)
        status, ns = self._namespace(sqe.nsid)
        if status:
            return _err(status)
        if ns is None:
            inactive_ok = cns in (Cns.NAMESPACE, Cns.INDEPENDENT_NAMESPACE)
            return _ok(0, bytes(IDENTIFY_SIZE)) if inactive_ok else _err(Status.INVALID_NAMESPACE)
        if cns == Cns.NAMESPACE:
            return _ok(0, pages.identify_namespace(ns))
        if cns == Cns.NS_DESC_LIST:
            return _ok(0, pages.namespace_ids(ns))
        if cns == Cns.CSI_NAMESPACE:
            return _ok(0, bytes(IDENTIFY_SIZE))
        return _ok(0, pages.independent_namespace())

    def _get_log_page(self, sqe: Sqe) -> Reply:
        lid = sqe.cdw10 & 0xFF
        rae = bool(sqe.cdw10 & (1 << 15))
        length = (((sqe.cdw11 & 0xFFFF) << 16 | sqe.cdw10 >> 16) + 1) * 4
        offset = sqe.cdw12 | (sqe.cdw13 << 32)
        if offset & 3 or length > sqe.sgl_len:
            return _err(Status.INVALID_FIELD)
        page = self._log_page(lid, rae)
        if page is None:
            return _err(Status.INVALID_LOG_PAGE)
        out = bytearray(length)
        chunk = page[offset : offset + length]
        out[: len(chunk)] = chunk
        return _ok(0, out)

    def _log_page(self, lid: int, rae: bool) -> bytes | bytearray | None:
        sub = self.subsystem
        if sub.is_discovery:
            if lid != LogPage.DISCOVERY:
                return None
            return discovery_log(self.server, self.hostnqn)
        if lid == LogPage.ERROR:
            return b""
        if lid == LogPage.SMART:
            return pages.smart_log(list(sub.namespaces.values()))
        if lid == LogPage.FIRMWARE_SLOT:
            return pages.firmware_slot_log()
        if lid == LogPage.CHANGED_NS_LIST:
            page = pages.changed_namespace_log(self._changed_nsids)
            if not rae:
                self._changed_nsids.clear()
                self._ns_event_masked = False
            return page
        return None

    def _feature_allowed(self, fid: int) -> bool:
        if self.subsystem.is_discovery:
            return fid in DISCOVERY_FEATURES
        return fid in DEFAULT_FEATURES or fid in (Feature.NUMBER_OF_QUEUES, Feature.KEEP_ALIVE_TIMER)

    def _set_features(self, sqe: Sqe) -> Reply:
        fid = sqe.cdw10 & 0xFF
        value = sqe.cdw11
        if not self._feature_allowed(fid):
            return _err(Status.INVALID_FIELD)
        if sqe.cdw10 & (1 << 31):
            return _err(Status.FEATURE_NOT_SAVEABLE)
        if fid == Feature.NUMBER_OF_QUEUES:
            return self._set_number_of_queues(value)
        if fid == Feature.KEEP_ALIVE_TIMER:
            if value == 0:
                return _err(Status.KEEP_ALIVE_INVALID)
            self.kato = max(self._round_kato(value), self.transport.min_kato)
            self._arm_keep_alive()
            return _ok()
        if fid == Feature.POWER_MANAGEMENT and value & 0x1F:
            return _err(Status.INVALID_FIELD)  # only power state 0 exists
        if fid == Feature.VOLATILE_WRITE_CACHE:
            value &= 1
        self.features[fid] = value
        return _ok()

    def _set_number_of_queues(self, value: int) -> Reply:
        nsqr, ncqr = value & 0xFFFF, value >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            return _err(Status.INVALID_FIELD)
        if self.io_queues:
            return _err(Status.COMMAND_SEQUENCE_ERROR)
        self.num_io_queues = min(nsqr + 1, ncqr + 1, self.transport.max_io_qpairs_per_ctrlr)
        return _ok(self._queues_dw0())

    def _queues_dw0(self) -> int:
        n = self.num_io_queues - 1
        return n | (n << 16)

    def _get_features(self, sqe: Sqe) -> Reply:
        fid = sqe.cdw10 & 0xFF
        sel = (sqe.cdw10 >> 8) & 0x7
        if not self._feature_allowed(fid) or sel > SEL_SUPPORTED:
            return _err(Status.INVALID_FIELD)
        if sel == SEL_SUPPORTED:
            return _ok(CAPABILITY_CHANGEABLE)
        if fid == Feature.NUMBER_OF_QUEUES:
            return _ok(self._queues_dw0())
        if fid == Feature.KEEP_ALIVE_TIMER:
            return _ok(self.kato)
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            return _ok(sqe.cdw11 & 0xFFFF)
        features = self.features if sel == 0 else DEFAULT_FEATURES
        return _ok(features[fid])
