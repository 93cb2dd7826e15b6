"""One NVMe/TCP queue: the TCP connection of one host queue, from ICReq to teardown.

Received bytes land in one preallocated buffer; every complete PDU in it is handled before the
protocol returns, and everything produced meanwhile (responses, R2Ts, C2H data) leaves in one
``writev`` (see :meth:`Connection.flush`). Commands are decoded with precompiled structs straight
from the buffer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from crc32c import crc32c

from ..pdu import (
    CAPSULE_CMD_HDR,
    CAPSULE_RESP,
    CH,
    DATA_HDR,
    DIGEST,
    IC,
    Digests,
    ICResp,
    PduError,
    Sqe,
    TermReq,
    check_header,
    encode,
)
from ..spec import (
    SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK,
    AdminOpcode,
    FabricsType,
    Fes,
    PduFlag,
    PduType,
    Status,
    status_field,
)
from .connect import connect
from .model import ListenAddress

if TYPE_CHECKING:
    from .controller import Controller, Reply
    from .io import IoQueue
    from .server import TargetServer

log = logging.getLogger(__name__)

FABRICS = AdminOpcode.FABRICS.value
ADMIN_ICD_MAX = 8192  # in-capsule data always accepted on the admin queue and for Fabrics commands
RECV_SLACK = 256 * 1024
HOST_TYPES = frozenset({PduType.IC_REQ, PduType.CAPSULE_CMD, PduType.H2C_DATA})
C2H_DATA, CAPSULE_RESP_TYPE, R2T_TYPE = PduType.C2H_DATA.value, PduType.CAPSULE_RESP.value, PduType.R2T.value
LAST, SUCCESS = PduFlag.LAST_PDU.value, PduFlag.SUCCESS.value
DDGSTF = PduFlag.DDGSTF.value
CH_unpack = CH.unpack_from
CMD_unpack = CAPSULE_CMD_HDR.unpack_from
DATA_unpack = DATA_HDR.unpack_from
DATA_pack = DATA_HDR.pack
RESP_pack = CAPSULE_RESP.pack
DIGEST_pack = DIGEST.pack
DIGEST_unpack = DIGEST.unpack_from
IOV_MAX = os.sysconf("SC_IOV_MAX")


def _unsent(bufs: list, sent: int) -> bytes:
    """A copy of what follows the first ``sent`` bytes of ``bufs``."""
    for i, buf in enumerate(bufs):
        n = len(buf)
        if sent < n:
            return bytes(memoryview(buf)[sent:]) + b"".join(bufs[i + 1 :])
        sent -= n
    return b""


class PendingWrite:
    """A command whose data the host sends with H2CData after our R2T."""

    __slots__ = ("buf", "cid", "digest_error", "fields", "received", "sqe")

    def __init__(self, cid: int, buf: bytearray, sqe: Sqe | None, fields: tuple | None):
        self.cid = cid
        self.buf = buf
        self.received = 0
        self.digest_error = False
        self.sqe = sqe  # admin and Fabrics commands
        self.fields = fields  # I/O commands: (opc, nsid, cdw10, cdw11, cdw12, length)


class Connection(asyncio.BufferedProtocol):
    """The target side of one NVMe/TCP queue."""

    def __init__(self, server: TargetServer, listener: ListenAddress):
        self.server = server
        self.listener = listener
        transport = server.target.tcp
        self.maxh2cdata = transport.max_io_size
        self.io_icd = transport.in_capsule_data_size
        self.c2h_success = transport.c2h_success
        self._max_capsule = max(ADMIN_ICD_MAX, transport.in_capsule_data_size)
        self._max_cmd_plen = 72 + 8 + self._max_capsule
        self._max_h2c_plen = 24 + 8 + self.maxh2cdata
        self._max_plen = {PduType.CAPSULE_CMD: self._max_cmd_plen, PduType.H2C_DATA: self._max_h2c_plen}
        size = max(self._max_plen.values()) + RECV_SLACK
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of received bytes
        self._checked = -1  # buffer position whose common header has been validated
        self._out: list = []
        self.transport: asyncio.Transport | None = None
        self._fd = -1
        self.peer = ""
        self.closed = False
        self._ic_done = False
        self._set_digests(False, False)
        self.ctrl: Controller | None = None
        self.qid = 0
        self.io: IoQueue | None = None
        self._sqhd = 0
        self._sq_mod = 0x10000
        self._writes: dict[int, PendingWrite] = {}  # by TTAG
        self._next_ttag = 0

    def _set_digests(self, header: bool, data: bool) -> None:
        self.dg = Digests(header, data)
        self.hdl = 4 if header else 0
        self.ddl = 4 if data else 0
        self.hflag = PduFlag.HDGSTF.value if header else 0
        self._data_flags = self.hflag | (DDGSTF if data else 0)
        self._c2h_flags = self._data_flags | LAST | (SUCCESS if self.c2h_success else 0)
        self._bare_cmd = (PduType.CAPSULE_CMD.value, self.hflag, 72, 0, 72 + self.hdl)  # without data
        self._resp_plen = 24 + self.hdl

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._fd = transport.get_extra_info("socket").fileno()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writes.clear()
        self.server.connection_lost(self)

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # the host is not reading: stop taking new commands

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < RECV_SLACK:
            start, n = self._start, self._end - self._start
            self._buf[0:n] = bytes(self._view[start : self._end])
            self._checked = 0 if self._checked == start else -1
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._parse()
        if self.io is not None:
            self.io.flush_batch()
        self.flush()

    def eof_received(self) -> bool:
        return False

    # ------------------------------------------------------------------ output

    def flush(self) -> None:
        """Send everything queued with one ``writev`` on the socket, then forget the buffers.

        Queued buffers may be views of a RAM bdev (zero-copy reads), which a later write command
        changes in place, so none may outlive this call. A transport would keep them: uvloop queues
        views, not copies, of what the socket does not take at once. So the socket gets them
        directly while the transport has nothing queued (keeping the byte order), and only what the
        socket refuses is copied into the transport, which then sends it and applies flow control.
        """
        out, self._out = self._out, []
        if out and not self.closed:
            self._send(out)
        if self.io is not None:
            self.io.reclaim()

    def _send(self, out: list) -> None:
        transport = self.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            transport.write(b"".join(out))
            return
        for start in range(0, len(out), IOV_MAX):
            part = out[start : start + IOV_MAX]
            try:
                sent = os.writev(self._fd, part)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # a broken connection: the transport reports it and closes
                transport.write(b"".join(out[start:]))
                return
            if sent < sum(map(len, part)):
                transport.write(_unsent(part, sent) + b"".join(out[start + IOV_MAX :]))
                return

    def close(self) -> None:
        """Close after sending what is queued (controller teardown, TermReq)."""
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()

    def complete(self, cid: int, status: int, dw0: int = 0, dw1: int = 0) -> None:
        self._sqhd = sqhd = (self._sqhd + 1) % self._sq_mod
        hdr = RESP_pack(CAPSULE_RESP_TYPE, self.hflag, 24, 0, self._resp_plen, dw0, dw1, sqhd, self.qid, cid,
                        status_field(status))  # fmt: skip
        self._out.append(hdr + DIGEST_pack(crc32c(hdr)) if self.hdl else hdr)

    def send_data(self, cid: int, data: bytes | bytearray | memoryview) -> None:
        """C2HData carrying a successful command's whole result, then its completion."""
        n = len(data)
        hdl, ddl = self.hdl, self.ddl
        hdr = DATA_pack(C2H_DATA, self._c2h_flags, 24, 24 + hdl, 24 + hdl + n + ddl, cid, 0, 0, n)
        out = self._out
        out.append(hdr + DIGEST_pack(crc32c(hdr)) if hdl else hdr)
        out.append(data)
        if ddl:
            out.append(DIGEST_pack(crc32c(data)))
        if self.c2h_success:
            self._sqhd = (self._sqhd + 1) % self._sq_mod
        else:
            self.complete(cid, Status.SUCCESS)

    def _send_r2t(self, cid: int, ttag: int, length: int) -> None:
        hdr = DATA_pack(R2T_TYPE, self.hflag, 24, 0, 24 + self.hdl, cid, ttag, 0, length)
        self._out.append(hdr + DIGEST_pack(crc32c(hdr)) if self.hdl else hdr)

    def _terminate(self, err: PduError, pos: int) -> None:
        """C2HTermReq carrying a copy of the offending header, then close this connection only."""
        hlen = self._buf[pos + 2] if self._end - pos > 2 else 8
        copy = bytes(self._view[pos : min(pos + max(hlen, 8), pos + 128, self._end)])
        log.warning("%s: %s; sending C2HTermReq FES 0x%02x FEI %d", self.peer, err, err.fes, err.fei)
        self._out.extend(encode(TermReq(err.fes, err.fei, copy)))
        self.close()

    # ------------------------------------------------------------------ receive

    def _parse(self) -> None:
        buf = self._buf
        pos = self._start
        try:
            while not self.closed:
                end = self._end
                if end - pos < 8:
                    break
                header = CH_unpack(buf, pos)
                ptype, flags, _, pdo, plen = header
                if pos != self._checked:
                    if not (self._ic_done and (header == self._bare_cmd or self._data_header_ok(*header))):
                        self._check_common_header(pos, ptype)
                    self._checked = pos
                if end - pos < plen:
                    break
                if ptype == 4:
                    self._on_capsule(pos, flags, pdo, plen)
                elif ptype == 6:
                    self._on_h2c_data(pos, flags, pdo, plen)
                elif ptype == 0:
                    self._on_icreq(pos)
                else:  # H2CTermReq: the host gives up on this queue
                    log.warning("%s: host sent H2CTermReq FES 0x%02x", self.peer, buf[pos + 8])
                    self.close()
                pos += plen
        except PduError as e:
            self._terminate(e, pos)
        self._start = pos

    def _data_header_ok(self, ptype: int, flags: int, hlen: int, pdo: int, plen: int) -> bool:
        """The usual capsule with data or H2CData, which ``check_header`` would accept too."""
        if pdo != hlen + self.hdl or plen <= pdo + self.ddl:
            return False
        if ptype == 4:
            return hlen == 72 and flags == self._data_flags and plen <= self._max_cmd_plen
        return ptype == 6 and hlen == 24 and flags & ~LAST == self._data_flags and plen <= self._max_h2c_plen

    def _check_common_header(self, pos: int, ptype: int) -> None:
        if ptype in HOST_TYPES and (ptype == PduType.IC_REQ) == self._ic_done:
            raise PduError(Fes.PDU_SEQUENCE_ERROR, 0, f"PDU type 0x{ptype:02x} out of sequence")
        max_plen = self._max_plen.get(ptype, 24 + 128)
        check_header(self._view[pos : pos + 8], self.dg, True, max_plen)

    def _check_header_digest(self, pos: int, hlen: int) -> None:
        if crc32c(self._view[pos : pos + hlen]) != DIGEST_unpack(self._buf, pos + hlen)[0]:
            raise PduError(Fes.HEADER_DIGEST_ERROR, 0, "header digest mismatch")

    def _data_digest_ok(self, data: memoryview, pos_digest: int) -> bool:
        return crc32c(data) == DIGEST_unpack(self._buf, pos_digest)[0]

    def _on_icreq(self, pos: int) -> None:
        pfv, hpda, dgst = IC.unpack_from(self._buf, pos)[5:8]
        if pfv != 0:
            raise PduError(Fes.UNSUPPORTED_PARAMETER, 8, f"ICReq PFV {pfv}")
        if hpda > 31:
            raise PduError(Fes.UNSUPPORTED_PARAMETER, 10, f"ICReq HPDA {hpda}")
        header, data = bool(dgst & 1), bool(dgst & 2)
        self._out.extend(encode(ICResp(cpda=0, hdgst=header, ddgst=data, maxh2cdata=self.maxh2cdata)))
        self._set_digests(header, data)
        self._ic_done = True

    def _on_capsule(self, pos: int, flags: int, pdo: int, plen: int) -> None:
        if self.hdl:
            self._check_header_digest(pos, 72)
        (_, _, _, _, _, opc, _, cid, nsid, _, _, _, sgl_addr, sgl_len, sgl_id,
         cdw10, cdw11, cdw12, _, _, _) = CMD_unpack(self._buf, pos)  # fmt: skip
        data = None
        digest_error = False
        if pdo:
            data_end = pos + plen - self.ddl
            data = self._view[pos + pdo : data_end]
            digest_error = bool(self.ddl) and not self._data_digest_ok(data, data_end)
        xfer = (nsid if opc == FABRICS else opc) & 3
        if xfer == 0 or (sgl_len == 0 and sgl_id >> 4 in (0, 5)):
            if data is not None:
                raise PduError(Fes.INVALID_HEADER_FIELD, 4, "in-capsule data for a command without data")
            length = 0
        elif sgl_id == SGL_DATA_BLOCK_OFFSET and xfer == 1:
            if sgl_addr != 0:
                raise PduError(Fes.UNSUPPORTED_PARAMETER, 32, f"in-capsule data offset {sgl_addr}")
            if data is None or len(data) != sgl_len:
                raise PduError(Fes.INVALID_HEADER_FIELD, 4, "in-capsule data length differs from the SGL")
            length = sgl_len
        elif sgl_id == SGL_TRANSPORT_DATA_BLOCK and xfer in (1, 2):
            if data is not None:
                raise PduError(Fes.INVALID_HEADER_FIELD, 4, "in-capsule data with a transport SGL")
            length = sgl_len
        elif xfer == 3 and sgl_id in (SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK):
            self.complete(cid, Status.INVALID_OPCODE)  # no bidirectional commands exist on fabrics
            return
        else:
            raise PduError(Fes.UNSUPPORTED_PARAMETER, 40, f"unsupported SGL 0x{sgl_id:02x}")
        if digest_error:
            self.complete(cid, Status.DATA_TRANSFER_ERROR)
            return
        needs_r2t = xfer == 1 and data is None and length > 0
        if self.qid and opc != FABRICS:  # the I/O hot path
            io = self.io
            if data is not None and length > self.io_icd:
                self.complete(cid, Status.DATA_SGL_LENGTH_INVALID)
            elif needs_r2t:
                status = io.validate(opc, nsid, cdw10, cdw11, cdw12, length)
                if status:
                    self.complete(cid, status)
                else:
                    self._start_r2t(cid, length, None, (opc, nsid, cdw10, cdw11, cdw12, length))
            else:
                io.submit(cid, opc, nsid, cdw10, cdw11, cdw12, length, data)
            return
        sqe = Sqe.unpack(self._buf, pos + 8)
        if needs_r2t:
            if self.ctrl is None:  # no buffers for a peer that has not connected
                self.complete(cid, Status.COMMAND_SEQUENCE_ERROR)
            elif length > self.maxh2cdata:
                self.complete(cid, Status.INVALID_FIELD)
            else:
                self._start_r2t(cid, length, sqe, None)
            return
        self._command(sqe, data if data is not None else b"")

    def _start_r2t(self, cid: int, length: int, sqe: Sqe | None, fields: tuple | None) -> None:
        if len(self._writes) >= self._sq_mod:  # SQ flow control bounds what a host may have in flight
            raise PduError(Fes.DATA_LIMIT_EXCEEDED, 0, f"more than {self._sq_mod} writes awaiting data")
        ttag = self._next_ttag
        while True:
            ttag = ttag % 0xFFFF + 1  # never 0
            if ttag not in self._writes:
                break
        self._next_ttag = ttag
        buf = self.io.buffers.take(length) if fields else bytearray(length)
        self._writes[ttag] = PendingWrite(cid, buf, sqe, fields)
        self._send_r2t(cid, ttag, length)

    def _on_h2c_data(self, pos: int, flags: int, pdo: int, plen: int) -> None:
        if self.hdl:
            self._check_header_digest(pos, 24)
        _, _, _, _, _, cccid, ttag, datao, datal = DATA_unpack(self._buf, pos)
        write = self._writes.get(ttag)
        if write is None:
            raise PduError(Fes.INVALID_HEADER_FIELD, 10, f"H2CData with unknown TTAG {ttag}")
        if write.cid != cccid:
            raise PduError(Fes.INVALID_HEADER_FIELD, 8, f"H2CData CCCID {cccid} for TTAG {ttag}")
        data_end = pos + plen - (self.ddl if pdo else 0)
        if not pdo or datal != data_end - pos - pdo:
            raise PduError(Fes.INVALID_HEADER_FIELD, 16, f"H2CData DATAL {datal} does not match PLEN")
        total = len(write.buf)
        if datao != write.received or datao + datal > total:
            raise PduError(
                Fes.DATA_OUT_OF_RANGE, 12, f"H2CData DATAO {datao}+{datal}, expected {write.received}"
            )
        last = datao + datal == total
        if last != bool(flags & LAST):
            raise PduError(Fes.INVALID_HEADER_FIELD, 1, "H2CData LAST_PDU does not mark the end of the data")
        data = self._view[pos + pdo : data_end]
        if self.ddl and not self._data_digest_ok(data, data_end):
            write.digest_error = True
        write.buf[datao : datao + datal] = data
        write.received += datal
        if not last:
            return
        del self._writes[ttag]
        if write.digest_error:
            self.complete(write.cid, Status.DATA_TRANSFER_ERROR)
        elif write.sqe is not None:
            self._command(write.sqe, write.buf)
        else:
            self.io.submit(write.cid, *write.fields, write.buf)

    # ------------------------------------------------------------------ admin and Fabrics commands

    def _command(self, sqe: Sqe, data: memoryview | bytearray | bytes) -> None:
        if sqe.opcode == FABRICS:
            self._fabrics(sqe, data)
        elif self.ctrl is None:
            self.complete(sqe.cid, Status.COMMAND_SEQUENCE_ERROR)
        elif self.qid:  # an I/O queue only reaches here with a Fabrics command
            self.complete(sqe.cid, Status.INVALID_OPCODE)
        else:
            self.reply(sqe, self.ctrl.admin_command(sqe, data))

    def reply(self, sqe: Sqe, result: Reply | None) -> None:
        """Send an admin result: data (sized to the host's SGL) on success, else just the CQE."""
        if result is None:
            return
        status, dw0, data = result
        if status or data is None or sqe.sgl_len == 0:
            self.complete(sqe.cid, status, dw0)
            return
        want = sqe.sgl_len
        if len(data) != want:
            data = bytes(data[:want]).ljust(want, b"\0")
        self.send_data(sqe.cid, data)

    def _fabrics(self, sqe: Sqe, data: memoryview | bytearray | bytes) -> None:
        fctype = sqe.fctype
        if fctype == FabricsType.CONNECT:
            if self.ctrl is not None:
                self.complete(sqe.cid, Status.COMMAND_SEQUENCE_ERROR)
                return
            status, dw0 = connect(self.server, self, sqe, data)
            self.complete(sqe.cid, status, dw0)
            return
        if self.ctrl is None:
            self.complete(sqe.cid, Status.COMMAND_SEQUENCE_ERROR)
        elif self.qid:
            self.complete(sqe.cid, Status.INVALID_OPCODE)
        elif fctype in (FabricsType.PROPERTY_GET, FabricsType.PROPERTY_SET) and sqe.cdw10 & 0x7 > 1:
            self.complete(sqe.cid, Status.CONNECT_INVALID_PARAMETERS)  # SIZE is 4 or 8 bytes
        elif fctype == FabricsType.PROPERTY_GET:
            status, value = self.ctrl.property_get(bool(sqe.cdw10 & 0x1), sqe.cdw11)
            self.complete(sqe.cid, status, value & 0xFFFFFFFF, value >> 32)
        elif fctype == FabricsType.PROPERTY_SET:
            size8 = bool(sqe.cdw10 & 0x1)
            self.complete(sqe.cid, self.ctrl.property_set(size8, sqe.cdw11, sqe.cdw12 | sqe.cdw13 << 32))
        elif fctype in (FabricsType.AUTH_SEND, FabricsType.AUTH_RECV):
            self.complete(sqe.cid, Status.INVALID_FIELD)
        else:
            self.complete(sqe.cid, Status.INVALID_OPCODE)

    def attach(self, ctrl: Controller, qid: int, sqsize: int, io: IoQueue | None) -> None:
        """Bind this queue to its controller after a successful Connect."""
        self.ctrl = ctrl
        self.qid = qid
        self.io = io
        self._sqhd = 0  # the submission queue exists from Connect on
        self._sq_mod = sqsize + 1
