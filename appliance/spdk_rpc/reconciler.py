"""Desired state of a node's drive target, compared with what the target reports, as a plan of calls.

The node configuration says what should be exported; SPDK (or the soft target) says, through three
reads (``nvmf_get_transports``, ``bdev_get_bdevs``, ``nvmf_get_subsystems``), what is. Only the
difference becomes a plan: explicit ``(method, params)`` steps that can be printed (dry run) or
applied, so re-applying an unchanged configuration issues no call at all, and a restarted target is
rebuilt by the same code. What is no longer wanted goes first and in a safe order: listeners (no new
connections), hosts, namespaces (a bdev must leave its subsystem before it is deleted), bdevs, then
subsystems; creation follows in the reverse order, with listeners last so a host never connects to a
half-built subsystem.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nvmeof.spec import DISCOVERY_NQN
from .nodeconfig import DriveKind, DriveSpec, NodeConfig
from .rpc import SpdkRpc

log = logging.getLogger(__name__)

INFINIBAND_CLASS = Path("/sys/class/infiniband")
DEFAULT_MAX_NAMESPACES = 32  # SPDK's default; more drives need a larger subsystem
_NVME_PRODUCT = "NVMe disk"
_MALLOC_PRODUCT = "Malloc disk"
_AIO_PRODUCT = "AIO disk"
# How each kind of bdev the reconciler may find is deleted: product_name -> method.
_DELETE_METHODS = {_MALLOC_PRODUCT: "bdev_malloc_delete", _AIO_PRODUCT: "bdev_aio_delete"}
_NVME_BDEV_SUFFIX = re.compile(r"n\d+$")


@dataclass(frozen=True)
class Step:
    """One JSON-RPC call of a plan."""

    method: str
    params: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.method} {json.dumps(self.params, sort_keys=True)}"


@dataclass
class Plan:
    """What to do to reach the desired state: backing files to create, then calls in order."""

    files: dict[str, int] = field(default_factory=dict)  # path -> size, created sparse if absent
    steps: list[Step] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.files or self.steps)

    def __str__(self) -> str:
        lines = [f"create file {path} ({size} bytes, sparse)" for path, size in self.files.items()]
        return "\n".join(lines + [str(s) for s in self.steps]) or "nothing to do"

    def call(self, method: str, **params: Any) -> None:
        self.steps.append(Step(method, params))


@dataclass(frozen=True)
class Listener:
    trtype: str  # "TCP" or "RDMA"
    adrfam: str  # "ipv4" or "ipv6"
    traddr: str
    trsvcid: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Listener:
        return cls(d["trtype"].upper(), d.get("adrfam", "ipv4").lower(), d["traddr"], str(d["trsvcid"]))

    def params(self) -> dict[str, str]:
        return {"trtype": self.trtype, "adrfam": self.adrfam, "traddr": self.traddr, "trsvcid": self.trsvcid}


@dataclass(frozen=True)
class BdevSpec:
    """A bdev to create: its name once created, how to create it, and what identifies it when read back."""

    name: str
    create: Step
    product_name: str
    identity: tuple[tuple[str, Any], ...]  # (bdev_get_bdevs key, value) pairs that must match
    backing_file: tuple[str, int] | None = None  # (path, size) of a file drive, created before use


@dataclass(frozen=True)
class NamespaceSpec:
    bdev_name: str
    uuid: str
    nguid: str  # 32 upper-case hex digits, as SPDK reports it


@dataclass(frozen=True)
class DesiredState:
    """Everything the target should export; ``nqn`` None means "nothing" (tear down)."""

    transports: dict[str, dict[str, Any]]  # trtype -> extra nvmf_create_transport options
    bdevs: tuple[BdevSpec, ...] = ()
    nqn: str | None = None
    serial_number: str = ""
    model_number: str = ""
    max_namespaces: int = DEFAULT_MAX_NAMESPACES
    namespaces: tuple[NamespaceSpec, ...] = ()
    listeners: frozenset[Listener] = frozenset()
    discovery_listeners: frozenset[Listener] = frozenset()
    allow_any_host: bool = False
    hosts: frozenset[str] = frozenset()


@dataclass
class Observed:
    """The target's answers to the three reads."""

    transports: list[dict[str, Any]]
    bdevs: list[dict[str, Any]]
    subsystems: list[dict[str, Any]]

    @classmethod
    def read(cls, rpc: SpdkRpc) -> Observed:
        return cls(rpc.nvmf_get_transports(), rpc.bdev_get_bdevs(), rpc.nvmf_get_subsystems())


def rdma_available(sysfs: Path = INFINIBAND_CLASS) -> bool:
    """Whether this machine has an RDMA device (an entry under /sys/class/infiniband)."""
    try:
        return any(sysfs.iterdir())
    except OSError:
        return False


