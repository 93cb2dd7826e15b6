"""Bad input on the wire: every malformed PDU gets the C2HTermReq the spec (and SPDK) asks for and
closes only its own connection; every bad command gets its error status on a connection that lives
on. Throughout, a well-behaved Kahu host keeps doing verified I/O and rejected writes leave the
backing file untouched (both checked by the rig on exit)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Awaitable, Callable

import pytest
from bad_wire import (
    BS,
    FUZZ_NSID,
    GOOD_HOSTNQN,
    NSID,
    NUM_BLOCKS,
    Rig,
    bad_input_rig,
    capsule,
    patch,
    rw_sqe,
    write_sqe,
)
from conftest import TEST_NQN, WIRE_HOSTNQN, run
from nvme_wire import (
    CC_ENABLE,
    OTHER_HOSTNQN,
    Completion,
    WireQueue,
    connect_data,
    connect_sqe,
    open_io_queue,
    prop_get_sqe,
    prop_set_sqe,
)

from appliance.nvmeof.pdu import (
    CH,
    R2T,
    C2HData,
    CapsuleResp,
    Cqe,
    Digests,
    H2CData,
    ICReq,
    ICResp,
    Sqe,
    TermReq,
    decode,
    encode_bytes,
)
from appliance.nvmeof.spec import AdminOpcode, Fes, IoOpcode, Property, Status, status_code

Allowed = tuple[tuple[int, int | None], ...]
FatalCase = Callable[[Rig], Awaitable[tuple[WireQueue, bytes, Allowed]]]


def header_field(fei: int) -> Allowed:
    return ((Fes.INVALID_HEADER_FIELD, fei),)


SEQUENCE: Allowed = ((Fes.PDU_SEQUENCE_ERROR, None),)
OUT_OF_RANGE: Allowed = ((Fes.DATA_OUT_OF_RANGE, None),)
HEADER_DIGEST: Allowed = ((Fes.HEADER_DIGEST_ERROR, None),)
# SPDK reports an unknown TTAG or a CCCID that does not match the R2T as a PDU Sequence Error
# (FEI then undefined) or an Invalid Header Field pointing at the TTAG/CCCID field.
BAD_TTAG: Allowed = ((Fes.INVALID_HEADER_FIELD, 10), (Fes.PDU_SEQUENCE_ERROR, None))
BAD_CCCID: Allowed = ((Fes.INVALID_HEADER_FIELD, 8), (Fes.PDU_SEQUENCE_ERROR, None))
# PLEN beyond what the target accepts: Data Transfer Limit Exceeded, or SPDK's PLEN header-field error.
TOO_LONG: Allowed = ((Fes.DATA_LIMIT_EXCEEDED, None), (Fes.INVALID_HEADER_FIELD, 4))


def icreq_field(fei: int) -> Allowed:
    """A bad ICReq parameter: SPDK says Invalid Header Field, the spec's 'Unsupported Parameter' fits too."""
    return ((Fes.INVALID_HEADER_FIELD, fei), (Fes.UNSUPPORTED_PARAMETER, fei))


def unsupported(fei: int) -> Allowed:
    return ((Fes.UNSUPPORTED_PARAMETER, fei),)


def bare_header(ptype: int, hlen: int = 24) -> bytes:
    """A header-only PDU of any type, zero-filled after the common header."""
    return CH.pack(ptype, 0, hlen, 0, hlen) + bytes(hlen - 8)


FATAL: dict[str, FatalCase] = {}


def fatal(name: str) -> Callable[[FatalCase], FatalCase]:
    def register(case: FatalCase) -> FatalCase:
        FATAL[name] = case
        return case

    return register


# ---------------------------------------------------------------------- connection setup


@fatal("capsule-before-icreq")
async def _capsule_before_icreq(rig: Rig):
    q = await rig.raw(icreq=False)
    return q, capsule(q.dg, Sqe(AdminOpcode.KEEP_ALIVE, cid=1)), SEQUENCE


@fatal("h2cdata-before-icreq")
async def _h2c_before_icreq(rig: Rig):
    q = await rig.raw(icreq=False)
    return q, encode_bytes(H2CData(1, 1, 0, bytes(BS))), SEQUENCE


@fatal("second-icreq")
async def _second_icreq(rig: Rig):
    q = await rig.raw()
    return q, encode_bytes(ICReq()), SEQUENCE


@fatal("second-icreq-after-connect")
async def _second_icreq_connected(rig: Rig):
    q = await rig.admin()
    return q, encode_bytes(ICReq()), SEQUENCE


@fatal("icreq-pfv-1")
async def _icreq_pfv(rig: Rig):
    return await rig.raw(icreq=False), encode_bytes(ICReq(pfv=1)), icreq_field(8)


@fatal("icreq-hpda-32")
async def _icreq_hpda(rig: Rig):
    return await rig.raw(icreq=False), encode_bytes(ICReq(hpda=32)), icreq_field(10)


