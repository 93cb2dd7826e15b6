"""Fabrics Connect: admit a queue to a new controller (QID 0) or to an existing one (I/O queues).

Checks follow SPDK's order; a bad parameter is reported as Connect Invalid Parameters with IATTR
(0: offset into the SQE, 1: offset into the Connect data) and IPO in DW0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pdu import Sqe
from ..spec import Status
from .io import IoQueue
from .pages import mdts

if TYPE_CHECKING:
    from .connection import Connection
    from .server import TargetServer

CONNECT_DATA_SIZE = 1024
DYNAMIC_CNTLID = 0xFFFF
IPO_QID, IPO_SQSIZE = 42, 44
IPO_CNTLID, IPO_SUBNQN, IPO_HOSTNQN = 16, 256, 512
CC_QUEUE_ENTRY_SIZES = (6 << 16) | (4 << 20)  # IOSQES = 6, IOCQES = 4
CC_QUEUE_ENTRY_MASK = (0xF << 16) | (0xF << 20)


def _invalid(attr: int, offset: int) -> tuple[int, int]:
    return Status.CONNECT_INVALID_PARAMETERS, offset | attr << 16


def _nqn(data: bytes, offset: int) -> str | None:
    field = data[offset : offset + 256]
    end = field.find(b"\0")
    if end < 0:
        return None
    try:
        return field[:end].decode("utf-8")
    except UnicodeDecodeError:
        return None


def connect(server: TargetServer, conn: Connection, sqe: Sqe, data: memoryview | bytes) -> tuple[int, int]:
    """Status and DW0 of a Connect; on success ``conn`` is attached to its controller."""
    if len(data) < CONNECT_DATA_SIZE:
        return Status.INVALID_FIELD, 0
    data = bytes(data[:CONNECT_DATA_SIZE])
    recfmt, qid = sqe.cdw10 & 0xFFFF, sqe.cdw10 >> 16
    sqsize, kato = sqe.cdw11 & 0xFFFF, sqe.cdw12
    target = server.target
    transport = target.tcp
    if recfmt != 0:
        return Status.CONNECT_INCOMPATIBLE_FORMAT, 0
    depth = transport.max_aq_depth if qid == 0 else transport.max_queue_depth
    if sqsize == 0 or sqsize >= depth:
        return _invalid(0, IPO_SQSIZE)
    subnqn = _nqn(data, IPO_SUBNQN)
    if subnqn is None:
        return _invalid(1, IPO_SUBNQN)
    hostnqn = _nqn(data, IPO_HOSTNQN)
    if hostnqn is None:
        return _invalid(1, IPO_HOSTNQN)
    sub = target.subsystems.get(subnqn)
    if sub is None:
        return _invalid(1, IPO_SUBNQN)
    if not sub.host_allowed(hostnqn):
        return Status.CONNECT_INVALID_HOST, 0
    here = (conn.listener.traddr, conn.listener.trsvcid)
    if not sub.is_discovery and here not in [(a.traddr, a.trsvcid) for a in sub.listeners]:
        return _invalid(1, IPO_SUBNQN)
    cntlid = int.from_bytes(data[IPO_CNTLID : IPO_CNTLID + 2], "little")
    if qid == 0:
        if cntlid != DYNAMIC_CNTLID:
            return _invalid(1, IPO_CNTLID)
        ctrl = server.create_controller(sub, hostnqn, conn, kato)
        if ctrl is None:
            return Status.CONNECT_CONTROLLER_BUSY, 0
        conn.attach(ctrl, 0, sqsize, None)
        return Status.SUCCESS, ctrl.cntlid
    if sub.is_discovery:
        return _invalid(0, IPO_QID)
    ctrl = server.find_controller(sub, cntlid)
    if ctrl is None:
        return _invalid(1, IPO_CNTLID)
    if ctrl.hostnqn != hostnqn:
        return _invalid(1, IPO_HOSTNQN)
    if not ctrl.enabled or ctrl.cc & CC_QUEUE_ENTRY_MASK != CC_QUEUE_ENTRY_SIZES or qid > ctrl.num_io_queues:
        return _invalid(0, IPO_QID)
    if qid in ctrl.io_queues:
        return Status.COMMAND_SEQUENCE_ERROR, 0
    ctrl.io_queues[qid] = conn
    conn.attach(ctrl, qid, sqsize, IoQueue(conn, ctrl, server.pool, 4096 << mdts(transport)))
    return Status.SUCCESS, ctrl.cntlid
