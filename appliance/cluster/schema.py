"""What Kahu keeps in etcd: the key layout, the records stored under it, and their validation.

The layout separates what admins decide from what the system observes, so the two never fight over
one key:

- ``/kahu/schema`` — the layout's version; a client refuses a store newer than it understands.
- ``/kahu/config/...`` — decided by admins: the cluster (identity, protection policy, timeouts),
  nodes, drives, file systems, id counters. Every change to it rewrites ``/kahu/config/gen`` in the
  same transaction and is conditional on the ``gen`` it was validated against, so a check like "the
  policy still fits the failure domains" can never be invalidated by a concurrent change.
- ``/kahu/state/...`` — observed: node health as marked by the manager, what each drive target
  actually exports.
- ``/kahu/heartbeats/<node>``, ``/kahu/manager``, ``/kahu/buckets/<n>`` — attached to leases, so
  they vanish when their holder stops renewing.
- ``/kahu/bucket-epochs/<n>`` — each bucket's ownership epoch, only ever increasing.
- ``/kahu/events/<time>-<token>`` — the event log, in time order.
"""

from __future__ import annotations

import ipaddress
import json
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ..spdk_rpc.nodeconfig import DriveSpec, NodeConfigError, parse_drive
from ..spdk_rpc.nodeconfig import check_name as _node_config_name

SCHEMA_VERSION = 1

SCHEMA_KEY = "/kahu/schema"
CONFIG = "/kahu/config/"
GEN_KEY = CONFIG + "gen"
CLUSTER_KEY = CONFIG + "cluster"
NODES = CONFIG + "nodes/"
DRIVES = CONFIG + "drives/"
FILESYSTEMS = CONFIG + "fs/"
COUNTERS = CONFIG + "counters/"
NODE_HEALTH = "/kahu/state/health/"
DRIVE_STATE = "/kahu/state/drives/"
HEARTBEATS = "/kahu/heartbeats/"
MANAGER_KEY = "/kahu/manager"
BUCKETS = "/kahu/buckets/"
BUCKET_EPOCHS = "/kahu/bucket-epochs/"
EVENTS = "/kahu/events/"

K_RANGE = (1, 16)  # DESIGN: 3..16 in production, smaller k for tiny test clusters
M_RANGE = (2, 4)
SPARES_RANGE = (0, 4)
NODE_TIMEOUT_RANGE = (3, 600)  # seconds; etcd's minimum lease TTL is 2 s with its default timings
DEFAULT_NODE_TIMEOUT = 6
MAX_BUCKETS = 1 << 16


class ClusterError(ValueError):
    """A cluster command or configuration is invalid or conflicts with the cluster; nothing changed."""


def check_name(value: Any, where: str) -> str:
    """A node, failure-domain, file-system or cluster name (the node-config rule), as a ClusterError."""
    try:
        return _node_config_name(value, where)
    except NodeConfigError as e:
        raise ClusterError(str(e)) from None


def check_cluster_name(value: Any) -> str:
    return check_name(value, "cluster name")