@fatal("icreq-hlen-24")
async def _icreq_hlen(rig: Rig):
    return await rig.raw(icreq=False), patch(encode_bytes(ICReq()), 2, "B", 24), header_field(2)


@fatal("icreq-plen-132")
async def _icreq_plen(rig: Rig):
    return await rig.raw(icreq=False), patch(encode_bytes(ICReq()), 4, "I", 132) + bytes(4), header_field(4)


# ---------------------------------------------------------------------- PDU types and header fields


for _ptype in (0x08, 0x0A, 0x0F, 0xFF):

    @fatal(f"unknown-type-0x{_ptype:02x}")
    async def _unknown_type(rig: Rig, ptype: int = _ptype):
        return await rig.raw(), bare_header(ptype), header_field(0)


_C2H_PDUS = {
    "icresp": ICResp(),
    "c2htermreq": TermReq(Fes.PDU_SEQUENCE_ERROR),
    "capsuleresp": CapsuleResp(Cqe(1)),
    "c2hdata": C2HData(1, 0, bytes(BS)),
    "r2t": R2T(1, 1, 0, BS),
}
for _name, _pdu in _C2H_PDUS.items():

    @fatal(f"host-sends-{_name}")
    async def _c2h_from_host(rig: Rig, pdu=_pdu):
        return await rig.io(), encode_bytes(pdu), header_field(0)


@fatal("capsule-hlen-24")
async def _capsule_hlen(rig: Rig):
    q = await rig.io()
    return q, patch(capsule(q.dg, rw_sqe(IoOpcode.READ, 0, 1), sgl_len=BS), 2, "B", 24), header_field(2)


@fatal("h2cdata-hlen-72")
async def _h2c_hlen(rig: Rig):
    q = await rig.io()
    return q, patch(encode_bytes(H2CData(1, 1, 0, bytes(BS))), 2, "B", 72), header_field(2)


@fatal("h2ctermreq-hlen-8")
async def _termreq_hlen(rig: Rig):
    q = await rig.io()
    return q, patch(encode_bytes(TermReq(Fes.PDU_SEQUENCE_ERROR, from_host=True)), 2, "B", 8), header_field(2)


@fatal("capsule-plen-below-hlen")
async def _capsule_short_plen(rig: Rig):
    q = await rig.io()
    return q, patch(capsule(q.dg, rw_sqe(IoOpcode.READ, 0, 1), sgl_len=BS), 4, "I", 40), header_field(4)


@fatal("h2cdata-plen-below-hlen")
async def _h2c_short_plen(rig: Rig):
    q = await rig.io()
    return q, patch(encode_bytes(H2CData(1, 1, 0, bytes(BS))), 4, "I", 20), header_field(4)


@fatal("capsule-plen-2GiB")
async def _capsule_huge_plen(rig: Rig):
    q = await rig.io()  # only the header is sent: the target must not wait for 2 GiB
    return q, patch(capsule(q.dg, write_sqe(0, 1), sgl_len=BS), 4, "I", 0x7FFFFFFF), TOO_LONG


@fatal("h2cdata-plen-1MiB")
async def _h2c_huge_plen(rig: Rig):
    q = await rig.io()
    return q, patch(encode_bytes(H2CData(1, 1, 0, bytes(BS))), 4, "I", 1 << 20), TOO_LONG


@fatal("capsule-pdo-76")
async def _capsule_pdo_late(rig: Rig):
    q = await rig.io()
    return q, patch(capsule(q.dg, write_sqe(0, 1), bytes(BS)), 3, "B", 76), header_field(3)


@fatal("capsule-pdo-8")
async def _capsule_pdo_early(rig: Rig):
    q = await rig.io()
    return q, patch(capsule(q.dg, write_sqe(0, 1), bytes(BS)), 3, "B", 8), header_field(3)


@fatal("garbage-after-icreq")
async def _garbage(rig: Rig):
    return await rig.raw(), b"\xde\xad\xbe\xef" * 16, header_field(0)


# ---------------------------------------------------------------------- SGLs


@fatal("in-capsule-shorter-than-sgl")
async def _icd_short(rig: Rig):
    q = await rig.io()
    return q, capsule(q.dg, write_sqe(0, 2), bytes(BS), sgl_len=2 * BS), header_field(4)


@fatal("in-capsule-longer-than-sgl")
async def _icd_long(rig: Rig):
    q = await rig.io()
    return q, capsule(q.dg, write_sqe(0, 1), bytes(2 * BS), sgl_len=BS), header_field(4)


@fatal("in-capsule-offset-16")
async def _icd_offset(rig: Rig):
    q = await rig.io()
    return q, capsule(q.dg, write_sqe(0, 1), bytes(BS), sgl_addr=16), unsupported(32)


