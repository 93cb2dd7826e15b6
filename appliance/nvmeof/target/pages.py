"""Identify structures and log pages as a controller returns them, built from the configuration model.

Kept apart from the controller state machine so each page is one small pure function of the model.
"""

from __future__ import annotations

from ..identify import (
    IDENTIFY_SIZE,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NamespaceIds,
    pack_nsid_list,
)
from .model import Namespace, Subsystem, Transport

FIRMWARE_REVISION = IdentifyController().fr
OAES_DISCOVERY_LOG = 1 << 31
SMART_SIZE = 512
FIRMWARE_SLOT_SIZE = 512
CHANGED_NS_MAX = 1024


def mdts(transport: Transport) -> int:
    """MDTS exponent: the largest power of two of 4 KiB pages within max_io_size."""
    return max((transport.max_io_size // 4096).bit_length() - 1, 0)


def identify_controller(sub: Subsystem, transport: Transport, cntlid: int) -> bytearray:
    ident = IdentifyController(  # the defaults are an NVM I/O controller's
        cntlid=cntlid,
        subnqn=sub.nqn,
        sn=sub.serial_number,
        mn=sub.model_number,
        mdts=mdts(transport),
        kas=transport.kas,
        maxcmd=transport.max_queue_depth,
        nn=sub.max_namespaces,
        ioccsz=(64 + transport.in_capsule_data_size) // 16,
    )
    if sub.is_discovery:
        ident.oaes, ident.cntrltype, ident.nn, ident.oncs, ident.vwc = OAES_DISCOVERY_LOG, 2, 0, 0, 0
    return ident.pack()


def identify_namespace(ns: Namespace) -> bytearray:
    bdev = ns.bdev
    return IdentifyNamespace(
        nsze=bdev.num_blocks,
        ncap=bdev.num_blocks,
        nuse=bdev.num_blocks,
        nguid=ns.nguid,
        eui64=ns.eui64,
        lbaf=[LbaFormat(bdev.block_size.bit_length() - 1)],
    ).pack()


def namespace_ids(ns: Namespace) -> bytearray:
    return NamespaceIds(eui64=ns.eui64, nguid=ns.nguid, uuid=ns.uuid, csi=0).pack()


def independent_namespace() -> bytearray:
    """CNS 08h: NMIC shared, NSTAT ready; Linux ignores a namespace that is not marked ready."""
    out = bytearray(IDENTIFY_SIZE)
    out[1] = 1  # NMIC
    out[14] = 1  # NSTAT.NRDY
    return out


def command_set_vector() -> bytearray:
    """CNS 1Ch: one I/O command set combination, NVM only."""
    out = bytearray(IDENTIFY_SIZE)
    out[0] = 1
    return out


def active_namespaces(sub: Subsystem, after: int) -> bytearray:
    return pack_nsid_list(list(sub.namespaces), after)


def smart_log(namespaces: list[Namespace]) -> bytearray:
    out = bytearray(SMART_SIZE)
    out[1:3] = (0x0141).to_bytes(2, "little")  # composite temperature, 321 K
    out[3] = 100  # available spare
    out[4] = 10  # spare threshold
    read = sum(ns.bdev.stat.bytes_read for ns in namespaces)
    written = sum(ns.bdev.stat.bytes_written for ns in namespaces)
    for off, value in (
        (32, -(-read // 512_000)),  # data units read, thousands of 512-byte units, rounded up
        (48, -(-written // 512_000)),
        (64, sum(ns.bdev.stat.num_read_ops for ns in namespaces)),
        (80, sum(ns.bdev.stat.num_write_ops for ns in namespaces)),
    ):
        out[off : off + 16] = value.to_bytes(16, "little")
    return out


def firmware_slot_log() -> bytearray:
    out = bytearray(FIRMWARE_SLOT_SIZE)
    out[0] = 1  # AFI: slot 1 active
    out[8:16] = FIRMWARE_REVISION.encode("ascii").ljust(8, b" ")
    return out


def changed_namespace_log(nsids: list[int]) -> bytearray:
    if len(nsids) > CHANGED_NS_MAX:
        out = bytearray(IDENTIFY_SIZE)
        out[0:4] = b"\xff\xff\xff\xff"
        return out
    return pack_nsid_list(nsids, 0)
