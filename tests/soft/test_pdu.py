"""The PDU codec: every PDU type round-trips, digests are checked, malformed headers are named."""

import struct
import uuid

import pytest

from appliance.nvmeof import pdu
from appliance.nvmeof.identify import (
    DiscoveryEntry,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NamespaceIds,
    pack_discovery_log,
    pack_nsid_list,
    unpack_discovery_header,
    unpack_nsid_list,
)
from appliance.nvmeof.spec import Fes, PduType, Status, status_code, status_field

NO_DIGESTS = pdu.Digests()
BOTH_DIGESTS = pdu.Digests(header=True, data=True)


def test_crc32c_check_value_and_wire_order():
    assert pdu.digest(b"123456789") == (0xE3069283).to_bytes(4, "little")


SAMPLES = [
    pdu.ICReq(hpda=0, hdgst=True, ddgst=False, maxr2t=0),
    pdu.ICResp(cpda=0, hdgst=True, ddgst=True, maxh2cdata=131072),
    pdu.TermReq(fes=Fes.PDU_SEQUENCE_ERROR, fei=0, header=b"\x04" + bytes(71), from_host=False),
    pdu.TermReq(fes=Fes.HEADER_DIGEST_ERROR, fei=0, header=b"", from_host=True),
    pdu.CapsuleCmd(pdu.Sqe(opcode=0x02, cid=7, nsid=1, sgl_len=4096, sgl_id=0x5A, cdw10=12, cdw12=7)),
    pdu.CapsuleCmd(pdu.Sqe(opcode=0x01, cid=9, nsid=1, sgl_len=512, sgl_id=0x01), data=bytes(range(256)) * 2),
    pdu.CapsuleResp(pdu.Cqe(cid=7, status=status_field(Status.LBA_OUT_OF_RANGE), dw0=5, sqhd=3, sqid=1)),
    pdu.H2CData(cccid=3, ttag=1, datao=4096, data=b"\xaa" * 4096, last=True),
    pdu.C2HData(cccid=3, datao=0, data=b"\x55" * 1000, last=True, success=True),
    pdu.R2T(cccid=3, ttag=2, r2to=0, r2tl=131072),
]


def _same(a, b) -> bool:
    """Dataclass equality with memoryview payloads compared by content."""
    for name in a.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, memoryview | bytes | bytearray):
            x, y = bytes(x), bytes(y)
        if x != y:
            return False
    return True