for _sgl_id in (0x00, 0x10, 0x20, 0x30, 0x40, 0x4F, 0x5F):

    @fatal(f"sgl-0x{_sgl_id:02x}")
    async def _bad_sgl(rig: Rig, sgl_id: int = _sgl_id):
        q = await rig.io()
        return q, capsule(q.dg, write_sqe(0, 1), sgl_len=BS, sgl_id=sgl_id), unsupported(40)


# ---------------------------------------------------------------------- digests


@fatal("bad-header-digest")
async def _bad_hdgst(rig: Rig):
    q = await rig.io(hdgst=True)
    blob = bytearray(capsule(q.dg, write_sqe(0, 1), bytes(BS)))
    blob[72] ^= 0xFF
    return q, bytes(blob), HEADER_DIGEST


@fatal("hdgstf-cleared")
async def _hdgstf_cleared(rig: Rig):
    q = await rig.io(hdgst=True)
    return q, patch(capsule(q.dg, rw_sqe(IoOpcode.READ, 0, 1), sgl_len=BS), 1, "B", 0), header_field(1)


@fatal("hdgstf-not-negotiated")
async def _hdgstf_unasked(rig: Rig):
    q = await rig.io()
    blob = capsule(q.dg, rw_sqe(IoOpcode.READ, 0, 1), sgl_len=BS)
    blob = patch(patch(blob, 1, "B", 1), 4, "I", 76) + bytes(4)
    return q, blob, header_field(1)


@fatal("ddgstf-cleared")
async def _ddgstf_cleared(rig: Rig):
    q = await rig.io(ddgst=True)
    return q, patch(capsule(q.dg, write_sqe(0, 1), bytes(BS)), 1, "B", 0), header_field(1)


# ---------------------------------------------------------------------- H2CData against an R2T

WRITE_LBA, WRITE_NLB, WRITE_CID = 600, 8, 0x42


async def start_r2t_write(q: WireQueue) -> R2T:
    """Send an R2T write of WRITE_NLB blocks at WRITE_LBA and return the target's R2T."""
    await q.send_raw(capsule(q.dg, write_sqe(WRITE_LBA, WRITE_NLB, WRITE_CID), sgl_len=WRITE_NLB * BS))
    async with asyncio.timeout(5):
        r2t = await q.recv()
    assert isinstance(r2t, R2T), r2t
    assert (r2t.cccid, r2t.r2to, r2t.r2tl) == (WRITE_CID, 0, WRITE_NLB * BS) and r2t.ttag != 0
    return r2t


async def pending_write(rig: Rig, **kw) -> tuple[WireQueue, R2T]:
    """An I/O queue with one R2T write outstanding."""
    q = await rig.io(**kw)
    return q, await start_r2t_write(q)


WRITE_DATA = bytes(range(256)) * (WRITE_NLB * BS // 256)


@fatal("h2cdata-bad-ttag")
async def _h2c_ttag(rig: Rig):
    q, r2t = await pending_write(rig)
    return q, encode_bytes(H2CData(WRITE_CID, r2t.ttag + 1, 0, WRITE_DATA)), BAD_TTAG


@fatal("h2cdata-wrong-cccid")
async def _h2c_cccid(rig: Rig):
    q, r2t = await pending_write(rig)
    return q, encode_bytes(H2CData(WRITE_CID + 1, r2t.ttag, 0, WRITE_DATA)), BAD_CCCID


@fatal("h2cdata-out-of-order")
async def _h2c_order(rig: Rig):
    q, r2t = await pending_write(rig)
    return (
        q,
        encode_bytes(H2CData(WRITE_CID, r2t.ttag, BS, WRITE_DATA[BS : 2 * BS], last=False)),
        OUT_OF_RANGE,
    )


@fatal("h2cdata-beyond-r2t")
async def _h2c_beyond(rig: Rig):
    q, r2t = await pending_write(rig)
    return q, encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA + bytes(BS))), OUT_OF_RANGE


@fatal("h2cdata-second-beyond-r2t")
async def _h2c_beyond_second(rig: Rig):
    q, r2t = await pending_write(rig)
    half = len(WRITE_DATA) // 2
    await q.send_raw(encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA[:half], last=False)))
    return q, encode_bytes(H2CData(WRITE_CID, r2t.ttag, half, WRITE_DATA)), OUT_OF_RANGE


@fatal("h2cdata-datal-not-plen")
async def _h2c_datal(rig: Rig):
    q, r2t = await pending_write(rig)
    blob = patch(encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA)), 16, "I", BS)
    return q, blob, (*header_field(16), *header_field(4))


@fatal("h2cdata-without-r2t")
async def _h2c_no_r2t(rig: Rig):
    return await rig.io(), encode_bytes(H2CData(WRITE_CID, 1, 0, WRITE_DATA)), BAD_TTAG