def desired_state(config: NodeConfig, rdma: bool | None = None) -> DesiredState:
    """What ``config`` asks the target to export; ``rdma`` None decides from the config and the machine."""
    if rdma is None:
        rdma = config.transport.rdma if config.transport.rdma is not None else rdma_available()
    transports: dict[str, dict[str, Any]] = {"TCP": dict(config.transport.options)}
    if rdma:
        transports["RDMA"] = {}
    listeners = frozenset(
        Listener(trtype, a.adrfam, a.address, str(a.port))
        for a in config.data_addresses
        for trtype in transports
    )
    discovery = frozenset(
        Listener("TCP", a.adrfam, a.address, str(config.discovery_port)) for a in config.data_addresses
    )
    bdevs = tuple(_bdev_spec(d) for d in config.drives)
    return DesiredState(
        transports=transports,
        bdevs=bdevs,
        nqn=config.nqn,
        serial_number=config.serial_number,
        model_number=config.model_number,
        max_namespaces=max(DEFAULT_MAX_NAMESPACES, len(config.drives)),
        namespaces=tuple(
            NamespaceSpec(b.name, str(d.uuid), d.nguid.upper())
            for b, d in zip(bdevs, config.drives, strict=True)
        ),
        listeners=listeners,
        discovery_listeners=discovery,
        allow_any_host=config.allow_any_host,
        hosts=frozenset(config.hostnqns),
    )