@pytest.mark.parametrize("dg", [NO_DIGESTS, BOTH_DIGESTS], ids=["plain", "digests"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(sample, dg):
    wire = pdu.encode_bytes(sample, dg)
    _, _, hlen, _, plen = pdu.CH.unpack_from(wire)
    assert plen == len(wire)
    assert hlen in (24, 72, 128)
    assert _same(pdu.decode(wire, dg), sample)


def test_header_and_data_digest_layout():
    cmd = pdu.CapsuleCmd(pdu.Sqe(opcode=0x01, cid=1, nsid=1, sgl_len=8, sgl_id=0x01), data=b"12345678")
    wire = pdu.encode_bytes(cmd, BOTH_DIGESTS)
    _, flags, hlen, pdo, plen = pdu.CH.unpack_from(wire)
    assert flags == 0x03 and hlen == 72 and pdo == 76 and plen == 72 + 4 + 8 + 4
    assert wire[72:76] == pdu.digest(wire[:72])
    assert wire[-4:] == pdu.digest(b"12345678")


def test_header_digest_mismatch_is_fes_3():
    wire = bytearray(pdu.encode_bytes(SAMPLES[4], BOTH_DIGESTS))
    wire[10] ^= 0xFF
    with pytest.raises(pdu.PduError) as err:
        pdu.decode(wire, BOTH_DIGESTS)
    assert err.value.fes == Fes.HEADER_DIGEST_ERROR


def test_data_digest_mismatch_is_not_fatal():
    wire = bytearray(pdu.encode_bytes(SAMPLES[7], BOTH_DIGESTS))
    wire[40] ^= 0x01
    with pytest.raises(pdu.DataDigestError):
        pdu.decode(wire, BOTH_DIGESTS)


@pytest.mark.parametrize(
    ("mutate", "fes", "fei"),
    [
        (lambda w: w.__setitem__(2, 71), Fes.INVALID_HEADER_FIELD, 2),  # wrong HLEN
        (lambda w: w.__setitem__(0, 0x08), Fes.INVALID_HEADER_FIELD, 0),  # unused type
        (lambda w: w.__setitem__(0, 0x05), Fes.INVALID_HEADER_FIELD, 0),  # C2H type from a host
        (lambda w: struct.pack_into("<I", w, 4, 40), Fes.INVALID_HEADER_FIELD, 4),  # PLEN < HLEN
        (lambda w: w.__setitem__(3, 80), Fes.INVALID_HEADER_FIELD, 3),  # PDO off
        (lambda w: w.__setitem__(1, 0x01), Fes.INVALID_HEADER_FIELD, 1),  # HDGSTF not negotiated
    ],
    ids=["hlen", "type", "direction", "plen", "pdo", "hdgstf"],
)
def test_check_header_names_the_bad_field(mutate, fes, fei):
    wire = bytearray(pdu.encode_bytes(SAMPLES[5], NO_DIGESTS))
    mutate(wire)
    with pytest.raises(pdu.PduError) as err:
        pdu.check_header(memoryview(wire), NO_DIGESTS, received_from_host=True, max_plen=1 << 20)
    assert (err.value.fes, err.value.fei) == (fes, fei)


def test_oversized_plen_is_a_limit_error():
    wire = bytearray(pdu.encode_bytes(SAMPLES[5], NO_DIGESTS))
    with pytest.raises(pdu.PduError) as err:
        pdu.check_header(memoryview(wire), NO_DIGESTS, received_from_host=True, max_plen=256)
    assert err.value.fes == Fes.DATA_LIMIT_EXCEEDED


def test_term_req_copies_at_most_128_header_bytes():
    wire = pdu.encode_bytes(pdu.TermReq(fes=1, fei=2, header=bytes(500)))
    assert len(wire) == 24 + 128
    assert wire[0] == PduType.C2H_TERM_REQ


def test_status_word_round_trip():
    word = status_field(Status.COMPARE_FAILURE)
    assert word & 0x8000  # DNR
    assert status_code(word) == Status.COMPARE_FAILURE
    assert status_field(Status.SUCCESS) == 0


def test_identify_controller_fields_at_spec_offsets():
    ctrl = IdentifyController(cntlid=0x1234, subnqn="nqn.2026-11.io.kahu:x", sn="SN", mn="M", kas=100)
    raw = ctrl.pack()
    assert raw[78:80] == (0x1234).to_bytes(2, "little")
    assert raw[4:24] == b"SN".ljust(20)
    assert raw[320:322] == (100).to_bytes(2, "little")
    assert raw[768:789] == b"nqn.2026-11.io.kahu:x"
    assert raw[536:540] == (0x00100001).to_bytes(4, "little")
    assert IdentifyController.unpack(raw) == ctrl


def test_identify_namespace_block_size_and_ids():
    ns = IdentifyNamespace(nsze=8, ncap=8, nuse=8, nguid=b"g" * 16, eui64=b"e" * 8,
                           lbaf=[LbaFormat(9), LbaFormat(12)], flbas=1)  # fmt: skip
    parsed = IdentifyNamespace.unpack(ns.pack())
    assert parsed.block_size == 4096 and parsed.nlbaf == 1 and parsed.nguid == b"g" * 16


def test_namespace_id_descriptors_and_nsid_list():
    ids = NamespaceIds(eui64=b"e" * 8, nguid=b"n" * 16, uuid=uuid.uuid4(), csi=0)
    assert NamespaceIds.unpack(ids.pack()) == ids
    assert unpack_nsid_list(pack_nsid_list([5, 1, 3], after=1)) == [3, 5]


def test_discovery_log_entries():
    entry = DiscoveryEntry("nqn.2026-11.io.kahu:a", "127.0.0.1", "4420", portid=1)
    log = pack_discovery_log(7, [entry])
    assert unpack_discovery_header(log) == (7, 1)
    raw = log[1024:2048]
    assert raw[0] == 3 and raw[32:36] == b"4420" and raw[512:521] == b"127.0.0.1"
    assert DiscoveryEntry.unpack(raw) == entry