def check_address(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ClusterError(f"{where}: must be an IPv4 or IPv6 address, got {value!r}") from None


def check_port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ClusterError(f"{where}: must be a port number in 1..65535, got {value!r}")
    return value


def _int_in(value: Any, where: str, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ClusterError(f"{where}: must be an integer in {lo}..{hi}, got {value!r}")
    return value


def dumps(record: Any) -> str:
    return json.dumps(asdict(record) if hasattr(record, "__dataclass_fields__") else record,
                      sort_keys=True, separators=(",", ":"))


class Record:
    """A stored record: JSON of its dataclass fields; ``from_json`` is the inverse of ``dumps``."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Any:
        return cls(**d)


@dataclass(frozen=True)
class ProtectionPolicy:
    """Stripes of ``data`` + ``parity`` chunks on distinct failure domains, plus ``hot_spares`` failure
    domains' worth of capacity held back so a rebuild has room to land."""

    data: int
    parity: int
    hot_spares: int = 0

    def __post_init__(self) -> None:
        _int_in(self.data, "data (k)", K_RANGE)
        _int_in(self.parity, "parity (m)", M_RANGE)
        _int_in(self.hot_spares, "hot spares", SPARES_RANGE)

    @property
    def failure_domains_needed(self) -> int:
        return self.data + self.parity + self.hot_spares

    def check_fits(self, failure_domains: int) -> None:
        if failure_domains < self.failure_domains_needed:
            raise ClusterError(
                f"protection {self}: {self.data}+{self.parity} stripes plus {self.hot_spares} hot spare(s) "
                f"need {self.failure_domains_needed} failure domains, the cluster has {failure_domains}")

    def usable(self, raw: int, failure_domains: int) -> int:
        """Capacity left for data from ``raw`` bytes: parity overhead and hot spares taken off."""
        if failure_domains <= self.hot_spares:
            return 0
        return raw * self.data * (failure_domains - self.hot_spares) // (
            (self.data + self.parity) * failure_domains)

    def __str__(self) -> str:
        return f"{self.data}+{self.parity}" + (f"+{self.hot_spares}s" if self.hot_spares else "")


@dataclass(frozen=True)
class ClusterInfo:
    name: str
    uuid: str
    created: float
    policy: ProtectionPolicy
    node_timeout: int = DEFAULT_NODE_TIMEOUT  # a node silent this long (seconds) is marked down

    def __post_init__(self) -> None:
        check_cluster_name(self.name)
        _int_in(self.node_timeout, "node timeout", NODE_TIMEOUT_RANGE)

    @property
    def heartbeat_ttl(self) -> int:
        """The heartbeat lease TTL: one second under the timeout, for etcd's expiry-check granularity."""
        return self.node_timeout - 1

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClusterInfo:
        return cls(d["name"], d["uuid"], d["created"], ProtectionPolicy(**d["policy"]), d["node_timeout"])

    @classmethod
    def new(cls, name: str, policy: ProtectionPolicy, node_timeout: int, now: float) -> ClusterInfo:
        return cls(name, str(uuidlib.uuid4()), now, policy, node_timeout)


@dataclass(frozen=True)
class Node(Record):
    """A cluster member: where its drive target listens and which failure domain it belongs to."""

    name: str
    address: str
    failure_domain: str = ""  # "" means the node is its own failure domain
    nvme_port: int = 4420
    discovery_port: int = 8009
    added: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.name, "node name")
        check_address(self.address, f"node {self.name}: address")
        if self.failure_domain:
            check_name(self.failure_domain, f"node {self.name}: failure domain")
        check_port(self.nvme_port, f"node {self.name}: nvme port")
        check_port(self.discovery_port, f"node {self.name}: discovery port")
        if self.nvme_port == self.discovery_port:
            raise ClusterError(f"node {self.name}: nvme port and discovery port are both {self.nvme_port}")

    @property
    def domain(self) -> str:
        return self.failure_domain or self.name

    @property
    def endpoints(self) -> set[tuple[str, int]]:
        return {(self.address, self.nvme_port), (self.address, self.discovery_port)}


class DriveState(StrEnum):
    ACTIVE = "active"  # exported and in use
    DRAINING = "draining"  # exported; its data is being moved elsewhere before removal
    FAILED = "failed"  # not trusted: not exported, its data is rebuilt from parity
    REMOVED = "removed"  # gone from the cluster; the record stays for history


# Allowed admin and system transitions; anything else is refused with the reason.
DRIVE_TRANSITIONS: dict[DriveState, set[DriveState]] = {
    DriveState.ACTIVE: {DriveState.DRAINING, DriveState.FAILED},
    DriveState.DRAINING: {DriveState.REMOVED, DriveState.FAILED, DriveState.ACTIVE},
    DriveState.FAILED: {DriveState.REMOVED, DriveState.ACTIVE},
    DriveState.REMOVED: set(),
}
EXPORTED_STATES = {DriveState.ACTIVE, DriveState.DRAINING}


