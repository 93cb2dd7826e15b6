"""One NVMe/TCP queue: a TCP connection carrying ICReq/ICResp, Fabrics Connect and pipelined commands.

Receive path: a BufferedProtocol parses every complete PDU in a large preallocated buffer per
receive; while a C2HData payload is outstanding, ``get_buffer`` hands out the caller's own buffer
slice so the kernel copies the data straight into it. Send path: PDUs are corked in a list and
written once per event-loop iteration, or at the end of the receive whose completions produced
them. Per command there is a CID from a free list (at most SQSIZE outstanding, so SQ flow control
holds) and a completion callback with its context; everything else lives in per-CID slot lists.
The awaitable API (:meth:`Queue.command`, :meth:`Queue.rw`) settles a Future from that callback;
load generators call :meth:`Queue.start_rw` and get the callback directly, with no Future or task.
"""

from __future__ import annotations

import asyncio
import math
import struct
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from crc32c import crc32c

from ..pdu import CAPSULE_CMD_HDR, CAPSULE_RESP, DATA_HDR, DIGEST, IC, TERM, ICReq, Sqe, TermReq, encode
from ..spec import (
    SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK,
    AdminOpcode,
    FabricsType,
    Fes,
    IoOpcode,
    PduFlag,
    PduType,
    Status,
    status_name,
)
from .errors import NvmeError, NvmeTimeout, NvmeTransportError

RECV_BUFFER = 1 << 20
ADMIN_INLINE_LIMIT = 8192  # in-capsule data allowed on the admin queue and for Fabrics commands
COALESCE_LIMIT = 16384  # send buffers smaller than this are joined; larger ones are written as they are
CONNECT_DATA_SIZE = 1024

_HDGSTF = int(PduFlag.HDGSTF)
_DDGSTF = int(PduFlag.DDGSTF)
_LAST = int(PduFlag.LAST_PDU)
_SUCCESS = int(PduFlag.SUCCESS)
_C2H_DATA = int(PduType.C2H_DATA)
_CAPSULE_RESP = int(PduType.CAPSULE_RESP)
_R2T = int(PduType.R2T)
_C2H_TERM = int(PduType.C2H_TERM_REQ)
_FABRICS = int(AdminOpcode.FABRICS)
DATA_UNPACK = DATA_HDR.unpack_from
RESP_UNPACK = CAPSULE_RESP.unpack_from
PLEN_UNPACK = struct.Struct("<I").unpack_from


Done = Callable[[Any, int, "NvmeError | None"], None]
"""A completion callback, ``done(ctx, result, error)``: CQE DW0 | DW1 << 32, or the error."""


def settle(fut: asyncio.Future[int], result: int, error: NvmeError | None) -> None:
    """The :data:`Done` callback behind the awaitable API: complete ``fut`` unless it was cancelled."""
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def command_name(qid: int, opcode: int, fctype: int) -> str:
    """A readable command name for error messages ('Read', 'Fabrics CONNECT', 'IDENTIFY')."""
    if opcode == _FABRICS:
        try:
            return f"Fabrics {FabricsType(fctype).name}"
        except ValueError:
            return f"Fabrics 0x{fctype:02x}"
    kind = AdminOpcode if qid == 0 else IoOpcode
    try:
        return kind(opcode).name
    except ValueError:
        return f"opcode 0x{opcode:02x}"


def new_hostid() -> bytes:
    return uuid.uuid4().bytes


