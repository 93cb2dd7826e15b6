"""A node's configuration file (YAML) as a typed, validated ``NodeConfig``.

The file says what this node exports: its name and failure domain, the data addresses its drive
target listens on, which hosts may connect, the drives, and how SPDK is started. The reconciler turns
a ``NodeConfig`` into SPDK JSON-RPC calls, so everything is checked here, once, with an error that
names the offending field (``drives[2].size: must be a size like 64MiB``) instead of failing halfway
through configuring a target. ``to_dict`` gives back the normalised form, which parses to an equal
config, so ``kahu node check-config`` can print what will actually be applied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import uuid as uuidlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from .. import units
from ..nvmeof.spec import DISCOVERY_PORT, NQN_MAX, NVME_PORT
from .pci import PCI_ADDRESS_RE

NQN_PREFIX = "nqn.2026-11.io.kahu"
DEFAULT_RPC_SOCKET = "/var/tmp/spdk.sock"
DEFAULT_CPUMASK = "0x1"
DEFAULT_FILE_DRIVE_SIZE = 256 * 1024 * 1024
SERIAL_MAX = 20  # Identify Controller SN is 20 ASCII bytes
MODEL_MAX = 40  # Identify Controller MN is 40 ASCII bytes
IFNAME_MAX = 15  # IFNAMSIZ - 1
BLOCK_SIZES = (512, 4096)
# Drive UUIDs are UUID5(DRIVE_UUID_NAMESPACE, "<node>/<kind>:<identity>"): stable across re-applies.
DRIVE_UUID_NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://kahu.io/ns/drive")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NQN_RE = re.compile(r"^nqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(:\S+)?$")
_CPUMASK_RE = re.compile(r"^0x[0-9a-fA-F]+$")


class NodeConfigError(ValueError):
    """The node configuration is invalid; the message starts with the offending field's path."""


class DriveKind(StrEnum):
    PCI = "pci"
    BLOCK_DEVICE = "block_device"
    FILE = "file"
    MALLOC = "malloc"


@dataclass(frozen=True)
class DataAddress:
    """One address the drive target listens on for NVMe/TCP (and RDMA where available)."""

    address: str
    port: int = NVME_PORT
    prefixlen: int | None = None  # from "10.0.0.5/24"; only needed to configure ``interface``
    interface: str | None = None
    mtu: int | None = None

    @property
    def adrfam(self) -> str:
        return "ipv6" if ipaddress.ip_address(self.address).version == 6 else "ipv4"


@dataclass(frozen=True)
class DriveSpec:
    """One drive exported as a namespace. ``source`` is the PCI address, device or file path."""

    kind: DriveKind
    name: str
    uuid: uuidlib.UUID
    source: str | None = None  # None for malloc
    size: int | None = None  # bytes; file and malloc only
    block_size: int | None = None  # None: the device's own format (pci, block_device)

    @property
    def nguid(self) -> str:
        """The namespace NGUID (32 hex digits), the same 16 bytes as the UUID."""
        return self.uuid.hex


@dataclass(frozen=True)
class SpdkConfig:
    binary: str | None = None
    rpc_socket: str = DEFAULT_RPC_SOCKET
    cpumask: str = DEFAULT_CPUMASK
    mem_size_mb: int | None = None
    no_huge: bool | None = None  # None: decide from whether hugepages are available
    no_pci: bool = False
    hugepages: int = 0  # 2 MiB pages to reserve before starting


@dataclass(frozen=True)
class TransportConfig:
    rdma: bool | None = None  # None: use RDMA when an RDMA device exists
    options: dict[str, Any] = field(default_factory=dict)  # extra nvmf_create_transport params


