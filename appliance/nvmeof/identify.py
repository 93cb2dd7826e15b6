"""Identify data structures and log pages, packed by the target and parsed by the host.

Each structure is described once as a table of (field, offset, size, kind), so packing and parsing
cannot drift apart. Kinds: ``u`` little-endian unsigned, ``s`` space-padded ASCII, ``z``
NUL-padded ASCII, ``b`` raw bytes.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field

IDENTIFY_SIZE = 4096
DISCOVERY_HEADER_SIZE = 1024
DISCOVERY_ENTRY_SIZE = 1024

Layout = tuple[tuple[str, int, int, str], ...]


def _pack(obj, layout: Layout, size: int) -> bytearray:
    out = bytearray(size)
    for name, off, length, kind in layout:
        value = getattr(obj, name)
        if kind == "u":
            out[off : off + length] = int(value).to_bytes(length, "little")
        elif kind in "sz":
            raw = value.encode("ascii")[:length]
            out[off : off + length] = raw.ljust(length, b" " if kind == "s" else b"\0")
        else:
            out[off : off + length] = bytes(value)[:length].ljust(length, b"\0")
    return out


def _unpack(cls, layout: Layout, buf: bytes | memoryview, **extra):
    data = bytes(buf)
    values = {}
    for name, off, length, kind in layout:
        raw = data[off : off + length]
        if kind == "u":
            values[name] = int.from_bytes(raw, "little")
        elif kind in "sz":
            values[name] = raw.split(b"\0", 1)[0].decode("ascii", "replace").rstrip(" ")
        else:
            values[name] = raw
    return cls(**values, **extra)


CONTROLLER_LAYOUT: Layout = (
    ("vid", 0, 2, "u"), ("ssvid", 2, 2, "u"), ("sn", 4, 20, "s"), ("mn", 24, 40, "s"),
    ("fr", 64, 8, "s"), ("rab", 72, 1, "u"), ("ieee", 73, 3, "u"), ("cmic", 76, 1, "u"),
    ("mdts", 77, 1, "u"), ("cntlid", 78, 2, "u"), ("ver", 80, 4, "u"), ("oaes", 92, 4, "u"),
    ("ctratt", 96, 4, "u"), ("cntrltype", 111, 1, "u"), ("oacs", 256, 2, "u"), ("acl", 258, 1, "u"),
    ("aerl", 259, 1, "u"), ("frmw", 260, 1, "u"), ("lpa", 261, 1, "u"), ("elpe", 262, 1, "u"),
    ("kas", 320, 2, "u"), ("wctemp", 266, 2, "u"), ("cctemp", 268, 2, "u"), ("sqes", 512, 1, "u"),
    ("cqes", 513, 1, "u"), ("maxcmd", 514, 2, "u"), ("nn", 516, 4, "u"), ("oncs", 520, 2, "u"),
    ("fuses", 522, 2, "u"), ("vwc", 525, 1, "u"), ("sgls", 536, 4, "u"), ("subnqn", 768, 256, "z"),
    ("ioccsz", 1792, 4, "u"), ("iorcsz", 1796, 4, "u"), ("icdoff", 1800, 2, "u"),
    ("fcatt", 1802, 1, "u"), ("msdbd", 1803, 1, "u"), ("ofcs", 1804, 2, "u"),
)  # fmt: skip


@dataclass(slots=True)
class IdentifyController:
    """Identify Controller (CNS 01h); defaults are what a fabrics I/O controller should report."""

    cntlid: int = 0
    subnqn: str = ""
    sn: str = ""
    mn: str = ""
    fr: str = "26.05"
    vid: int = 0x1D1D
    ssvid: int = 0x1D1D
    rab: int = 6
    ieee: int = 0
    cmic: int = 0x03
    mdts: int = 5
    ver: int = 0x00010300
    oaes: int = 1 << 8
    ctratt: int = 0x1
    cntrltype: int = 1
    oacs: int = 0
    acl: int = 3
    aerl: int = 3
    frmw: int = 0x03
    lpa: int = 0x04
    elpe: int = 127
    kas: int = 100
    wctemp: int = 0x157
    cctemp: int = 0x175
    sqes: int = 0x66
    cqes: int = 0x44
    maxcmd: int = 128
    nn: int = 32
    oncs: int = 0x0D  # compare, dataset management, write zeroes
    fuses: int = 0
    vwc: int = 0x1
    sgls: int = 0x00100001
    ioccsz: int = 260
    iorcsz: int = 1
    icdoff: int = 0
    fcatt: int = 0
    msdbd: int = 1
    ofcs: int = 0

    def pack(self) -> bytearray:
        return _pack(self, CONTROLLER_LAYOUT, IDENTIFY_SIZE)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> IdentifyController:
        return _unpack(cls, CONTROLLER_LAYOUT, buf)


NAMESPACE_LAYOUT: Layout = (
    ("nsze", 0, 8, "u"), ("ncap", 8, 8, "u"), ("nuse", 16, 8, "u"), ("nsfeat", 24, 1, "u"),
    ("nlbaf", 25, 1, "u"), ("flbas", 26, 1, "u"), ("nmic", 30, 1, "u"), ("dlfeat", 33, 1, "u"),
    ("nguid", 104, 16, "b"), ("eui64", 120, 8, "b"),
)  # fmt: skip


@dataclass(slots=True)
class LbaFormat:
    lbads: int  # log2 of the block size
    ms: int = 0  # metadata bytes per block
    rp: int = 0

    def pack(self) -> int:
        return self.ms | (self.lbads << 16) | (self.rp << 24)


@dataclass(slots=True)
class IdentifyNamespace:
    """Identify Namespace (CNS 00h) with one or more LBA formats."""

    nsze: int = 0
    ncap: int = 0
    nuse: int = 0
    nsfeat: int = 0
    nlbaf: int = 0
    flbas: int = 0
    nmic: int = 1
    dlfeat: int = 0x1  # deallocated blocks read as zeroes
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    lbaf: list[LbaFormat] = field(default_factory=lambda: [LbaFormat(9)])

    @property
    def block_size(self) -> int:
        index = (self.flbas & 0xF) | ((self.flbas >> 1) & 0x30)
        return 1 << self.lbaf[index].lbads

    def pack(self) -> bytearray:
        self.nlbaf = len(self.lbaf) - 1
        out = _pack(self, NAMESPACE_LAYOUT, IDENTIFY_SIZE)
        for i, fmt in enumerate(self.lbaf):
            out[128 + 4 * i : 132 + 4 * i] = fmt.pack().to_bytes(4, "little")
        return out

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> IdentifyNamespace:
        data = bytes(buf)
        nlbaf = data[25]
        lbaf = []
        for i in range(nlbaf + 1):
            word = int.from_bytes(data[128 + 4 * i : 132 + 4 * i], "little")
            lbaf.append(LbaFormat((word >> 16) & 0xFF, word & 0xFFFF, (word >> 24) & 0x3))
        return _unpack(cls, NAMESPACE_LAYOUT, data, lbaf=lbaf)


NIDT_EUI64, NIDT_NGUID, NIDT_UUID, NIDT_CSI = 1, 2, 3, 4


@dataclass(slots=True)
class NamespaceIds:
    """The Namespace Identification Descriptor list (CNS 03h)."""

    eui64: bytes | None = None
    nguid: bytes | None = None
    uuid: uuidlib.UUID | None = None
    csi: int | None = None

    def pack(self) -> bytearray:
        out = bytearray(IDENTIFY_SIZE)
        pos = 0
        for nidt, value in (
            (NIDT_EUI64, self.eui64),
            (NIDT_NGUID, self.nguid),
            (NIDT_UUID, self.uuid.bytes if self.uuid else None),
            (NIDT_CSI, bytes([self.csi]) if self.csi is not None else None),
        ):
            if value is None:
                continue
            out[pos : pos + 4] = bytes([nidt, len(value), 0, 0])
            out[pos + 4 : pos + 4 + len(value)] = value
            pos += 4 + len(value)
        return out

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> NamespaceIds:
        data = bytes(buf)
        ids = cls()
        pos = 0
        while pos + 4 <= len(data) and data[pos] != 0:
            nidt, nidl = data[pos], data[pos + 1]
            value = data[pos + 4 : pos + 4 + nidl]
            if nidt == NIDT_EUI64:
                ids.eui64 = value
            elif nidt == NIDT_NGUID:
                ids.nguid = value
            elif nidt == NIDT_UUID:
                ids.uuid = uuidlib.UUID(bytes=value)
            elif nidt == NIDT_CSI:
                ids.csi = value[0]
            pos += 4 + nidl
        return ids


def pack_nsid_list(nsids: list[int], after: int) -> bytearray:
    """Active namespace ID list (CNS 02h): IDs greater than ``after``, ascending, at most 1024."""
    out = bytearray(IDENTIFY_SIZE)
    chosen = sorted(n for n in nsids if n > after)[:1024]
    for i, nsid in enumerate(chosen):
        out[4 * i : 4 * i + 4] = nsid.to_bytes(4, "little")
    return out


def unpack_nsid_list(buf: bytes | memoryview) -> list[int]:
    data = bytes(buf)
    out = []
    for i in range(0, len(data) - 3, 4):
        nsid = int.from_bytes(data[i : i + 4], "little")
        if nsid == 0:
            break
        out.append(nsid)
    return out


DISCOVERY_ENTRY_LAYOUT: Layout = (
    ("trtype", 0, 1, "u"), ("adrfam", 1, 1, "u"), ("subtype", 2, 1, "u"), ("treq", 3, 1, "u"),
    ("portid", 4, 2, "u"), ("cntlid", 6, 2, "u"), ("asqsz", 8, 2, "u"), ("eflags", 10, 2, "u"),
    ("trsvcid", 32, 32, "s"), ("subnqn", 256, 256, "z"), ("traddr", 512, 256, "s"),
    ("tsas", 768, 256, "b"),
)  # fmt: skip


@dataclass(slots=True)
class DiscoveryEntry:
    """One discovery log page entry (1024 bytes)."""

    subnqn: str
    traddr: str
    trsvcid: str
    trtype: int = 3  # TCP
    adrfam: int = 1  # IPv4
    subtype: int = 2  # NVM subsystem
    treq: int = 2  # secure channel not required
    portid: int = 0
    cntlid: int = 0xFFFF
    asqsz: int = 128
    eflags: int = 0
    tsas: bytes = bytes(256)

    def pack(self) -> bytearray:
        return _pack(self, DISCOVERY_ENTRY_LAYOUT, DISCOVERY_ENTRY_SIZE)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> DiscoveryEntry:
        return _unpack(cls, DISCOVERY_ENTRY_LAYOUT, buf)


def pack_discovery_log(genctr: int, entries: list[DiscoveryEntry]) -> bytearray:
    """The whole discovery log page: 1024-byte header, then one 1024-byte entry per record."""
    out = bytearray(DISCOVERY_HEADER_SIZE + DISCOVERY_ENTRY_SIZE * len(entries))
    out[0:8] = genctr.to_bytes(8, "little")
    out[8:16] = len(entries).to_bytes(8, "little")
    for i, entry in enumerate(entries):
        start = DISCOVERY_HEADER_SIZE + i * DISCOVERY_ENTRY_SIZE
        out[start : start + DISCOVERY_ENTRY_SIZE] = entry.pack()
    return out


def unpack_discovery_header(buf: bytes | memoryview) -> tuple[int, int]:
    """(GENCTR, NUMREC) of a discovery log page."""
    data = bytes(buf[:16])
    return int.from_bytes(data[0:8], "little"), int.from_bytes(data[8:16], "little")
