"""Numbers from the NVMe base, NVMe-oF and NVMe/TCP specifications.

Kept in one place so the target, the host and the tests speak with one vocabulary.
"""

from __future__ import annotations

import enum

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
NVME_PORT = 4420
DISCOVERY_PORT = 8009
NQN_MAX = 223


class PduType(enum.IntEnum):
    IC_REQ = 0x00
    IC_RESP = 0x01
    H2C_TERM_REQ = 0x02
    C2H_TERM_REQ = 0x03
    CAPSULE_CMD = 0x04
    CAPSULE_RESP = 0x05
    H2C_DATA = 0x06
    C2H_DATA = 0x07
    R2T = 0x09


# HLEN of each PDU type, without the header digest.
HLEN = {
    PduType.IC_REQ: 128,
    PduType.IC_RESP: 128,
    PduType.H2C_TERM_REQ: 24,
    PduType.C2H_TERM_REQ: 24,
    PduType.CAPSULE_CMD: 72,
    PduType.CAPSULE_RESP: 24,
    PduType.H2C_DATA: 24,
    PduType.C2H_DATA: 24,
    PduType.R2T: 24,
}

# PDU types that carry a header digest when one was negotiated.
HDGST_TYPES = frozenset(
    {PduType.CAPSULE_CMD, PduType.CAPSULE_RESP, PduType.H2C_DATA, PduType.C2H_DATA, PduType.R2T}
)


class PduFlag(enum.IntFlag):
    HDGSTF = 0x01
    DDGSTF = 0x02
    LAST_PDU = 0x04
    SUCCESS = 0x08


class Fes(enum.IntEnum):
    """Fatal error status of a termination request."""

    INVALID_HEADER_FIELD = 0x01
    PDU_SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03
    DATA_OUT_OF_RANGE = 0x04
    DATA_LIMIT_EXCEEDED = 0x05
    UNSUPPORTED_PARAMETER = 0x06


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    FABRICS = 0x7F


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    FABRICS = 0x7F


class FabricsType(enum.IntEnum):
    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    AUTH_SEND = 0x05
    AUTH_RECV = 0x06
    DISCONNECT = 0x08


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESC_LIST = 0x03
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06
    CSI_ACTIVE_NS_LIST = 0x07
    INDEPENDENT_NAMESPACE = 0x08
    IO_COMMAND_SET = 0x1C


class Feature(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B
    KEEP_ALIVE_TIMER = 0x0F
    HOST_IDENTIFIER = 0x81


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NS_LIST = 0x04
    COMMANDS_SUPPORTED = 0x05
    DISCOVERY = 0x70


class Property(enum.IntEnum):
    CAP = 0x00
    VS = 0x08
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30


class Sct(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3


class Status(enum.IntEnum):
    """Status as the 15-bit CQE field without the phase bit: (DNR<<14)|(SCT<<8)|SC, shifted by 1 on wire.

    Values here are ``(sct << 8) | sc``; :func:`status_field` builds the CQE STATUS word.
    """

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    CID_CONFLICT = 0x003
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORTED_BY_REQUEST = 0x007
    ABORTED_SQ_DELETION = 0x008
    INVALID_NAMESPACE = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    INVALID_SGL_SEGMENT = 0x00D
    DATA_SGL_LENGTH_INVALID = 0x00F
    SGL_TYPE_INVALID = 0x011
    INVALID_SGL_OFFSET = 0x016
    KEEP_ALIVE_EXPIRED = 0x019
    KEEP_ALIVE_INVALID = 0x01A
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    NAMESPACE_NOT_READY = 0x082
    INVALID_QUEUE_ID = 0x101
    INVALID_QUEUE_SIZE = 0x102
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_LOG_PAGE = 0x109
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E
    CONNECT_INCOMPATIBLE_FORMAT = 0x180
    CONNECT_CONTROLLER_BUSY = 0x181
    CONNECT_INVALID_PARAMETERS = 0x182
    CONNECT_RESTART_DISCOVERY = 0x183
    CONNECT_INVALID_HOST = 0x184
    AUTH_REQUIRED = 0x191
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    COMPARE_FAILURE = 0x285
    ACCESS_DENIED = 0x286


DNR = 0x8000


def status_field(status: int, dnr: bool = True) -> int:
    """The 16-bit CQE STATUS word for ``(sct << 8) | sc``; success never carries DNR."""
    if status == 0:
        return 0
    return ((status & 0x7FF) << 1) | (DNR if dnr else 0)


def status_code(field: int) -> int:
    """``(sct << 8) | sc`` from a CQE STATUS word."""
    return (field >> 1) & 0x7FF


def status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"SCT{status >> 8}/SC0x{status & 0xFF:02x}"


# SGL descriptor identifiers used on NVMe/TCP.
SGL_DATA_BLOCK_OFFSET = 0x01  # in-capsule data
SGL_TRANSPORT_DATA_BLOCK = 0x5A  # data moved by R2T/H2CData or C2HData
SGL_KEYED_DATA_BLOCK = 0x40

# Controller register fields.
CC_EN = 0x1
CC_SHN_MASK = 0x3 << 14
CSTS_RDY = 0x1
CSTS_SHST_MASK = 0x3 << 2
CSTS_SHST_COMPLETE = 0x2 << 2
VS_1_3 = 0x00010300


class TransportType(enum.IntEnum):
    RDMA = 1
    FC = 2
    TCP = 3
    LOOP = 0xFE


class AddressFamily(enum.IntEnum):
    IPV4 = 1
    IPV6 = 2
    IB = 3
    FC = 4


class SubsystemType(enum.IntEnum):
    REFERRAL = 1
    NVME = 2
    CURRENT_DISCOVERY = 3