@dataclass(frozen=True)
class NodeConfig:
    name: str
    failure_domain: str
    data_addresses: tuple[DataAddress, ...]
    nqn: str
    serial_number: str
    model_number: str
    drives: tuple[DriveSpec, ...]
    discovery_port: int = DISCOVERY_PORT
    allow_any_host: bool = False
    hostnqns: tuple[str, ...] = ()
    spdk: SpdkConfig = field(default_factory=SpdkConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)

    @classmethod
    def default(cls, state_dir: Path | str) -> NodeConfig:
        """The one-machine default: a 256 MiB file drive under ``state_dir``, loopback, any host."""
        name = _default_node_name()
        return parse_node_config(
            {
                "name": name,
                "data_addresses": [{"address": "127.0.0.1", "port": NVME_PORT}],
                "allow_any_host": True,
                "drives": [
                    {"file": str(Path(state_dir) / "drives" / "drive0.img"), "size": DEFAULT_FILE_DRIVE_SIZE}
                ],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """The normalised form: every default filled in; ``parse_node_config`` gives back an equal config."""
        out: dict[str, Any] = {
            "name": self.name,
            "failure_domain": self.failure_domain,
            "nqn": self.nqn,
            "serial_number": self.serial_number,
            "model_number": self.model_number,
            "data_addresses": [_address_dict(a) for a in self.data_addresses],
            "discovery_port": self.discovery_port,
            "allow_any_host": self.allow_any_host,
            "hostnqns": list(self.hostnqns),
            "drives": [drive_dict(d) for d in self.drives],
            "spdk": {k: v for k, v in vars(self.spdk).items() if v is not None},
            "transport": {"rdma": "auto" if self.transport.rdma is None else self.transport.rdma,
                          "options": dict(self.transport.options)},
        }
        if self.spdk.no_huge is None:
            out["spdk"]["no_huge"] = "auto"
        return out


def load_node_config(path: Path | str) -> NodeConfig:
    """Read and validate a node configuration file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise NodeConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise NodeConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_node_config(data)


def parse_node_config(data: Any, min_drives: int = 1) -> NodeConfig:
    """Validate a parsed YAML document; raise ``NodeConfigError`` naming the first bad field.

    ``min_drives`` 0 is for a cluster member built from etcd, which may have no drives (yet).
    """
    top = _mapping(data, "", {
        "name", "failure_domain", "data_addresses", "discovery_port", "hostnqns", "allow_any_host",
        "nqn", "serial_number", "model_number", "drives", "spdk", "transport",
    })
    if "name" not in top:
        raise NodeConfigError("name: required")
    name = check_name(top["name"], "name")
    failure_domain = check_name(top.get("failure_domain", name), "failure_domain")
    nqn = _nqn(top.get("nqn", f"{NQN_PREFIX}:{name}"), "nqn")
    serial = _ascii(top.get("serial_number", _default_serial(name)), "serial_number", SERIAL_MAX)
    model = _ascii(top.get("model_number", f"Kahu {name}"[:MODEL_MAX]), "model_number", MODEL_MAX)

    addresses = tuple(
        _data_address(item, f"data_addresses[{i}]")
        for i, item in enumerate(_list(top.get("data_addresses"), "data_addresses", min_len=1))
    )
    discovery_port = _int(top.get("discovery_port", DISCOVERY_PORT), "discovery_port", 1, 65535)
    _check_ports(addresses, discovery_port)

    hostnqns = tuple(
        _nqn(h, f"hostnqns[{i}]") for i, h in enumerate(_list(top.get("hostnqns", []), "hostnqns"))
    )
    allow_any_host = _bool(top.get("allow_any_host", False), "allow_any_host")
    if allow_any_host and hostnqns:
        raise NodeConfigError("allow_any_host: cannot be true while hostnqns lists allowed hosts")
    if not allow_any_host and not hostnqns:
        raise NodeConfigError("hostnqns: list the allowed host NQNs, or set allow_any_host: true")

    drives = tuple(
        parse_drive(item, f"drives[{i}]", name, i)
        for i, item in enumerate(_list(top.get("drives"), "drives", min_len=min_drives))
    )
    _check_unique([d.name for d in drives], "drives", "name")
    _check_unique([f"{d.kind}:{d.source}" for d in drives if d.source], "drives", "source")
    _check_unique([str(d.uuid) for d in drives], "drives", "uuid")

    return NodeConfig(
        name=name,
        failure_domain=failure_domain,
        data_addresses=addresses,
        nqn=nqn,
        serial_number=serial,
        model_number=model,
        drives=drives,
        discovery_port=discovery_port,
        allow_any_host=allow_any_host,
        hostnqns=hostnqns,
        spdk=_spdk(top.get("spdk", {}), "spdk"),
        transport=_transport(top.get("transport", {}), "transport"),
    )


def parse_size(value: Any, where: str) -> int:
    """Bytes from "64MiB", "1.5GiB", "4096" or an integer; decimal units are refused here."""
    return units.parse_size(value, where, NodeConfigError, decimal=False)


def drive_uuid(node_name: str, kind: DriveKind, identity: str) -> uuidlib.UUID:
    """The stable UUID of a drive without an explicit one: same node and drive, same UUID/NGUID."""
    return uuidlib.uuid5(DRIVE_UUID_NAMESPACE, f"{node_name}/{kind}:{identity}")


# --- sections ---------------------------------------------------------------------------------------


def _data_address(item: Any, where: str) -> DataAddress:
    d = _mapping(item, where, {"address", "port", "interface", "mtu"})
    if "address" not in d:
        raise NodeConfigError(f"{where}.address: required")
    raw = d["address"]
    try:
        iface = ipaddress.ip_interface(raw) if isinstance(raw, str) else None
    except ValueError:
        iface = None
    if iface is None:
        raise NodeConfigError(f"{where}.address: must be an IPv4 or IPv6 address, got {raw!r}")
    prefixlen = iface.network.prefixlen if "/" in raw else None
    interface = d.get("interface")
    if interface is not None and (
        not isinstance(interface, str) or not interface or len(interface) > IFNAME_MAX or "/" in interface
    ):
        raise NodeConfigError(f"{where}.interface: must be an interface name of 1..{IFNAME_MAX} characters")
    mtu = d.get("mtu")
    if mtu is not None:
        mtu = _int(mtu, f"{where}.mtu", 1280 if iface.version == 6 else 68, 65535)
    return DataAddress(
        address=str(iface.ip),
        port=_int(d.get("port", NVME_PORT), f"{where}.port", 1, 65535),
        prefixlen=prefixlen,
        interface=interface,
        mtu=mtu,
    )


def _check_ports(addresses: tuple[DataAddress, ...], discovery_port: int) -> None:
    seen: set[tuple[str, int]] = set()
    for i, a in enumerate(addresses):
        if (a.address, a.port) in seen:
            raise NodeConfigError(f"data_addresses[{i}]: {a.address} port {a.port} is listed twice")
        if a.port == discovery_port:
            raise NodeConfigError(f"data_addresses[{i}].port: {a.port} is the discovery_port")
        seen.add((a.address, a.port))


def parse_drive(item: Any, where: str, node_name: str, index: int) -> DriveSpec:
    """One drive entry (``{"file": path, "size": "1GiB"}``, ``{"pci": addr}``...), named ``drive<index>``
    unless it says otherwise; also how ``kahu drive add`` checks a drive before it enters etcd."""
    d = _mapping(item, where, {*DriveKind, "size", "block_size", "uuid", "name"})
    kinds = [k for k in DriveKind if k in d]
    if len(kinds) != 1:
        raise NodeConfigError(f"{where}: must have exactly one of {', '.join(DriveKind)}")
    kind = kinds[0]
    size: int | None = None
    source: str | None = None
    if kind is DriveKind.MALLOC:
        size = parse_size(d[kind], f"{where}.malloc")
    else:
        source = _source(kind, d[kind], f"{where}.{kind}")
    if kind is DriveKind.FILE:
        if "size" not in d:
            raise NodeConfigError(f"{where}.size: required for a file drive")
        size = parse_size(d["size"], f"{where}.size")
    elif "size" in d:
        raise NodeConfigError(f"{where}.size: only a file drive takes a size")

    block_size = d.get("block_size")
    if block_size is not None and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
        raise NodeConfigError(f"{where}.block_size: must be one of {', '.join(map(str, BLOCK_SIZES))}")
    if size is not None:
        block_size = block_size or BLOCK_SIZES[0]
        if size % block_size:
            raise NodeConfigError(f"{where}: size {size} is not a multiple of block_size {block_size}")

    name = check_name(d.get("name", f"drive{index}"), f"{where}.name")
    if "uuid" in d:
        try:
            uuid = uuidlib.UUID(str(d["uuid"]))
        except ValueError:
            raise NodeConfigError(f"{where}.uuid: must be a UUID like {uuidlib.UUID(int=0)}") from None
    else:
        uuid = drive_uuid(node_name, kind, source or name)
    return DriveSpec(kind=kind, name=name, uuid=uuid, source=source, size=size, block_size=block_size)


def _source(kind: DriveKind, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise NodeConfigError(f"{where}: must be a non-empty string")
    if kind is DriveKind.PCI:
        if not PCI_ADDRESS_RE.match(value.lower()):
            raise NodeConfigError(f"{where}: must be a PCI address like 0000:0a:00.0, got {value!r}")
        return value.lower()
    if kind is DriveKind.BLOCK_DEVICE and not value.startswith("/dev/"):
        raise NodeConfigError(f"{where}: must be a path under /dev/, got {value!r}")
    return value


def _spdk(item: Any, where: str) -> SpdkConfig:
    d = _mapping(item, where, {"binary", "rpc_socket", "cores", "cpumask", "mem_size_mb", "no_huge",
                               "no_pci", "hugepages"})
    if "cores" in d and "cpumask" in d:
        raise NodeConfigError(f"{where}.cores: give either cores or cpumask, not both")
    cpumask = _cpumask(d["cores"], f"{where}.cores") if "cores" in d else d.get("cpumask", DEFAULT_CPUMASK)
    if not isinstance(cpumask, str) or not _CPUMASK_RE.match(cpumask) or int(cpumask, 16) == 0:
        raise NodeConfigError(f"{where}.cpumask: must be a hex mask like 0x3")
    binary = d.get("binary")
    if binary is not None and (not isinstance(binary, str) or not binary):
        raise NodeConfigError(f"{where}.binary: must be a path")
    rpc_socket = d.get("rpc_socket", DEFAULT_RPC_SOCKET)
    if not isinstance(rpc_socket, str) or not rpc_socket.startswith("/"):
        raise NodeConfigError(f"{where}.rpc_socket: must be an absolute path")
    mem = d.get("mem_size_mb")
    no_huge = d.get("no_huge", "auto")
    return SpdkConfig(
        binary=binary,
        rpc_socket=rpc_socket,
        cpumask=cpumask.lower(),
        mem_size_mb=None if mem is None else _int(mem, f"{where}.mem_size_mb", 1, 1 << 20),
        no_huge=None if no_huge == "auto" else _bool(no_huge, f"{where}.no_huge"),
        no_pci=_bool(d.get("no_pci", False), f"{where}.no_pci"),
        hugepages=_int(d.get("hugepages", 0), f"{where}.hugepages", 0, 1 << 20),
    )


def _cpumask(cores: Any, where: str) -> str:
    items = _list(cores, where, min_len=1)
    mask = 0
    for i, core in enumerate(items):
        mask |= 1 << _int(core, f"{where}[{i}]", 0, 1023)
    return hex(mask)


def _transport(item: Any, where: str) -> TransportConfig:
    d = _mapping(item, where, {"rdma", "options"})
    rdma = d.get("rdma", "auto")
    options = _mapping(d.get("options", {}), f"{where}.options", None)
    for key, value in options.items():
        if not isinstance(key, str) or key == "trtype":
            raise NodeConfigError(f"{where}.options.{key}: not an nvmf_create_transport option")
        if not isinstance(value, bool | int | str):
            raise NodeConfigError(f"{where}.options.{key}: must be a number, boolean or string")
    return TransportConfig(
        rdma=None if rdma == "auto" else _bool(rdma, f"{where}.rdma"),
        options=dict(options),
    )


# --- scalar checks ----------------------------------------------------------------------------------


def _mapping(value: Any, where: str, known: set[str] | None) -> dict[Any, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise NodeConfigError(f"{where or 'config'}: must be a mapping")
    if known is not None:
        for key in value:
            if key not in known:
                raise NodeConfigError(
                    f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(known))})"
                )
    return value


def _list(value: Any, where: str, min_len: int = 0) -> list[Any]:
    if value is None:
        value = []
    if not isinstance(value, list):
        raise NodeConfigError(f"{where}: must be a list")
    if len(value) < min_len:
        raise NodeConfigError(f"{where}: needs at least {min_len} entr{'y' if min_len == 1 else 'ies'}")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NodeConfigError(f"{where}: must be an integer in {lo}..{hi}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise NodeConfigError(f"{where}: must be true or false")
    return value


def check_name(value: Any, where: str) -> str:
    """A node, drive or file-system name: 1..63 letters, digits, ".", "_" or "-"."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise NodeConfigError(f"{where}: must be 1..63 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _nqn(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.isascii() or len(value) > NQN_MAX or not _NQN_RE.match(value):
        raise NodeConfigError(f"{where}: must be an NQN like {NQN_PREFIX}:node1 (at most {NQN_MAX} bytes)")
    return value


def _ascii(value: Any, where: str, max_len: int) -> str:
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise NodeConfigError(f"{where}: must be printable ASCII")
    if len(value) > max_len:
        raise NodeConfigError(f"{where}: at most {max_len} characters")
    return value


def _check_unique(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for i, v in enumerate(values):
        if v in seen:
            raise NodeConfigError(f"{where}[{i}].{what}: {v!r} is used by another drive")
        seen.add(v)


# --- defaults and output ----------------------------------------------------------------------------


def _default_node_name() -> str:
    host = socket.gethostname().split(".")[0]
    return host if NAME_RE.match(host) else "kahu"


def _default_serial(name: str) -> str:
    """``KAHU`` + 16 hex digits of the name's hash: unique per node, within the 20-byte SN field."""
    return "KAHU" + hashlib.sha256(name.encode()).hexdigest()[: SERIAL_MAX - 4].upper()


def _address_dict(a: DataAddress) -> dict[str, Any]:
    out: dict[str, Any] = {
        "address": a.address if a.prefixlen is None else f"{a.address}/{a.prefixlen}",
        "port": a.port,
    }
    if a.interface is not None:
        out["interface"] = a.interface
    if a.mtu is not None:
        out["mtu"] = a.mtu
    return out


def drive_dict(d: DriveSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d.name}
    if d.kind is DriveKind.MALLOC:
        out["malloc"] = units.format_size(d.size or 0)
    else:
        out[str(d.kind)] = d.source
    if d.kind is DriveKind.FILE:
        out["size"] = units.format_size(d.size or 0)
    if d.block_size is not None:
        out["block_size"] = d.block_size
    out["uuid"] = str(d.uuid)
    return out
