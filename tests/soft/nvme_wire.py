"""A raw NVMe/TCP test host built on ``appliance.nvmeof.pdu``: one object per queue (TCP connection).

Deliberately small and explicit so tests can also send malformed PDUs; it is not the product's
host. Every wait is bounded by the caller's ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass

from appliance.nvmeof.pdu import (
    CH,
    R2T,
    C2HData,
    CapsuleCmd,
    CapsuleResp,
    Cqe,
    Digests,
    H2CData,
    ICReq,
    ICResp,
    Sqe,
    TermReq,
    decode,
    encode,
)
from appliance.nvmeof.spec import (
    CC_EN,
    SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK,
    AdminOpcode,
    FabricsType,
    IoOpcode,
    Property,
    status_code,
)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-7465-7374-0000-000000000001"
OTHER_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-7465-7374-0000-000000000002"
CC_ENABLE = CC_EN | (6 << 16) | (4 << 20)


class TermReceived(Exception):
    """The target sent a C2HTermReq."""

    def __init__(self, term: TermReq):
        super().__init__(f"C2HTermReq FES 0x{term.fes:02x} FEI {term.fei}")
        self.term = term


@dataclass
class Completion:
    cqe: Cqe
    data: bytes = b""
    c2h_success: bool = False  # completed by a C2HData with SUCCESS, no CapsuleResp

    @property
    def status(self) -> int:
        """``(sct << 8) | sc``, as in ``spec.Status``."""
        return status_code(self.cqe.status)


def connect_data(subnqn: str, hostnqn: str, cntlid: int = 0xFFFF, hostid: bytes | None = None) -> bytes:
    out = bytearray(1024)
    out[0:16] = hostid or uuid.uuid5(uuid.NAMESPACE_URL, hostnqn).bytes
    out[16:18] = cntlid.to_bytes(2, "little")
    out[256 : 256 + len(subnqn)] = subnqn.encode()
    out[512 : 512 + len(hostnqn)] = hostnqn.encode()
    return bytes(out)


def connect_sqe(cid: int = 0, qid: int = 0, sqsize: int = 31, kato: int = 0, recfmt: int = 0) -> Sqe:
    return Sqe(AdminOpcode.FABRICS, cid=cid, nsid=FabricsType.CONNECT, flags=0,
               cdw10=recfmt | qid << 16, cdw11=sqsize, cdw12=kato)  # fmt: skip


def prop_get_sqe(offset: int, size8: bool = False, cid: int = 0) -> Sqe:
    return Sqe(AdminOpcode.FABRICS, cid=cid, nsid=FabricsType.PROPERTY_GET, flags=0,
               cdw10=int(size8), cdw11=offset)  # fmt: skip


def prop_set_sqe(offset: int, value: int, size8: bool = False, cid: int = 0) -> Sqe:
    return Sqe(AdminOpcode.FABRICS, cid=cid, nsid=FabricsType.PROPERTY_SET, flags=0,
               cdw10=int(size8), cdw11=offset, cdw12=value & 0xFFFFFFFF, cdw13=value >> 32)  # fmt: skip


def rw_sqe(opcode: int, slba: int, nlb: int, *, cid: int = 0, nsid: int = 1) -> Sqe:
    """A Read/Write-style SQE (NLB one-based here); the SGL is filled in when it is sent."""
    return Sqe(
        opcode, cid=cid, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) & 0xFFFF
    )


class WireQueue:
    """One NVMe/TCP queue of a test host."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.dg = Digests()
        self.icresp: ICResp | None = None
        self._cids = itertools.cycle(range(0x8000))
        self._writes: dict[int, bytes] = {}
        self._data: dict[int, bytearray] = {}
        self._done: dict[int, Completion] = {}
        self.r2ts: list[R2T] = []
        self.cntlid = 0
        self.h2c_chunk = 0  # split H2CData below MAXH2CDATA when set

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", hdgst: bool = False, ddgst: bool = False,
                   icreq: bool = True) -> WireQueue:  # fmt: skip
        reader, writer = await asyncio.open_connection(host, port)
        queue = cls(reader, writer)
        if icreq:
            await queue.send(ICReq(hdgst=hdgst, ddgst=ddgst))
            resp = await queue.recv()
            assert isinstance(resp, ICResp), resp
            queue.icresp = resp
            queue.dg = Digests(resp.hdgst, resp.ddgst)
        return queue

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    # ------------------------------------------------------------------ PDUs

    async def send(self, pdu) -> None:
        self.writer.writelines(encode(pdu, self.dg))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_raw(self) -> bytes:
        """One whole PDU as bytes (no decoding)."""
        ch = await self.reader.readexactly(8)
        plen = CH.unpack(ch)[4]
        return ch + await self.reader.readexactly(plen - 8)

    async def recv(self):
        return decode(await self.recv_raw(), self.dg, from_host=False)

    async def closed_by_peer(self) -> bool:
        """True once the target has closed the connection (EOF)."""
        return await self.reader.read(1) == b""

    # ------------------------------------------------------------------ commands

    def next_cid(self) -> int:
        return next(self._cids)

    async def submit(self, sqe: Sqe, data: bytes = b"", read_len: int = 0, in_capsule: bool = True) -> int:
        """Send a command; data goes in-capsule or, with ``in_capsule=False``, after the target's R2T."""
        if data and in_capsule:
            sqe.sgl_id, sqe.sgl_len = SGL_DATA_BLOCK_OFFSET, len(data)
            await self.send(CapsuleCmd(sqe, data))
        else:
            sqe.sgl_id, sqe.sgl_len = SGL_TRANSPORT_DATA_BLOCK, len(data) or read_len
            if data:
                self._writes[sqe.cid] = data
            await self.send(CapsuleCmd(sqe))
        return sqe.cid

    async def pump(self) -> None:
        """Handle one PDU from the target."""
        pdu = await self.recv()
        if isinstance(pdu, C2HData):
            buf = self._data.setdefault(pdu.cccid, bytearray())
            assert pdu.datao == len(buf), f"C2HData out of order: {pdu.datao} after {len(buf)}"
            buf += pdu.data
            if pdu.success:
                assert pdu.last, "SUCCESS without LAST_PDU"
                self._done[pdu.cccid] = Completion(Cqe(pdu.cccid), bytes(self._data.pop(pdu.cccid)), True)
        elif isinstance(pdu, CapsuleResp):
            cid = pdu.cqe.cid
            self._done[cid] = Completion(pdu.cqe, bytes(self._data.pop(cid, b"")))
        elif isinstance(pdu, R2T):
            self.r2ts.append(pdu)
            data = self._writes.pop(pdu.cccid)[pdu.r2to : pdu.r2to + pdu.r2tl]
            chunk = self.h2c_chunk or self.icresp.maxh2cdata
            for off in range(0, len(data), chunk):
                part = data[off : off + chunk]
                last = off + chunk >= len(data)
                await self.send(H2CData(pdu.cccid, pdu.ttag, pdu.r2to + off, part, last))
        elif isinstance(pdu, TermReq):
            raise TermReceived(pdu)
        else:
            raise AssertionError(f"unexpected PDU from target: {pdu!r}")

    async def wait(self, cid: int) -> Completion:
        while cid not in self._done:
            await self.pump()
        return self._done.pop(cid)

    async def command(
        self, sqe: Sqe, data: bytes = b"", read_len: int = 0, in_capsule: bool = True
    ) -> Completion:
        if not sqe.cid:
            sqe.cid = self.next_cid()
        return await self.wait(await self.submit(sqe, data, read_len, in_capsule))

    # ------------------------------------------------------------------ Fabrics and admin helpers

    async def connect(self, subnqn: str, hostnqn: str = HOSTNQN, qid: int = 0, cntlid: int = 0xFFFF,
                      sqsize: int = 31, kato: int = 0, recfmt: int = 0,
                      data: bytes | None = None) -> Completion:  # fmt: skip
        """Fabrics Connect; ``data`` replaces the connect data built from the NQNs and ``cntlid``."""
        sqe = connect_sqe(self.next_cid(), qid, sqsize, kato, recfmt)
        done = await self.command(sqe, data if data is not None else connect_data(subnqn, hostnqn, cntlid))
        if done.status == 0:
            self.cntlid = done.cqe.dw0 & 0xFFFF
        return done

    async def prop_get(self, offset: int, size8: bool = False) -> Completion:
        return await self.command(prop_get_sqe(offset, size8, self.next_cid()))

    async def prop_set(self, offset: int, value: int, size8: bool = False) -> Completion:
        return await self.command(prop_set_sqe(offset, value, size8, self.next_cid()))

    async def enable(self) -> None:
        assert (await self.prop_set(Property.CC, CC_ENABLE)).status == 0
        assert (await self.prop_get(Property.CSTS)).cqe.dw0 & 1

    async def admin(
        self, opcode: int, nsid: int = 0, read_len: int = 0, data: bytes = b"", **cdw
    ) -> Completion:
        return await self.command(Sqe(opcode, cid=self.next_cid(), nsid=nsid, **cdw), data, read_len)

    async def submit_aer(self) -> int:
        """An Asynchronous Event Request left outstanding; ``wait(cid)`` gets the event."""
        return await self.submit(Sqe(AdminOpcode.ASYNC_EVENT_REQUEST, cid=self.next_cid()))

    async def identify(self, cns: int, nsid: int = 0, csi: int = 0) -> Completion:
        return await self.admin(AdminOpcode.IDENTIFY, nsid, 4096, cdw10=cns, cdw11=csi << 24)

    async def get_log(
        self, lid: int, length: int, offset: int = 0, rae: bool = False, nsid: int = 0
    ) -> Completion:
        numd = length // 4 - 1
        return await self.admin(AdminOpcode.GET_LOG_PAGE, nsid, length,
                                cdw10=lid | (rae << 15) | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                                cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)  # fmt: skip

    async def set_features(self, fid: int, value: int, save: bool = False) -> Completion:
        return await self.admin(AdminOpcode.SET_FEATURES, cdw10=fid | (save << 31), cdw11=value)

    async def get_features(self, fid: int, sel: int = 0) -> Completion:
        return await self.admin(AdminOpcode.GET_FEATURES, cdw10=fid | (sel << 8))

    # ------------------------------------------------------------------ NVM helpers

    async def read(self, nsid: int, slba: int, nlb: int, block_size: int) -> Completion:
        sqe = rw_sqe(IoOpcode.READ, slba, nlb, cid=self.next_cid(), nsid=nsid)
        return await self.command(sqe, read_len=nlb * block_size)

    async def write(
        self, nsid: int, slba: int, data: bytes, block_size: int, in_capsule: bool = True
    ) -> Completion:
        sqe = rw_sqe(IoOpcode.WRITE, slba, len(data) // block_size, cid=self.next_cid(), nsid=nsid)
        return await self.command(sqe, data, in_capsule=in_capsule)


async def open_controller(port: int, subnqn: str, hostnqn: str = HOSTNQN, kato: int = 0, **kw) -> WireQueue:
    """An enabled admin queue: ICReq, Connect, CC.EN=1."""
    admin = await WireQueue.open(port, **kw)
    done = await admin.connect(subnqn, hostnqn, kato=kato)
    assert done.status == 0, f"connect failed: 0x{done.status:03x}"
    await admin.enable()
    return admin


async def open_io_queue(port: int, subnqn: str, cntlid: int, qid: int = 1, hostnqn: str = HOSTNQN,
                        sqsize: int = 127, **kw) -> WireQueue:  # fmt: skip
    queue = await WireQueue.open(port, **kw)
    done = await queue.connect(subnqn, hostnqn, qid=qid, cntlid=cntlid, sqsize=sqsize)
    assert done.status == 0, f"I/O connect failed: 0x{done.status:03x}"
    return queue


async def open_queues(port: int, subnqn: str, qid: int = 1, **kw) -> tuple[WireQueue, WireQueue]:
    """A new controller's enabled admin queue and its I/O queue ``qid``; ``kw`` go to both."""
    admin = await open_controller(port, subnqn, **kw)
    return admin, await open_io_queue(port, subnqn, admin.cntlid, qid=qid, **kw)