def connect_data(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> bytearray:
    """The 1 KiB data of a Fabrics Connect: HOSTID, CNTLID, SUBNQN and HOSTNQN."""
    data = bytearray(CONNECT_DATA_SIZE)
    data[0:16] = hostid
    data[16:18] = cntlid.to_bytes(2, "little")
    data[256 : 256 + len(subnqn)] = subnqn.encode()
    data[512 : 512 + len(hostnqn)] = hostnqn.encode()
    return data


class Queue(asyncio.BufferedProtocol):
    """Admin (qid 0) or I/O queue. Create with :meth:`open`, then :meth:`connect`."""

    def __init__(self, qid: int, depth: int, timeout: float, name: str, on_lost: Callable | None):
        self.qid = qid
        self.name = name
        self.timeout = timeout
        self.maxh2cdata = 0
        self.inline_limit = ADMIN_INLINE_LIMIT if qid == 0 else 0
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._fatal: tuple[str, int | None, int | None] | None = None
        self._ic: asyncio.Future | None = None
        # Negotiated per connection.
        self._hd = 0  # header digest length, 0 or 4
        self._dd = 0  # data digest length, 0 or 4
        self._cap_pdo = 72
        self._h2c_pdo = 24
        # Send corking.
        self._out: list = []
        self._flush_handle: asyncio.Handle | None = None
        self._parsing = False  # inside a receive: what it corks is written when it ends
        # Receive buffer and the C2HData payload being received across receives.
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._end = 0
        self._sink: memoryview | None = None
        self._cur_cid = -1
        self._cur_dest: memoryview | None = None
        self._cur_off = 0
        self._cur_left = 0
        self._cur_flags = 0
        self._cur_start = 0
        # Command slots, indexed by CID.
        self.depth = depth
        self._done: list[Done | None] = [None] * depth
        self._ctx: list[Any] = [None] * depth
        self._dest: list[memoryview | None] = [None] * depth
        self._src: list[memoryview | None] = [None] * depth
        self._next_off = [0] * depth
        self._opc = [0] * depth
        self._started = [math.inf] * depth  # watchdog tick at submission; inf = never expires (AER)
        self._digest_bad = [False] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._slot_waiters: deque[asyncio.Future[int]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = 0
        self._tick_limit = 0

    # ------------------------------------------------------------------ set-up

    @classmethod
    async def open(
        cls,
        traddr: str,
        trsvcid: int,
        *,
        qid: int,
        depth: int,
        hdgst: bool = False,
        ddgst: bool = False,
        timeout: float = 10.0,
        on_lost: Callable[[Queue], None] | None = None,
    ) -> Queue:
        """TCP connect and the ICReq/ICResp exchange; digests are what the controller granted."""
        loop = asyncio.get_running_loop()
        queue = cls(qid, depth, timeout, f"{traddr}:{trsvcid} qid {qid}", on_lost)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: queue, traddr, trsvcid)
                queue._ic = loop.create_future()
                queue._write(encode(ICReq(hdgst=hdgst, ddgst=ddgst)))
                await queue._ic
        except NvmeError:
            queue.abort()
            raise
        except TimeoutError:
            queue.abort()
            raise NvmeTimeout(f"{queue.name}: no ICResp within {timeout:g}s") from None
        except OSError as e:
            queue.abort()
            raise NvmeTransportError(f"cannot connect to {traddr}:{trsvcid}: {e.strerror or e}") from e
        queue._start_watchdog()
        return queue

    async def connect(
        self, subnqn: str, hostnqn: str, hostid: bytes, cntlid: int, sqsize: int, kato_ms: int
    ) -> int:
        """Fabrics Connect for this queue; returns the CNTLID. ``sqsize`` is 0's based."""
        sqe = Sqe(
            opcode=_FABRICS, nsid=FabricsType.CONNECT, cdw10=self.qid << 16, cdw11=sqsize,
            cdw12=kato_ms,
        )  # fmt: skip
        data = connect_data(hostid, cntlid, subnqn, hostnqn)
        return await self.command(sqe, data_out=data) & 0xFFFF

    @property
    def digests(self) -> tuple[bool, bool]:
        """(header, data) digests as the controller granted them in ICResp."""
        return bool(self._hd), bool(self._dd)

    @property
    def outstanding(self) -> int:
        return self.depth - len(self._free)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def can_start(self) -> bool:
        """True when :meth:`start_rw` would be accepted: connected with a free command slot."""
        return bool(self._free) and not self._closed

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._watchdog:
            self._watchdog.cancel()
        if self._fatal is None:
            self._fatal = (f"{self.name}: connection lost" + (f": {exc}" if exc else ""), None, None)
        if self._ic and not self._ic.done():
            self._ic.set_exception(self._error())
        for cid, done in enumerate(self._done):
            if done is not None:
                self._fail(cid, self._error())
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._error())
        self._sink = None
        if not self._lost.done():
            self._lost.set_result(None)
        if self._on_lost:
            self._on_lost(self)

    def _error(self) -> NvmeTransportError:
        message, fes, fei = self._fatal or (f"{self.name}: closed", None, None)
        return NvmeTransportError(message, fes, fei)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink
        return self._rview[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            self._cur_off += nbytes
            self._cur_left -= nbytes
            if self._cur_left:
                self._sink = self._sink[nbytes:]
                return
            self._sink = None
        else:
            self._end += nbytes
        self._parsing = True
        try:
            self._parse()
        finally:
            self._parsing = False
        if self._out:
            self._flush()

    def eof_received(self) -> bool:
        return False

    # ------------------------------------------------------------------ receive

    def _parse(self) -> None:
        view = self._rview
        pos, end = 0, self._end
        hd, dd = self._hd, self._dd
        while not self._closed:
            cid = self._cur_cid
            if cid >= 0:  # a C2HData payload begun in an earlier receive
                if self._cur_left:  # its bytes that are in the receive buffer
                    n = min(self._cur_left, end - pos)
                    off = self._cur_off
                    self._cur_dest[off : off + n] = view[pos : pos + n]  # type: ignore[index]
                    pos += n
                    self._cur_off = off + n
                    self._cur_left -= n
                    if self._cur_left:  # the rest goes straight into the caller's buffer
                        self._sink = self._cur_dest[self._cur_off : self._cur_off + self._cur_left]  # type: ignore[index]
                        pos = end
                        break
                if end - pos < dd:
                    break
                dest, self._cur_dest, self._cur_cid = self._cur_dest, None, -1
                self._data_done(cid, self._cur_flags, dest, self._cur_start, self._cur_off, view, pos)  # type: ignore[arg-type]
                pos += dd
                continue
            if end - pos < 24:  # every controller-to-host PDU is at least 24 bytes
                break
            ptype = view[pos]
            if ptype == _C2H_DATA:
                _, flags, hlen, pdo, plen, cid, _, datao, datal = DATA_UNPACK(view, pos)
                need = pdo or hlen + hd
                if end - pos < need:
                    break
                dest = self._c2h_header(view, pos, flags, hlen, pdo, plen, cid, datao, datal)
                if dest is None:
                    return
                pos += need
                stop = datao + datal
                if end - pos < datal + dd:  # the payload continues in later receives
                    self._cur_cid, self._cur_dest, self._cur_flags = cid, dest, flags
                    self._cur_start = self._cur_off = datao
                    self._cur_left = datal
                    continue
                dest[datao:stop] = view[pos : pos + datal]
                pos += datal
                if dd or flags & _SUCCESS:
                    self._data_done(cid, flags, dest, datao, stop, view, pos)
                pos += dd
                continue
            plen = PLEN_UNPACK(view, pos + 4)[0]
            if plen > RECV_BUFFER or plen < 24:
                self._protocol_error(
                    Fes.INVALID_HEADER_FIELD, 4, f"PDU with PLEN {plen}", view[pos : pos + 8]
                )
                return
            if end - pos < plen:
                break
            if ptype == _CAPSULE_RESP:
                if not self._capsule_resp(view, pos):
                    return
            elif not self._pdu(view, pos, ptype, plen):
                return
            pos += plen
        rest = end - pos
        if rest and pos:
            view[0:rest] = view[pos:end]
        self._end = rest

    def _check_hdgst(self, view: memoryview, pos: int, hlen: int, flags: int) -> bool:
        if not flags & _HDGSTF:
            self._protocol_error(
                Fes.INVALID_HEADER_FIELD, 1, "header digest flag missing", view[pos : pos + hlen]
            )
            return False
        if crc32c(view[pos : pos + hlen]) != DIGEST.unpack_from(view, pos + hlen)[0]:
            self._protocol_error(Fes.HEADER_DIGEST_ERROR, 0, "header digest mismatch", view[pos : pos + hlen])
            return False
        return True

    def _c2h_header(
        self, view: memoryview, pos: int, flags: int, hlen: int, pdo: int, plen: int, cid: int, datao: int,
        datal: int,
    ) -> memoryview | None:  # fmt: skip
        """Check a C2HData header; returns the buffer its payload belongs in, None after an error."""
        if self._hd and not self._check_hdgst(view, pos, hlen, flags):
            return None
        dest = self._dest[cid] if cid < self.depth else None
        dd = 4 if flags & _DDGSTF else 0
        problem = None
        if hlen != 24:
            problem = Fes.INVALID_HEADER_FIELD, 2, f"C2HData HLEN {hlen}"
        elif dest is None:
            problem = Fes.INVALID_HEADER_FIELD, 8, f"C2HData for CID {cid} without a read"
        elif dd != self._dd:
            problem = Fes.INVALID_HEADER_FIELD, 1, "data digest flag does not match"
        elif datao != self._next_off[cid] or datao + datal > len(dest) or plen != pdo + datal + dd:
            problem = Fes.DATA_OUT_OF_RANGE, 12, f"C2HData CID {cid} DATAO {datao} DATAL {datal} PLEN {plen}"
        elif flags & _SUCCESS and not flags & _LAST:
            problem = Fes.INVALID_HEADER_FIELD, 1, "C2HData SUCCESS without LAST_PDU"
        if problem:
            self._protocol_error(*problem, view[pos : pos + 24])
            return None
        self._next_off[cid] = datao + datal
        return dest

    def _data_done(
        self, cid: int, flags: int, dest: memoryview, start: int, stop: int, view: memoryview, pos: int
    ) -> None:
        """``dest[start:stop]`` holds a complete C2HData payload; its data digest, if any, is at ``pos``."""
        if self._dd and crc32c(dest[start:stop]) != DIGEST.unpack_from(view, pos)[0]:
            self._digest_bad[cid] = True
        if flags & _SUCCESS:
            if stop != len(dest):
                self._complete(cid, Status.DATA_TRANSFER_ERROR, 0, "short data-in")
            else:
                self._complete(cid, 0, 0)

    def _capsule_resp(self, view: memoryview, pos: int) -> bool:
        _, flags, hlen, _, plen, dw0, dw1, _sqhd, _sqid, cid, status = RESP_UNPACK(view, pos)
        if hlen != 24 or plen != 24 + self._hd:
            self._protocol_error(Fes.INVALID_HEADER_FIELD, 2, "bad CapsuleResp length", view[pos : pos + 8])
            return False
        if self._hd and not self._check_hdgst(view, pos, hlen, flags):
            return False
        if cid >= self.depth or self._done[cid] is None:
            self._protocol_error(
                Fes.INVALID_HEADER_FIELD, 20, f"CapsuleResp for idle CID {cid}", view[pos : pos + 24]
            )
            return False
        code = (status >> 1) & 0x7FF
        dest = self._dest[cid]
        if not code and dest is not None and self._next_off[cid] != len(dest):
            self._complete(cid, Status.DATA_TRANSFER_ERROR, 0, "short data-in")
        else:
            self._complete(cid, code, dw0 | (dw1 << 32))
        return True

    def _pdu(self, view: memoryview, pos: int, ptype: int, plen: int) -> bool:
        """The rarer PDUs: R2T, C2HTermReq and ICResp."""
        _, flags, hlen, _, _, cid, ttag, r2to, r2tl = DATA_UNPACK(view, pos)
        if ptype == _R2T:
            if hlen != 24 or plen != 24 + self._hd:
                self._protocol_error(Fes.INVALID_HEADER_FIELD, 2, "bad R2T length", view[pos : pos + 8])
                return False
            if self._hd and not self._check_hdgst(view, pos, hlen, flags):
                return False
            src = self._src[cid] if cid < self.depth else None
            if src is None or r2to + r2tl > len(src) or r2tl == 0:
                self._protocol_error(
                    Fes.DATA_OUT_OF_RANGE, 12, f"R2T CID {cid} {r2to}+{r2tl}", view[pos : pos + 24]
                )
                return False
            self._send_h2c(cid, ttag, src, r2to, r2tl)
            return True
        if ptype == _C2H_TERM:
            _, _, _, _, _, fes, fei = TERM.unpack_from(view, pos)
            self._fatal = (f"{self.name}: controller sent C2HTermReq", fes, fei)
            self.abort()
            return False
        if ptype == PduType.IC_RESP and self._ic is not None and not self._ic.done():
            self._ic_resp(view, pos, plen)
            return not self._closed
        self._protocol_error(
            Fes.INVALID_HEADER_FIELD, 0, f"unexpected PDU type 0x{ptype:02x}", view[pos : pos + 8]
        )
        return False

    def _ic_resp(self, view: memoryview, pos: int, plen: int) -> None:
        _, _, hlen, _, _, pfv, cpda, dgst, maxh2cdata = IC.unpack_from(view, pos)
        if plen != 128 or hlen != 128 or pfv != 0 or cpda > 31 or maxh2cdata < 4096 or maxh2cdata % 4:
            message = f"bad ICResp: PLEN {plen} PFV {pfv} CPDA {cpda} MAXH2CDATA {maxh2cdata}"
            self._fatal = (f"{self.name}: {message}", None, None)
            self._ic.set_exception(NvmeTransportError(self._fatal[0]))  # type: ignore[union-attr]
            self.abort()
            return
        self._hd = 4 if dgst & 1 else 0
        self._dd = 4 if dgst & 2 else 0
        align = (cpda + 1) * 4
        self._cap_pdo = -(-(72 + self._hd) // align) * align
        self._h2c_pdo = -(-(24 + self._hd) // align) * align
        self.maxh2cdata = maxh2cdata
        self._ic.set_result(None)  # type: ignore[union-attr]

    def _protocol_error(self, fes: int, fei: int, message: str, header) -> None:
        """The controller broke the protocol: tell it with an H2CTermReq and drop the connection."""
        self._fatal = (f"{self.name}: {message}", fes, fei)
        if self._transport and not self._closed:
            self._write(encode(TermReq(fes, fei, bytes(header), from_host=True)))
        self.abort()

    # ------------------------------------------------------------------ completion

    def _complete(self, cid: int, code: int, result: int, detail: str = "") -> None:
        """The controller ended command ``cid``: free the slot first, so the callback may reuse it."""
        if self._digest_bad[cid]:
            self._digest_bad[cid] = False
            code, detail = Status.DATA_TRANSFER_ERROR, "data digest mismatch"
        error = self._status_error(cid, code, result, detail) if code else None
        done, ctx = self._done[cid], self._ctx[cid]
        self._done[cid] = self._ctx[cid] = self._dest[cid] = self._src[cid] = None
        if self._slot_waiters:
            self._release(cid)
        else:
            self._free.append(cid)
        self._notify(done, ctx, result, error)

    def _fail(self, cid: int, error: NvmeError) -> None:
        """End command ``cid`` without an answer from the controller; its CID stays taken."""
        done, ctx = self._done[cid], self._ctx[cid]
        self._done[cid] = self._ctx[cid] = self._dest[cid] = self._src[cid] = None
        self._notify(done, ctx, 0, error)  # type: ignore[arg-type]

    def _notify(self, done: Done, ctx: Any, result: int, error: NvmeError | None) -> None:
        """Run a completion callback; one that raises must not break the receive path."""
        try:
            done(ctx, result, error)
        except Exception as e:
            self._loop.call_exception_handler(
                {"message": f"{self.name}: completion callback failed", "exception": e, "protocol": self}
            )

    def _command_name(self, cid: int) -> str:
        opc = self._opc[cid]
        return command_name(self.qid, opc & 0xFF, opc >> 8)

    def _status_error(self, cid: int, code: int, result: int, detail: str) -> NvmeError:
        extra = f" ({detail})" if detail else ""
        err = NvmeError(code, f"{self._command_name(cid)} failed on {self.name}: {status_name(code)}{extra}")
        err.result = result  # type: ignore[attr-defined]
        return err

    def _release(self, cid: int) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(cid)
                return
        self._free.append(cid)

    async def _slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._closed:
            raise self._error()
        waiter = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise

    def _take_slot(self) -> int:
        if not self._free:
            raise NvmeError(Status.INTERNAL_ERROR, f"{self.name}: no free command slot")
        return self._free.pop()

    # ------------------------------------------------------------------ submission

    async def command(
        self,
        sqe: Sqe,
        data_in: memoryview | None = None,
        data_out: bytes | bytearray | memoryview | None = None,
        expires: bool = True,
    ) -> int:
        """Run one command; returns CQE DW0 | DW1 << 32 or raises :class:`NvmeError`.

        A command fails with :class:`NvmeTimeout` after the queue's timeout unless ``expires`` is
        False (AERs wait for an event indefinitely).
        """
        cid = await self._slot()
        return await self.submit(sqe, data_in, data_out, expires, cid)

    def submit(
        self,
        sqe: Sqe,
        data_in: memoryview | None = None,
        data_out: bytes | bytearray | memoryview | None = None,
        expires: bool = True,
        cid: int | None = None,
    ) -> asyncio.Future[int]:
        """Send a command now and return its Future; without ``cid`` a slot must be free."""
        if cid is None:
            cid = self._take_slot()
        fut = self._loop.create_future()
        opc = sqe.opcode | ((sqe.nsid & 0xFF) << 8 if sqe.opcode == _FABRICS else 0)
        self._occupy(cid, opc, settle, fut, expires)
        out = memoryview(data_out).cast("B") if data_out is not None and len(data_out) else None
        if data_in is not None and len(data_in):
            self._dest[cid] = data_in
            length = len(data_in)
        else:
            length = len(out) if out is not None else 0
        inline = out is not None and (len(out) <= self.inline_limit or sqe.opcode == _FABRICS)
        if out is not None and not inline:
            self._src[cid] = out
        self._post(
            cid, sqe.opcode, sqe.flags, sqe.nsid, sqe.cdw2, sqe.cdw3, sqe.cdw10, sqe.cdw11, sqe.cdw12,
            sqe.cdw13, sqe.cdw14, sqe.cdw15, length, out if inline else None,
        )  # fmt: skip
        return fut

    async def rw(self, opcode: int, nsid: int, slba: int, nlb: int, buf: memoryview, to_target: bool) -> None:
        """Read, Write or Compare of ``nlb`` (1-based) blocks: the hot path, no Sqe object."""
        cid = self._free.pop() if self._free else await self._slot()
        fut = self._loop.create_future()
        self._start_rw(cid, opcode, nsid, slba, nlb, buf, to_target, settle, fut)
        await fut

    def start_rw(
        self, opcode: int, nsid: int, slba: int, nlb: int, buf: memoryview, to_target: bool, done: Done,
        ctx: Any,
    ) -> None:  # fmt: skip
        """:meth:`rw` with a callback: ``done(ctx, result, error)`` runs when the command ends.

        Needs a free slot (:attr:`can_start`). The callback runs inside the receive path: it may
        start further commands, which go out in the same write as the others that receive caused.
        """
        self._start_rw(self._take_slot(), opcode, nsid, slba, nlb, buf, to_target, done, ctx)

    def _start_rw(
        self, cid: int, opcode: int, nsid: int, slba: int, nlb: int, buf: memoryview, to_target: bool,
        done: Done, ctx: Any,
    ) -> None:  # fmt: skip
        self._occupy(cid, opcode, done, ctx, True)
        inline = None
        if to_target:
            if len(buf) <= self.inline_limit:
                inline = buf
            else:
                self._src[cid] = buf
        else:
            self._dest[cid] = buf
        self._post(
            cid, opcode, 0x40, nsid, 0, 0, slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0, len(buf), inline
        )

    def _occupy(self, cid: int, opc: int, done: Done, ctx: Any, expires: bool) -> None:
        """Fill slot ``cid`` for a new command; on a closed queue give the CID back and raise."""
        if self._closed:
            self._release(cid)
            raise self._error()
        self._done[cid] = done
        self._ctx[cid] = ctx
        self._opc[cid] = opc
        self._next_off[cid] = 0
        self._started[cid] = self._tick if expires else math.inf

    def _post(
        self, cid: int, opc: int, sqflags: int, nsid: int, cdw2: int, cdw3: int, c10: int, c11: int, c12: int,
        c13: int, c14: int, c15: int, length: int, inline: memoryview | None,
    ) -> None:  # fmt: skip
        hd = self._hd
        flags = _HDGSTF if hd else 0
        if inline is None:
            header = CAPSULE_CMD_HDR.pack(
                4, flags, 72, 0, 72 + hd, opc, sqflags, cid, nsid, cdw2, cdw3, 0, 0, length,
                SGL_TRANSPORT_DATA_BLOCK, c10, c11, c12, c13, c14, c15,
            )  # fmt: skip
            self._out.append(header)
            if hd:
                self._out.append(DIGEST.pack(crc32c(header)))
        else:
            dd = self._dd
            pdo = self._cap_pdo
            header = CAPSULE_CMD_HDR.pack(
                4, flags | (_DDGSTF if dd else 0), 72, pdo, pdo + length + dd, opc, sqflags, cid, nsid,
                cdw2, cdw3, 0, 0, length, SGL_DATA_BLOCK_OFFSET, c10, c11, c12, c13, c14, c15,
            )  # fmt: skip
            self._append_pdu(header, pdo, inline)
        if self._flush_handle is None and not self._parsing:
            self._flush_handle = self._loop.call_soon(self._flush_soon)

    def _append_pdu(self, header: bytes, pdo: int, data: memoryview) -> None:
        out = self._out
        out.append(header)
        hd = self._hd
        if hd:
            out.append(DIGEST.pack(crc32c(header)))
        pad = pdo - len(header) - hd
        if pad:
            out.append(bytes(pad))
        out.append(data)
        if self._dd:
            out.append(DIGEST.pack(crc32c(data)))

    def _send_h2c(self, cid: int, ttag: int, src: memoryview, offset: int, length: int) -> None:
        """Answer an R2T with H2CData PDUs of at most MAXH2CDATA bytes, LAST_PDU on the final one."""
        end = offset + length
        pdo = self._h2c_pdo
        base = (_HDGSTF if self._hd else 0) | (_DDGSTF if self._dd else 0)
        while offset < end:
            n = min(self.maxh2cdata, end - offset)
            flags = base | (_LAST if offset + n == end else 0)
            header = DATA_HDR.pack(PduType.H2C_DATA, flags, 24, pdo, pdo + n + self._dd, cid, ttag, offset, n)
            self._append_pdu(header, pdo, src[offset : offset + n])
            offset += n
        self._kick()

    def _kick(self) -> None:
        """See that corked PDUs go out: when the current receive ends, else on the next loop iteration."""
        if self._flush_handle is None and not self._parsing:
            self._flush_handle = self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self._flush()

    def _write(self, parts: list) -> None:
        self._out.extend(parts)
        self._flush()

    def _flush(self) -> None:
        """Write everything corked so far: small PDUs joined into one buffer, big payloads as they are."""
        parts, self._out = self._out, []
        transport = self._transport
        if not parts or transport is None or transport.is_closing():
            return
        small: list = []
        for part in parts:
            if len(part) < COALESCE_LIMIT:
                small.append(part)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(part)
        if small:
            transport.write(b"".join(small) if len(small) > 1 else small[0])

    # ------------------------------------------------------------------ timeouts and teardown

    def _start_watchdog(self) -> None:
        """Tick every quarter timeout; commands record the tick they started in: no clock reads per I/O."""
        period = max(min(self.timeout / 4, 1.0), 0.01)
        self._tick_limit = math.ceil(self.timeout / period)
        self._watchdog = self._loop.call_later(period, self._watch, period)

    def _watch(self, period: float) -> None:
        """Fail a command that outlived the timeout, then drop the connection: its state is unknown."""
        self._tick += 1
        oldest = self._tick - self._tick_limit
        for cid, done in enumerate(self._done):
            if done is not None and self._started[cid] < oldest:
                name = self._command_name(cid)
                self._fail(cid, NvmeTimeout(f"{name} timed out after {self.timeout:g}s on {self.name}"))
                self._fatal = (f"{self.name}: aborted after a command timeout", None, None)
                self.abort()
                return
        self._watchdog = self._loop.call_later(period, self._watch, period)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        elif not self._lost.done():
            self.connection_lost(None)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection and wait (bounded) until asyncio has released the socket."""
        if self._transport is None:
            return
        self._fatal = self._fatal or (f"{self.name}: closed by the host", None, None)
        self._on_lost = None
        self._flush()
        self._transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._lost)
        except TimeoutError:
            self._transport.abort()