@dataclass(frozen=True)
class Drive:
    """A drive of a node; ``spec`` is its node-config form (``{"file": ..., "size": ...}``, ``{"pci": ...}``),
    checked by the same parser as node configuration files."""

    id: int
    node: str
    spec: dict[str, Any]
    state: DriveState = DriveState.ACTIVE
    added: float = 0.0
    changed: float = 0.0

    @property
    def name(self) -> str:
        return f"drive{self.id}"

    def parsed(self) -> DriveSpec:
        return parse_drive({**self.spec, "name": self.name}, f"drive {self.id}", self.node, self.id)

    @property
    def size(self) -> int | None:
        """Bytes, when the spec says (file and RAM drives); devices report theirs in DriveReport."""
        return self.parsed().size

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Drive:
        return cls(d["id"], d["node"], d["spec"], DriveState(d["state"]), d["added"], d["changed"])


@dataclass(frozen=True)
class DriveReport(Record):
    """What a node's drive target actually does with a drive, written by that node's backend."""

    exported: bool
    size: int = 0
    error: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class FileSystem(Record):
    name: str
    id: int
    capacity: int
    created: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.name, "file system name")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity <= 0:
            raise ClusterError(f"file system {self.name}: capacity must be a positive size")


class Health(StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # never seen since it was added


@dataclass(frozen=True)
class NodeHealth:
    state: Health
    since: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeHealth:
        return cls(Health(d["state"]), d["since"])


@dataclass(frozen=True)
class Heartbeat(Record):
    """The value of a node's leased heartbeat key: which process holds it, since when."""

    node: str
    pid: int
    started: float
    lease: int = 0


@dataclass(frozen=True)
class BucketOwner(Record):
    """A metadata bucket's owner: journal records carry ``epoch`` so a deposed owner's writes lose."""

    bucket: int
    owner: str
    epoch: int
    lease: int


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # "node.down", "drive.added", ...
    subject: str  # what it is about: "node1", "drive3", "fs/default"
    message: str
    severity: Severity = Severity.INFO

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        return cls(d["time"], d["kind"], d["subject"], d["message"], Severity(d["severity"]))


@dataclass
class Config:
    """The whole of ``/kahu/config/`` read at one revision; the ground every admin change is checked on."""

    cluster: ClusterInfo | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    drives: dict[int, Drive] = field(default_factory=dict)
    filesystems: dict[str, FileSystem] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    gen_revision: int = 0  # mod revision of GEN_KEY (0: never written)
    generation: int = 0

    def failure_domains(self, nodes: list[Node] | None = None) -> set[str]:
        return {n.domain for n in (self.nodes.values() if nodes is None else nodes)}

    def live_drives(self, node: str | None = None) -> list[Drive]:
        """Drives not removed (optionally of one node), in id order."""
        return sorted((d for d in self.drives.values()
                       if d.state is not DriveState.REMOVED and (node is None or d.node == node)),
                      key=lambda d: d.id)

    def raw_capacity(self, reports: dict[int, DriveReport], exclude: set[int] | None = None) -> int:
        """Bytes on active drives, from each drive's spec or, for devices, what its target reported."""
        total = 0
        for d in self.drives.values():
            if d.state is DriveState.ACTIVE and d.id not in (exclude or set()):
                total += d.size or (reports[d.id].size if d.id in reports else 0)
        return total

    def usable_capacity(self, reports: dict[int, DriveReport], exclude: set[int] | None = None,
                        nodes: list[Node] | None = None) -> int:
        if self.cluster is None:
            return 0
        domains = len(self.failure_domains(nodes))
        return self.cluster.policy.usable(self.raw_capacity(reports, exclude), domains)

    def provisioned(self) -> int:
        return sum(fs.capacity for fs in self.filesystems.values())

    def next_id(self, counter: str) -> int:
        return self.counters.get(counter, 0) + 1


def parse_record(key: str, value: bytes, cls: Any) -> Any:
    """One stored record; a damaged one is reported with its key rather than crashing a reader."""
    try:
        return cls.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"etcd key {key}: damaged record ({e})") from None