@fatal("h2cdata-bad-header-digest")
async def _h2c_hdgst(rig: Rig):
    q, r2t = await pending_write(rig, hdgst=True)
    blob = bytearray(encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA), q.dg))
    blob[24] ^= 0x01
    return q, bytes(blob), HEADER_DIGEST


@fatal("h2cdata-pdo-28")
async def _h2c_pdo(rig: Rig):
    q, r2t = await pending_write(rig)
    return q, patch(encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA)), 3, "B", 28), header_field(3)


@pytest.mark.parametrize("name", sorted(FATAL))
def test_fatal_pdu_gets_termination_and_only_its_connection_closes(soft_target, tmp_path, name: str) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            queue, offending, allowed = await FATAL[name](rig)
            await queue.send_raw(offending)
            await rig.expect_term(queue, offending, allowed)
            await rig.check()

    run(scenario())


# ---------------------------------------------------------------------- errors that keep the queue


async def read_back(q: WireQueue, rig: Rig, lba: int, nlb: int = 1) -> None:
    """The queue still works: a read returns what the backing file is supposed to hold."""
    done = await q.read(NSID, lba, nlb, BS)
    assert done.status == Status.SUCCESS and done.data == rig.expected[lba * BS : (lba + nlb) * BS]


def test_bad_data_digest_fails_only_the_command(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.io(hdgst=True, ddgst=True)
            blob = bytearray(capsule(q.dg, write_sqe(700, 2, cid=7), bytes(2 * BS)))
            blob[-1] ^= 0x80
            await q.send_raw(bytes(blob))
            assert (await q.wait(7)).status == Status.DATA_TRANSFER_ERROR
            await read_back(q, rig, 700, 2)

            r2t = await start_r2t_write(q)
            half = len(WRITE_DATA) // 2
            first = encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA[:half], last=False), q.dg)
            second = bytearray(encode_bytes(H2CData(WRITE_CID, r2t.ttag, half, WRITE_DATA[half:]), q.dg))
            second[-2] ^= 0x01
            await q.send_raw(first + bytes(second))
            assert (await q.wait(WRITE_CID)).status == Status.DATA_TRANSFER_ERROR
            await read_back(q, rig, WRITE_LBA, WRITE_NLB)
            await rig.check()

    run(scenario())


async def expect_status(done: Completion, status: int, dw0: int | None = None) -> None:
    assert done.status == status, f"status 0x{done.status:03x}, expected 0x{status:03x}"
    if dw0 is not None:
        assert done.cqe.dw0 == dw0, f"DW0 0x{done.cqe.dw0:x}, expected 0x{dw0:x}"