def _bdev_spec(drive: DriveSpec) -> BdevSpec:
    uuid = str(drive.uuid)
    if drive.kind is DriveKind.PCI:
        params = {"name": drive.name, "trtype": "pcie", "traddr": drive.source}
        return BdevSpec(f"{drive.name}n1", Step("bdev_nvme_attach_controller", params), _NVME_PRODUCT, ())
    if drive.kind is DriveKind.MALLOC:
        assert drive.size is not None and drive.block_size is not None
        num_blocks = drive.size // drive.block_size
        params = {"name": drive.name, "num_blocks": num_blocks, "block_size": drive.block_size, "uuid": uuid}
        identity = (("block_size", drive.block_size), ("num_blocks", num_blocks), ("uuid", uuid))
        return BdevSpec(drive.name, Step("bdev_malloc_create", params), _MALLOC_PRODUCT, identity)
    params = {"filename": drive.source, "name": drive.name, "uuid": uuid}
    identity: tuple[tuple[str, Any], ...] = (("uuid", uuid), ("filename", drive.source))
    if drive.block_size is not None:
        params["block_size"] = drive.block_size
        identity += (("block_size", drive.block_size),)
    if drive.size is not None and drive.block_size is not None:
        identity += (("num_blocks", drive.size // drive.block_size),)
    backing = (drive.source, drive.size) if drive.kind is DriveKind.FILE and drive.size else None
    return BdevSpec(drive.name, Step("bdev_aio_create", params), _AIO_PRODUCT, identity, backing)


def teardown_state() -> DesiredState:
    """Nothing exported. Transports stay: SPDK has no call to delete one."""
    return DesiredState(transports={})


def plan(desired: DesiredState, observed: Observed) -> Plan:
    """The calls that turn ``observed`` into ``desired``; empty when they already agree."""
    out = Plan()
    subsystems = {s["nqn"]: s for s in observed.subsystems}
    bdevs = {b["name"]: b for b in observed.bdevs}
    wanted_bdevs = {b.name: b for b in desired.bdevs}
    # Every bdev of a wanted NVMe controller stays: they can only go all at once, with the controller.
    wanted_controllers = {_nvme_controller(b.name, b.product_name) for b in desired.bdevs} - {None}
    stale_bdevs = {
        name for name, b in bdevs.items()
        if not _bdev_matches(wanted_bdevs.get(name), b)
        and _nvme_controller(name, b["product_name"]) not in wanted_controllers
    }

    ours = subsystems.get(desired.nqn) if desired.nqn else None
    if ours is not None and (ours["serial_number"], ours["model_number"]) != (
        desired.serial_number, desired.model_number
    ):
        ours = None  # identity changed: rebuild it from scratch
    doomed = [s for s in subsystems.values() if s["subtype"] != "Discovery" and s is not ours]

    # 1. What goes away, safest first. ``present``: bdevs whose namespace in ``ours`` stays as it is.
    present: set[str] = set()
    discovery = subsystems.get(DISCOVERY_NQN, {"listen_addresses": []})
    _remove_listeners(out, "discovery", discovery, desired.discovery_listeners)
    for sub in [*doomed, *([ours] if ours else [])]:
        keep = sub is ours
        _remove_listeners(out, sub["nqn"], sub, desired.listeners if keep else frozenset())
        for host in sub["hosts"]:
            if not keep or host["nqn"] not in desired.hosts:
                out.call("nvmf_subsystem_remove_host", nqn=sub["nqn"], host=host["nqn"])
        if keep and sub["allow_any_host"] and not desired.allow_any_host:
            out.call("nvmf_subsystem_allow_any_host", nqn=sub["nqn"], allow_any_host=False)
        wanted_ns = {n.bdev_name: n for n in desired.namespaces} if keep else {}
        for ns in sub["namespaces"]:
            if ns["bdev_name"] in stale_bdevs or not _ns_matches(wanted_ns.get(ns["bdev_name"]), ns):
                out.call("nvmf_subsystem_remove_ns", nqn=sub["nqn"], nsid=ns["nsid"])
            else:  # only ``ours`` wants namespaces
                present.add(ns["bdev_name"])
    for name in sorted(stale_bdevs):
        _delete_bdev(out, bdevs[name])
    for sub in doomed:
        out.call("nvmf_delete_subsystem", nqn=sub["nqn"])

    # 2. What is missing.
    have_transports = {t["trtype"].upper() for t in observed.transports}
    for trtype, options in desired.transports.items():
        if trtype not in have_transports:
            out.call("nvmf_create_transport", trtype=trtype, **options)
    for spec in desired.bdevs:
        if spec.name not in bdevs or spec.name in stale_bdevs:
            if spec.backing_file:
                out.files.update([spec.backing_file])
            out.steps.append(spec.create)
    if desired.nqn is None:
        return out
    if ours is None:
        out.call("nvmf_create_subsystem", nqn=desired.nqn, serial_number=desired.serial_number,
                 model_number=desired.model_number, allow_any_host=desired.allow_any_host,
                 max_namespaces=desired.max_namespaces)
    for ns in desired.namespaces:
        if ns.bdev_name not in present:
            out.call("nvmf_subsystem_add_ns", nqn=desired.nqn,
                     namespace={"bdev_name": ns.bdev_name, "uuid": ns.uuid, "nguid": ns.nguid})
    hosts = {h["nqn"] for h in ours["hosts"]} if ours else set()
    for host in sorted(desired.hosts - hosts):
        out.call("nvmf_subsystem_add_host", nqn=desired.nqn, host=host)
    if ours is not None and desired.allow_any_host and not ours["allow_any_host"]:
        out.call("nvmf_subsystem_allow_any_host", nqn=desired.nqn, allow_any_host=True)
    _add_listeners(out, desired.nqn, ours, desired.listeners)
    _add_listeners(out, "discovery", discovery, desired.discovery_listeners)
    return out


def _bdev_matches(spec: BdevSpec | None, bdev: dict[str, Any]) -> bool:
    if spec is None or bdev["product_name"] != spec.product_name:
        return False
    reported = {**bdev, "filename": bdev.get("driver_specific", {}).get("aio", {}).get("filename")}
    return all(str(reported.get(key)).lower() == str(value).lower() for key, value in spec.identity)


def _ns_matches(spec: NamespaceSpec | None, ns: dict[str, Any]) -> bool:
    return (
        spec is not None
        and str(ns.get("uuid", "")).lower() == spec.uuid
        and str(ns.get("nguid", "")).upper() == spec.nguid
    )


def _listeners(sub: dict[str, Any] | None) -> set[Listener]:
    return {Listener.from_json(a) for a in sub["listen_addresses"]} if sub else set()


def _remove_listeners(out: Plan, nqn: str, sub: dict[str, Any], wanted: frozenset[Listener]) -> None:
    for listener in sorted(_listeners(sub) - wanted, key=str):
        out.call("nvmf_subsystem_remove_listener", nqn=nqn, listen_address=listener.params())


def _add_listeners(out: Plan, nqn: str, sub: dict[str, Any] | None, wanted: frozenset[Listener]) -> None:
    for listener in sorted(wanted - _listeners(sub), key=str):
        out.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=listener.params())


def _nvme_controller(name: str, product_name: str) -> str | None:
    """The bdev_nvme controller name of an NVMe bdev ("Nvme0" for "Nvme0n1"), else None."""
    return _NVME_BDEV_SUFFIX.sub("", name) if product_name == _NVME_PRODUCT else None


def _delete_bdev(out: Plan, bdev: dict[str, Any]) -> None:
    """Delete a bdev with its module's call; NVMe bdevs go with their controller (once)."""
    if (controller := _nvme_controller(bdev["name"], bdev["product_name"])) is not None:
        step = Step("bdev_nvme_detach_controller", {"name": controller})
    elif bdev["product_name"] in _DELETE_METHODS:
        step = Step(_DELETE_METHODS[bdev["product_name"]], {"name": bdev["name"]})
    else:
        log.warning("leaving bdev %s alone: no known way to delete a %r", bdev["name"], bdev["product_name"])
        return
    if step not in out.steps:
        out.steps.append(step)


def apply(rpc: SpdkRpc, todo: Plan) -> None:
    """Create missing backing files, then issue the plan's calls in order; the first failure stops it."""
    for path, size in todo.files.items():
        ensure_file(path, size)
    for step in todo.steps:
        log.info("reconcile: %s", step)
        rpc.call(step.method, step.params)


def reconcile(rpc: SpdkRpc, desired: DesiredState, dry_run: bool = False) -> Plan:
    """Read the target, plan the difference and (unless ``dry_run``) apply it; return the plan."""
    todo = plan(desired, Observed.read(rpc))
    if not dry_run:
        apply(rpc, todo)
    return todo


def ensure_file(path: str, size: int) -> None:
    """Create a file drive's backing file, sparse, with its configured size; never shrink one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
