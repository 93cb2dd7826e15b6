"""NVMe/TCP PDU codec: the common header, every PDU type, the 64-byte SQE and 16-byte CQE.

Encoders return lists of buffers so payloads are never copied into a new bytes object; decoders
read from ``memoryview`` slices of a receive buffer. The hot paths of the target and the host use
the precompiled ``struct.Struct`` objects here directly; the dataclasses are for everything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crc32c import crc32c

from .spec import HDGST_TYPES, HLEN, Fes, PduFlag, PduType

CH = struct.Struct("<BBBBI")
IC = struct.Struct("<BBBBIHBBI112x")
TERM = struct.Struct("<BBBBIHI10x")
SQE = struct.Struct("<BBHIIIQQI3xBIIIIII")
CQE = struct.Struct("<IIHHHH")
DATA_HDR = struct.Struct("<BBBBIHHII4x")  # H2CData, C2HData and R2T share this layout
CAPSULE_CMD_HDR = struct.Struct("<BBBBI" + SQE.format[1:])
CAPSULE_RESP = struct.Struct("<BBBBI" + CQE.format[1:])
DIGEST = struct.Struct("<I")

assert SQE.size == 64 and CQE.size == 16 and IC.size == 128 and TERM.size == 24 and DATA_HDR.size == 24

MAX_TERM_COPY = 128


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """CRC32C of ``data`` as the 4 little-endian bytes NVMe/TCP puts on the wire."""
    return DIGEST.pack(crc32c(data))


class PduError(Exception):
    """A received PDU the peer must be told about with a termination request."""

    def __init__(self, fes: Fes, fei: int, message: str):
        super().__init__(message)
        self.fes = fes
        self.fei = fei


@dataclass(slots=True)
class Sqe:
    """A submission queue entry; dwords 10..15 are command specific."""

    opcode: int
    cid: int = 0
    nsid: int = 0
    flags: int = 0x40  # PSDT = SGL, as fabrics hosts send
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    sgl_addr: int = 0
    sgl_len: int = 0
    sgl_id: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    def pack(self) -> bytes:
        return SQE.pack(
            self.opcode, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3, self.mptr,
            self.sgl_addr, self.sgl_len, self.sgl_id, self.cdw10, self.cdw11, self.cdw12,
            self.cdw13, self.cdw14, self.cdw15,
        )  # fmt: skip

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> Sqe:
        (opc, flags, cid, nsid, cdw2, cdw3, mptr, addr, length, sgl_id,
         c10, c11, c12, c13, c14, c15) = SQE.unpack_from(buf, offset)  # fmt: skip
        return cls(opc, cid, nsid, flags, cdw2, cdw3, mptr, addr, length, sgl_id,
                   c10, c11, c12, c13, c14, c15)

    @property
    def fctype(self) -> int:
        """Fabrics command type, byte 4 of the SQE (where NSID sits for other commands)."""
        return self.nsid & 0xFF

    @property
    def slba(self) -> int:
        return self.cdw10 | (self.cdw11 << 32)

    @property
    def nlb(self) -> int:
        """Number of logical blocks, one-based (the SQE field is zero-based)."""
        return (self.cdw12 & 0xFFFF) + 1


@dataclass(slots=True)
class Cqe:
    cid: int
    status: int = 0  # the raw 16-bit STATUS word
    dw0: int = 0
    dw1: int = 0
    sqhd: int = 0
    sqid: int = 0

    def pack(self) -> bytes:
        return CQE.pack(self.dw0, self.dw1, self.sqhd, self.sqid, self.cid, self.status)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> Cqe:
        dw0, dw1, sqhd, sqid, cid, status = CQE.unpack_from(buf, offset)
        return cls(cid, status, dw0, dw1, sqhd, sqid)


@dataclass(slots=True)
class ICReq:
    hpda: int = 0
    hdgst: bool = False
    ddgst: bool = False
    maxr2t: int = 0
    pfv: int = 0


@dataclass(slots=True)
class ICResp:
    cpda: int = 0
    hdgst: bool = False
    ddgst: bool = False
    maxh2cdata: int = 131072
    pfv: int = 0


@dataclass(slots=True)
class TermReq:
    fes: int
    fei: int = 0
    header: bytes = b""
    from_host: bool = False


@dataclass(slots=True)
class CapsuleCmd:
    sqe: Sqe
    data: bytes | memoryview = b""


@dataclass(slots=True)
class CapsuleResp:
    cqe: Cqe


@dataclass(slots=True)
class H2CData:
    cccid: int
    ttag: int
    datao: int
    data: bytes | memoryview
    last: bool = True


@dataclass(slots=True)
class C2HData:
    cccid: int
    datao: int
    data: bytes | memoryview
    last: bool = True
    success: bool = False


@dataclass(slots=True)
class R2T:
    cccid: int
    ttag: int
    r2to: int
    r2tl: int


Pdu = ICReq | ICResp | TermReq | CapsuleCmd | CapsuleResp | H2CData | C2HData | R2T


@dataclass(slots=True)
class Digests:
    """What a connection negotiated; digests never apply to ICReq, ICResp or TermReq."""

    header: bool = False
    data: bool = False


def _frame(ptype: int, flags: int, header_rest: bytes, data, dg: Digests) -> list:
    """Frame a PDU whose header (after CH) is ``header_rest`` and whose payload is ``data``."""
    hlen = 8 + len(header_rest)
    hd = dg.header and ptype in HDGST_TYPES
    dd = dg.data and ptype in HDGST_TYPES and len(data) > 0
    if hd:
        flags |= PduFlag.HDGSTF
    if dd:
        flags |= PduFlag.DDGSTF
    pdo = hlen + (4 if hd else 0) if len(data) else 0
    plen = hlen + (4 if hd else 0) + len(data) + (4 if dd else 0)
    header = CH.pack(ptype, flags, hlen, pdo, plen) + header_rest
    parts = [header + digest(header) if hd else header]
    if len(data):
        parts.append(data)
        if dd:
            parts.append(digest(data))
    return parts


def encode(pdu: Pdu, dg: Digests | None = None) -> list:
    """Encode a PDU as a list of buffers ready for ``writelines``/``sendmsg``."""
    dg = dg or Digests()
    match pdu:
        case ICReq():
            dgst = (1 if pdu.hdgst else 0) | (2 if pdu.ddgst else 0)
            return [IC.pack(PduType.IC_REQ, 0, 128, 0, 128, pdu.pfv, pdu.hpda, dgst, pdu.maxr2t)]
        case ICResp():
            dgst = (1 if pdu.hdgst else 0) | (2 if pdu.ddgst else 0)
            return [IC.pack(PduType.IC_RESP, 0, 128, 0, 128, pdu.pfv, pdu.cpda, dgst, pdu.maxh2cdata)]
        case TermReq():
            ptype = PduType.H2C_TERM_REQ if pdu.from_host else PduType.C2H_TERM_REQ
            copy = bytes(pdu.header[:MAX_TERM_COPY])
            return [TERM.pack(ptype, 0, 24, 0, 24 + len(copy), pdu.fes, pdu.fei) + copy]
        case CapsuleCmd():
            return _frame(PduType.CAPSULE_CMD, 0, pdu.sqe.pack(), pdu.data, dg)
        case CapsuleResp():
            return _frame(PduType.CAPSULE_RESP, 0, pdu.cqe.pack(), b"", dg)
        case H2CData():
            flags = PduFlag.LAST_PDU if pdu.last else 0
            rest = DATA_HDR.pack(0, 0, 0, 0, 0, pdu.cccid, pdu.ttag, pdu.datao, len(pdu.data))[8:]
            return _frame(PduType.H2C_DATA, flags, rest, pdu.data, dg)
        case C2HData():
            flags = (PduFlag.LAST_PDU if pdu.last else 0) | (PduFlag.SUCCESS if pdu.success else 0)
            rest = DATA_HDR.pack(0, 0, 0, 0, 0, pdu.cccid, 0, pdu.datao, len(pdu.data))[8:]
            return _frame(PduType.C2H_DATA, flags, rest, pdu.data, dg)
        case R2T():
            rest = DATA_HDR.pack(0, 0, 0, 0, 0, pdu.cccid, pdu.ttag, pdu.r2to, pdu.r2tl)[8:]
            return _frame(PduType.R2T, 0, rest, b"", dg)
    raise TypeError(f"not a PDU: {pdu!r}")


def encode_bytes(pdu: Pdu, dg: Digests | None = None) -> bytes:
    return b"".join(bytes(p) for p in encode(pdu, dg))


def check_header(buf: memoryview, dg: Digests, received_from_host: bool, max_plen: int) -> tuple[int, int]:
    """Validate the common header of a complete-or-partial PDU; return (hlen, plen).

    Raises :class:`PduError` with the FES and FEI a termination request should carry.
    """
    ptype, flags, hlen, pdo, plen = CH.unpack_from(buf)
    try:
        kind = PduType(ptype)
    except ValueError:
        raise PduError(Fes.INVALID_HEADER_FIELD, 0, f"unknown PDU type 0x{ptype:02x}") from None
    host_types = {PduType.IC_REQ, PduType.H2C_TERM_REQ, PduType.CAPSULE_CMD, PduType.H2C_DATA}
    if (kind in host_types) != received_from_host:
        raise PduError(Fes.INVALID_HEADER_FIELD, 0, f"{kind.name} not valid in this direction")
    if hlen != HLEN[kind]:
        raise PduError(Fes.INVALID_HEADER_FIELD, 2, f"{kind.name} with HLEN {hlen}, expected {HLEN[kind]}")
    hd = dg.header and kind in HDGST_TYPES
    if kind in HDGST_TYPES and bool(flags & PduFlag.HDGSTF) != dg.header:
        raise PduError(Fes.INVALID_HEADER_FIELD, 1, f"{kind.name} header digest flag does not match")
    min_plen = hlen + (4 if hd else 0)
    if kind in (PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ):
        if plen < 24 or plen > 24 + MAX_TERM_COPY:
            raise PduError(Fes.INVALID_HEADER_FIELD, 4, f"termination request with PLEN {plen}")
        return hlen, plen
    if plen < min_plen:
        raise PduError(Fes.INVALID_HEADER_FIELD, 4, f"{kind.name} PLEN {plen} shorter than its header")
    if plen > max_plen:
        raise PduError(Fes.DATA_LIMIT_EXCEEDED, 4, f"{kind.name} PLEN {plen} exceeds {max_plen}")
    if plen > min_plen:  # carries data
        if kind in (PduType.IC_REQ, PduType.IC_RESP, PduType.CAPSULE_RESP, PduType.R2T):
            raise PduError(Fes.INVALID_HEADER_FIELD, 4, f"{kind.name} PLEN {plen}, expected {min_plen}")
        dd = dg.data
        if bool(flags & PduFlag.DDGSTF) != dd:
            raise PduError(Fes.INVALID_HEADER_FIELD, 1, f"{kind.name} data digest flag does not match")
        if pdo != min_plen:
            raise PduError(Fes.INVALID_HEADER_FIELD, 3, f"{kind.name} PDO {pdo}, expected {min_plen}")
        if plen < pdo + (4 if dd else 0) + 1:
            raise PduError(Fes.INVALID_HEADER_FIELD, 4, f"{kind.name} PLEN {plen} too short for its data")
    elif pdo not in (0, min_plen) and kind in (PduType.CAPSULE_CMD, PduType.H2C_DATA, PduType.C2H_DATA):
        raise PduError(Fes.INVALID_HEADER_FIELD, 3, f"{kind.name} PDO {pdo} without data")
    return hlen, plen


def decode(pdu: memoryview | bytes, dg: Digests | None = None, from_host: bool | None = None) -> Pdu:
    """Decode one complete PDU (exactly PLEN bytes), checking digests.

    ``from_host`` limits the accepted types to one direction; None accepts both.
    """
    dg = dg or Digests()
    buf = memoryview(pdu)
    if len(buf) < 8:
        raise PduError(Fes.INVALID_HEADER_FIELD, 4, "truncated common header")
    ptype, flags, hlen, pdo, plen = CH.unpack_from(buf)
    if from_host is None:
        from_host = ptype in (PduType.IC_REQ, PduType.H2C_TERM_REQ, PduType.CAPSULE_CMD, PduType.H2C_DATA)
    check_header(buf, dg, from_host, 1 << 30)
    if len(buf) != plen:
        raise PduError(Fes.INVALID_HEADER_FIELD, 4, f"PLEN {plen} but {len(buf)} bytes given")
    kind = PduType(ptype)
    hd = dg.header and kind in HDGST_TYPES
    if hd and bytes(buf[hlen : hlen + 4]) != digest(buf[:hlen]):
        raise PduError(Fes.HEADER_DIGEST_ERROR, 0, "header digest mismatch")
    data = buf[pdo : plen - (4 if (pdo and dg.data) else 0)] if pdo else buf[0:0]
    if pdo and dg.data and bytes(buf[plen - 4 : plen]) != digest(data):
        raise DataDigestError("data digest mismatch")
    if kind in (PduType.IC_REQ, PduType.IC_RESP):
        _, _, _, _, _, pfv, pda, dgst, word = IC.unpack_from(buf)
        if kind == PduType.IC_REQ:
            return ICReq(pda, bool(dgst & 1), bool(dgst & 2), word, pfv)
        return ICResp(pda, bool(dgst & 1), bool(dgst & 2), word, pfv)
    if kind in (PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ):
        _, _, _, _, _, fes, fei = TERM.unpack_from(buf)
        return TermReq(fes, fei, bytes(buf[24:plen]), kind == PduType.H2C_TERM_REQ)
    if kind == PduType.CAPSULE_CMD:
        return CapsuleCmd(Sqe.unpack(buf, 8), data)
    if kind == PduType.CAPSULE_RESP:
        return CapsuleResp(Cqe.unpack(buf, 8))
    _, _, _, _, _, cccid, ttag, off, length = DATA_HDR.unpack_from(buf)
    if kind == PduType.R2T:
        return R2T(cccid, ttag, off, length)
    if length != len(data):
        raise PduError(Fes.INVALID_HEADER_FIELD, 16, f"DATAL {length} but {len(data)} data bytes")
    if kind == PduType.H2C_DATA:
        return H2CData(cccid, ttag, off, data, bool(flags & PduFlag.LAST_PDU))
    return C2HData(cccid, off, data, bool(flags & PduFlag.LAST_PDU), bool(flags & PduFlag.SUCCESS))


class DataDigestError(Exception):
    """A data digest mismatch: the command fails with a transfer error, the connection lives on."""