def test_commands_before_connect_are_sequence_errors(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.raw()
            await expect_status(await q.prop_get(Property.CAP, size8=True), Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await q.prop_set(Property.CC, 1), Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await q.identify(1), Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await q.admin(AdminOpcode.KEEP_ALIVE), Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await q.read(NSID, 0, 1, BS), Status.COMMAND_SEQUENCE_ERROR)
            write = await q.write(NSID, 0, bytes(BS), BS)  # in-capsule: must not reach the namespace
            await expect_status(write, Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await q.connect(TEST_NQN), Status.SUCCESS)  # the queue lived on
            await q.enable()
            await expect_status(await q.identify(1), Status.SUCCESS)
            await rig.check()

    run(scenario())


def iattr_ipo(attr: int, offset: int) -> int:
    return offset | attr << 16


async def connect_raw(q: WireQueue, *, subnqn: str = TEST_NQN, **kw) -> Completion:
    """A Connect to TEST_NQN (as WIRE_HOSTNQN) unless ``kw`` say otherwise; status not checked."""
    return await q.connect(subnqn, **kw)


# (connect arguments, status, DW0); "CNTLID" in the arguments means the rig controller's CNTLID
ADMIN_CONNECTS = {
    "recfmt-1": (dict(recfmt=1), Status.CONNECT_INCOMPATIBLE_FORMAT, None),
    "sqsize-0": (dict(sqsize=0), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(0, 44)),
    "sqsize-above-max-aq-depth": (dict(sqsize=128), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(0, 44)),
    "unknown-subnqn": (dict(subnqn="nqn.2026-11.io.kahu:nope"), Status.CONNECT_INVALID_PARAMETERS,
                       iattr_ipo(1, 256)),
    "host-not-allowed": (dict(hostnqn=OTHER_HOSTNQN), Status.CONNECT_INVALID_HOST, None),
    "static-cntlid-on-admin": (dict(cntlid=5), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(1, 16)),
    "connect-data-512-bytes": (dict(data=connect_data(TEST_NQN, WIRE_HOSTNQN)[:512]), Status.INVALID_FIELD,
                               None),
    "subnqn-not-terminated": (dict(data=connect_data("nqn." + "x" * 252, WIRE_HOSTNQN)),
                              Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(1, 256)),
    "io-unknown-cntlid": (dict(qid=1, cntlid=0x1234), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(1, 16)),
}  # fmt: skip
IO_CONNECTS = {
    "io-qid-beyond-queues": (dict(qid=0xFFFF), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(0, 42)),
    "io-sqsize-0": (dict(qid=1, sqsize=0), Status.CONNECT_INVALID_PARAMETERS, iattr_ipo(0, 44)),
    "io-other-hostnqn": (dict(qid=1, hostnqn=GOOD_HOSTNQN), Status.CONNECT_INVALID_PARAMETERS,
                         iattr_ipo(1, 512)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ADMIN_CONNECTS))
def test_bad_admin_connect_is_rejected_and_queue_lives(soft_target, tmp_path, name: str) -> None:
    args, status, dw0 = ADMIN_CONNECTS[name]

    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.raw()
            await expect_status(await connect_raw(q, **args), status, dw0)
            await rig.wait_controllers(1)  # no controller was created for the rejected Connect
            await expect_status(await connect_raw(q), Status.SUCCESS)
            await rig.check()

    run(scenario())


@pytest.mark.parametrize("name", sorted(IO_CONNECTS))
def test_bad_io_connect_is_rejected_and_queue_lives(soft_target, tmp_path, name: str) -> None:
    args, status, dw0 = IO_CONNECTS[name]

    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            admin = await rig.admin()
            q = await rig.raw()
            await expect_status(await connect_raw(q, cntlid=admin.cntlid, **args), status, dw0)
            await expect_status(await connect_raw(q, qid=1, cntlid=admin.cntlid), Status.SUCCESS)
            await read_back(q, rig, 0)
            await rig.check()

    run(scenario())


def test_io_connect_state_errors(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            admin = await rig.raw()
            done = await connect_raw(admin)
            await expect_status(done, Status.SUCCESS)
            cntlid = done.cqe.dw0 & 0xFFFF
            q = await rig.raw()  # the controller is not enabled yet
            await expect_status(await connect_raw(q, qid=1, cntlid=cntlid), Status.CONNECT_INVALID_PARAMETERS,
                                iattr_ipo(0, 42))  # fmt: skip
            await admin.enable()
            await expect_status(await connect_raw(admin), Status.COMMAND_SEQUENCE_ERROR)  # already connected
            await expect_status(await connect_raw(q, qid=1, cntlid=cntlid), Status.SUCCESS)
            again = await rig.raw()
            await expect_status(await connect_raw(again, qid=1, cntlid=cntlid), Status.COMMAND_SEQUENCE_ERROR)
            await expect_status(await connect_raw(q, qid=2, cntlid=cntlid), Status.COMMAND_SEQUENCE_ERROR)
            await read_back(q, rig, 0)
            await rig.check()

    run(scenario())


def io_cmd(opcode: int, nsid: int = NSID, slba: int = 0, nlb: int = 1) -> Sqe:
    return rw_sqe(opcode, slba, nlb, nsid=nsid, cid=0)


TOP = NUM_BLOCKS - 1
# (command, data written, bytes read, in-capsule, expected status)
IO_ERRORS = {
    "read-past-end": (io_cmd(IoOpcode.READ, slba=TOP, nlb=2), b"", 2 * BS, True, Status.LBA_OUT_OF_RANGE),
    "read-lba-2^40": (io_cmd(IoOpcode.READ, slba=1 << 40), b"", BS, True, Status.LBA_OUT_OF_RANGE),
    "write-past-end-in-capsule": (io_cmd(IoOpcode.WRITE, slba=TOP - 1, nlb=4), bytes(4 * BS), 0, True,
                                  Status.LBA_OUT_OF_RANGE),
    "write-past-end-r2t": (io_cmd(IoOpcode.WRITE, slba=TOP - 3, nlb=8), bytes(8 * BS), 0, False,
                           Status.LBA_OUT_OF_RANGE),
    "write-lba-wraps-64-bit": (io_cmd(IoOpcode.WRITE, slba=(1 << 64) - 1, nlb=2), bytes(2 * BS), 0, True,
                               Status.LBA_OUT_OF_RANGE),
    "read-sgl-not-nlb": (io_cmd(IoOpcode.READ, nlb=2), b"", BS, True, Status.DATA_SGL_LENGTH_INVALID),
    "write-in-capsule-sgl-not-nlb": (io_cmd(IoOpcode.WRITE, slba=700), bytes(2 * BS), 0, True,
                                     Status.DATA_SGL_LENGTH_INVALID),
    "write-r2t-sgl-not-nlb": (io_cmd(IoOpcode.WRITE, slba=700, nlb=4), bytes(8 * BS), 0, False,
                              Status.DATA_SGL_LENGTH_INVALID),
    "write-in-capsule-above-icd": (io_cmd(IoOpcode.WRITE, slba=700, nlb=16), bytes(16 * BS), 0, True,
                                   Status.DATA_SGL_LENGTH_INVALID),
    "read-above-mdts": (io_cmd(IoOpcode.READ, nlb=257), b"", 257 * BS, True, Status.INVALID_FIELD),
    "write-above-mdts": (io_cmd(IoOpcode.WRITE, slba=600, nlb=257), bytes(257 * BS), 0, False,
                         Status.INVALID_FIELD),
    "opcode-0x03-no-data": (io_cmd(0x03), b"", 0, True, Status.INVALID_OPCODE),
    "opcode-0x0c": (io_cmd(0x0C), b"", 0, True, Status.INVALID_OPCODE),
    "opcode-0x7e-read": (io_cmd(0x7E), b"", BS, True, Status.INVALID_OPCODE),
    "opcode-0x80": (io_cmd(0x80), b"", 0, True, Status.INVALID_OPCODE),
    "opcode-0x81-write": (io_cmd(0x81), bytes(BS), 0, True, Status.INVALID_OPCODE),
    "opcode-0x7d-write-r2t": (io_cmd(0x7D), bytes(BS), 0, False, Status.INVALID_OPCODE),
    "read-nsid-0": (io_cmd(IoOpcode.READ, nsid=0), b"", BS, True, Status.INVALID_NAMESPACE),
    "read-nsid-9": (io_cmd(IoOpcode.READ, nsid=9), b"", BS, True, Status.INVALID_NAMESPACE),
    "read-nsid-broadcast": (io_cmd(IoOpcode.READ, nsid=0xFFFFFFFF), b"", BS, True, Status.INVALID_NAMESPACE),
    "write-nsid-9": (io_cmd(IoOpcode.WRITE, nsid=9), bytes(BS), 0, True, Status.INVALID_NAMESPACE),
    "flush-nsid-9": (io_cmd(IoOpcode.FLUSH, nsid=9), b"", 0, True, Status.INVALID_NAMESPACE),
}  # fmt: skip


def test_bad_io_commands_get_their_status_and_write_nothing(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.io()
            for name, (sqe, data, read_len, in_capsule, status) in IO_ERRORS.items():
                sqe.cid = 0
                done = await q.command(sqe, data, read_len, in_capsule)
                assert done.status == status, f"{name}: status 0x{done.status:03x}, expected 0x{status:03x}"
                assert not done.data, f"{name}: data returned for a failed command"
            await read_back(q, rig, TOP - 7, 8)
            await read_back(q, rig, 600, 8)
            await rig.check()

    run(scenario())


def test_unknown_admin_opcodes_and_fabrics_types(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.admin()
            for opcode in (0x03, 0x07, 0x0B, 0x7C, 0x80, 0xC0, 0xFF):
                await expect_status(await q.admin(opcode), Status.INVALID_OPCODE)
            sqe = Sqe(AdminOpcode.FABRICS, nsid=0x7C, flags=0)  # no such FCTYPE
            await expect_status(await q.command(sqe), Status.INVALID_OPCODE)
            await expect_status(await q.identify(1), Status.SUCCESS)
            await rig.check()

    run(scenario())


def test_bidirectional_opcodes_with_data_are_invalid_opcode(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            admin = await rig.admin()
            await expect_status(await admin.admin(0x03, read_len=4096), Status.INVALID_OPCODE)
            q = await WireQueue.open(rig.port)
            rig.track(q)
            await expect_status(await connect_raw(q, qid=1, cntlid=admin.cntlid), Status.SUCCESS)
            done = await q.command(io_cmd(0x07, slba=700), bytes(BS))  # in-capsule
            await expect_status(done, Status.INVALID_OPCODE)
            await read_back(q, rig, 700)
            await rig.check()

    run(scenario())


def test_writes_beyond_the_queue_depth_get_no_buffers(soft_target, tmp_path) -> None:
    """A host that ignores SQ flow control cannot make the target hold unbounded R2T buffers."""

    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            admin = await rig.admin()
            q = rig.track(await open_io_queue(rig.port, TEST_NQN, admin.cntlid, sqsize=3))
            for cid in range(4):  # SQSIZE 3 allows four commands in flight
                await q.send_raw(capsule(q.dg, write_sqe(WRITE_LBA, WRITE_NLB, cid), sgl_len=WRITE_NLB * BS))
                async with asyncio.timeout(5):
                    assert isinstance(await q.recv(), R2T)
            fifth = capsule(q.dg, write_sqe(WRITE_LBA, WRITE_NLB, 4), sgl_len=WRITE_NLB * BS)
            await q.send_raw(fifth)
            await rig.expect_term(q, fifth, ((Fes.DATA_LIMIT_EXCEEDED, None),))
            await rig.check()

    run(scenario())


def test_no_r2t_before_connect(soft_target, tmp_path) -> None:
    """An unconnected peer gets Command Sequence Error, not a buffer waiting for its data."""

    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.raw()
            sqe = Sqe(0x01, cid=9)  # an admin opcode that moves data to the controller
            await q.send_raw(capsule(q.dg, sqe, sgl_len=1 << 17))
            async with asyncio.timeout(5):
                done = await q.recv()
            assert not isinstance(done, R2T), "the target offered a buffer before Connect"
            assert status_code(done.cqe.status) == Status.COMMAND_SEQUENCE_ERROR
            await rig.check()

    run(scenario())


# ---------------------------------------------------------------------- peers that vanish


async def _half_icreq(rig: Rig) -> None:
    q = await rig.raw(icreq=False)
    await q.send_raw(encode_bytes(ICReq())[:64])


async def _common_header_only(rig: Rig) -> None:
    q = await rig.admin()
    await q.send_raw(capsule(q.dg, Sqe(AdminOpcode.KEEP_ALIVE, cid=1))[:5])


async def _capsule_missing_data(rig: Rig) -> None:
    q = await rig.io()
    await q.send_raw(capsule(q.dg, write_sqe(700, 8), bytes(8 * BS))[: 72 + 1000])


async def _r2t_without_data(rig: Rig) -> None:
    await pending_write(rig)


async def _mid_h2cdata(rig: Rig) -> None:
    q, r2t = await pending_write(rig)
    half = len(WRITE_DATA) // 2
    await q.send_raw(encode_bytes(H2CData(WRITE_CID, r2t.ttag, 0, WRITE_DATA[:half], last=False)))
    await q.send_raw(encode_bytes(H2CData(WRITE_CID, r2t.ttag, half, WRITE_DATA[half:]))[:100])


VANISH = {
    "half-icreq": _half_icreq,
    "common-header-only": _common_header_only,
    "capsule-missing-data": _capsule_missing_data,
    "after-r2t": _r2t_without_data,
    "mid-h2cdata": _mid_h2cdata,
}


@pytest.mark.parametrize("abort", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("name", sorted(VANISH))
def test_peer_vanishing_mid_pdu_is_cleaned_up(soft_target, tmp_path, name: str, abort: bool) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            await VANISH[name](rig)
            for q in rig._queues:
                if abort:
                    q.writer.transport.abort()
                else:
                    q.writer.close()
            await rig.wait_controllers(1)  # only the good host's controller is left
            await rig.check()
            q = await rig.io()  # and the target still takes new hosts
            await read_back(q, rig, WRITE_LBA, WRITE_NLB)

    run(scenario())


def test_host_termreq_closes_the_connection_silently(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.io()
            await q.send_raw(encode_bytes(TermReq(Fes.HEADER_DIGEST_ERROR, from_host=True)))
            async with asyncio.timeout(5):
                assert await q.reader.read() == b"", "the target answered an H2CTermReq"
            await rig.wait_controllers(2)  # the I/O queue went; its controller's admin queue stays
            await rig.check()

    run(scenario())


def test_termination_header_copy_is_capped_at_128_bytes(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            q = await rig.raw(icreq=False)
            offending = patch(encode_bytes(ICReq()), 2, "B", 200) + bytes(100)  # HLEN 200 > 128
            await q.send_raw(offending)
            await rig.expect_term(q, offending, header_field(2))
            await rig.check()

    run(scenario())


# ---------------------------------------------------------------------- fuzzing

FUZZ_SEED = 20261107
FUZZ_ROUNDS = 200
GARBAGE_ROUNDS = 100


def admin_session() -> list[bytes]:
    """A valid admin-queue session, PDU by PDU (no digests)."""
    dg = Digests()
    return [
        encode_bytes(ICReq()),
        capsule(dg, connect_sqe(cid=1), connect_data(TEST_NQN, WIRE_HOSTNQN)),
        capsule(dg, prop_set_sqe(Property.CC, CC_ENABLE, cid=2)),
        capsule(dg, prop_get_sqe(Property.CSTS, cid=3)),
        capsule(dg, Sqe(AdminOpcode.IDENTIFY, cid=4, cdw10=1), sgl_len=4096),
        capsule(dg, Sqe(AdminOpcode.GET_FEATURES, cid=5, cdw10=0x07)),
        capsule(dg, Sqe(AdminOpcode.KEEP_ALIVE, cid=6)),
    ]


def io_session(cntlid: int) -> list[bytes]:
    """A valid I/O-queue session on FUZZ_NSID: in-capsule write, read, R2T write with its H2CData."""
    dg = Digests()
    data = bytes(range(256)) * 8
    return [
        encode_bytes(ICReq()),
        capsule(dg, connect_sqe(cid=1, qid=1), connect_data(TEST_NQN, WIRE_HOSTNQN, cntlid)),
        capsule(dg, rw_sqe(IoOpcode.WRITE, 10, 4, cid=2, nsid=FUZZ_NSID), data),
        capsule(dg, rw_sqe(IoOpcode.READ, 10, 4, cid=3, nsid=FUZZ_NSID), sgl_len=len(data)),
        capsule(dg, rw_sqe(IoOpcode.WRITE, 20, 4, cid=4, nsid=FUZZ_NSID), sgl_len=len(data)),
        encode_bytes(H2CData(4, 1, 0, data)),  # the target's first TTAG on a connection is 1
        capsule(dg, rw_sqe(IoOpcode.FLUSH, 0, 1, cid=5, nsid=FUZZ_NSID)),
    ]


def mutate(pdus: list[bytes], rng: random.Random) -> bytes:
    """One random mutation of one PDU of a valid session, everything after it kept."""
    pdus = list(pdus)
    i = rng.randrange(len(pdus))
    pdu = bytearray(pdus[i])
    kind = rng.randrange(6)
    if kind == 0:  # a random byte, mostly in the header
        pos = rng.randrange(min(len(pdu), 72) if rng.random() < 0.8 else len(pdu))
        pdu[pos] = rng.randrange(256)
    elif kind == 1:  # a bit flip anywhere
        pos = rng.randrange(len(pdu))
        pdu[pos] ^= 1 << rng.randrange(8)
    elif kind == 2:  # a common-header field set to a random or boundary value
        field = rng.choice([(0, "B"), (1, "B"), (2, "B"), (3, "B"), (4, "I")])
        limit = 0xFF if field[1] == "B" else 0xFFFFFFFF
        struct.pack_into(
            "<" + field[1], pdu, field[0], rng.choice([0, 1, 8, 24, 72, 128, limit, rng.randrange(limit)])
        )
    elif kind == 3:  # truncated
        del pdu[rng.randrange(len(pdu)) :]
    elif kind == 4:  # duplicated
        pdus.insert(i, bytes(pdu))
    else:  # garbage inserted before it
        pdus.insert(i, rng.randbytes(rng.randrange(1, 64)))
    pdus[i if kind < 4 else i + 1] = bytes(pdu)
    return b"".join(pdus)


async def exchange(port: int, blob: bytes) -> bytes:
    """Send ``blob``, half-close, and return everything the target sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(blob)
        writer.write_eof()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def check_stream(stream: bytes) -> list[object]:
    """Every PDU the target sent is well formed; a C2HTermReq, if any, comes last."""
    pdus: list[object] = []
    dg = Digests()
    pos = 0
    while pos < len(stream):
        assert len(stream) - pos >= 8, f"trailing partial common header {stream[pos:].hex()}"
        plen = CH.unpack_from(stream, pos)[4]
        assert pos + plen <= len(stream), "the target sent a partial PDU before closing"
        pdu = decode(stream[pos : pos + plen], dg, from_host=False)
        if isinstance(pdu, ICResp):
            assert not pdus, "ICResp must be the first PDU"
            dg = Digests(pdu.hdgst, pdu.ddgst)
        if isinstance(pdu, TermReq):
            assert stream[pos + 2] == 24 and plen <= 152 and pos + plen == len(stream), "bad or early TermReq"
        pdus.append(pdu)
        pos += plen
    return pdus


def test_fuzzed_sessions_leave_the_target_serving(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            admin = await rig.admin()
            templates = [admin_session(), io_session(admin.cntlid)]
            for template in templates:  # the unmutated sessions are valid: every command succeeds
                pdus = check_stream(await exchange(rig.port, b"".join(template)))
                resps = [p for p in pdus if isinstance(p, CapsuleResp)]
                assert isinstance(pdus[0], ICResp) and resps and all(r.cqe.status == 0 for r in resps)
            rng = random.Random(FUZZ_SEED)
            for n in range(FUZZ_ROUNDS):
                check_stream(await exchange(rig.port, mutate(templates[n % 2], rng)))
                if n % 50 == 49:
                    await rig.good.checkpoint()
            await rig.wait_controllers(2)  # the good host's and ours: no fuzzed controller leaked
            await read_back(await rig.io(), rig, 0, 8)
            await rig.check()

    run(scenario(), timeout=120)


def test_random_garbage_leaves_the_target_serving(soft_target, tmp_path) -> None:
    async def scenario() -> None:
        async with bad_input_rig(soft_target, tmp_path) as rig:
            rng = random.Random(FUZZ_SEED + 1)
            icreq = encode_bytes(ICReq())
            terms = 0
            for n in range(GARBAGE_ROUNDS):
                garbage = rng.randbytes(rng.randrange(1, 400))
                pdus = check_stream(await exchange(rig.port, (icreq if n % 2 else b"") + garbage))
                terms += any(isinstance(p, TermReq) for p in pdus)
            assert terms > GARBAGE_ROUNDS // 2, "most garbage should be answered with a termination request"
            await rig.wait_controllers(1)
            await read_back(await rig.io(), rig, 0, 8)
            await rig.check()

    run(scenario(), timeout=120)
