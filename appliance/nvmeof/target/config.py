"""The soft target's YAML configuration: parsed and checked up front, then applied to a TargetServer.

Every error names the offending field (``subsystems[0].namespaces[1].size: ...``) and unknown keys
are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ... import units
from ..spec import DISCOVERY_NQN
from .model import Bdev, ConfigError, FileBdev, ListenAddress, MallocBdev, Subsystem, Transport, parse_uuid

if TYPE_CHECKING:
    from .server import TargetServer

# Option name -> int or bool, from the defaults; the JSON-RPC server checks the same names and types.
TRANSPORT_KEYS = {f.name: type(f.default) for f in dataclasses.fields(Transport) if f.name != "trtype"}
SUBSYSTEM_KEYS = {"nqn", "serial_number", "model_number", "max_namespaces", "allow_any_host", "hosts",
                  "listeners", "namespaces"}  # fmt: skip
NAMESPACE_KINDS = ("file", "malloc", "block_device")
NAMESPACE_KEYS = {*NAMESPACE_KINDS, "size", "block_size", "nsid", "uuid", "nguid", "eui64", "name"}
LISTENER_KEYS = {"traddr", "trsvcid", "adrfam"}


@dataclass(slots=True)
class NamespaceConfig:
    where: str  # the field path, for errors found while applying
    kind: str  # file, malloc or block_device
    path: str | None
    size: int | None
    block_size: int
    name: str
    nsid: int | None = None
    uuid: str | None = None
    nguid: str | None = None
    eui64: str | None = None


@dataclass(slots=True)
class SubsystemConfig:
    where: str
    nqn: str
    serial_number: str
    model_number: str
    max_namespaces: int
    allow_any_host: bool
    hosts: list[str]
    listeners: list[ListenAddress]
    namespaces: list[NamespaceConfig]


@dataclass(slots=True)
class TargetConfig:
    rpc_socket: str | None = None
    transport: Transport = field(default_factory=Transport)
    discovery_listeners: list[ListenAddress] = field(default_factory=list)
    subsystems: list[SubsystemConfig] = field(default_factory=list)


def parse_size(value: Any, where: str) -> int:
    """Bytes from 4096, "64MiB", "1G" (binary units) or "64MB" (decimal)."""
    return units.parse_size(value, where, ConfigError)


def _mapping(value: Any, where: str, allowed: set[str] | dict) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key")
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list")
    return value


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _listener(value: Any, where: str) -> ListenAddress:
    spec = _mapping(value, where, LISTENER_KEYS)
    if "traddr" not in spec:
        raise ConfigError(f"{where}.traddr: required")
    trsvcid = str(spec.get("trsvcid", "4420"))
    if not trsvcid.isdigit() or int(trsvcid) > 65535:
        raise ConfigError(f"{where}.trsvcid: not a TCP port: {trsvcid!r}")
    adrfam = str(spec.get("adrfam", "IPv6" if ":" in str(spec["traddr"]) else "IPv4"))
    if adrfam.lower() not in ("ipv4", "ipv6"):
        raise ConfigError(f"{where}.adrfam: must be IPv4 or IPv6")
    return ListenAddress(str(spec["traddr"]), trsvcid, adrfam=adrfam)


def _transport(value: Any) -> Transport:
    spec = _mapping(value or {}, "transport", TRANSPORT_KEYS)
    options = {key: _typed(v, TRANSPORT_KEYS[key], f"transport.{key}") for key, v in spec.items()}
    transport = Transport(**options)
    if transport.max_io_size < 4096 or transport.max_io_size % 4096:
        raise ConfigError("transport.max_io_size: must be a multiple of 4096")
    if transport.in_capsule_data_size < 0 or transport.in_capsule_data_size % 16:
        raise ConfigError("transport.in_capsule_data_size: must be a non-negative multiple of 16")
    if not 2 <= transport.max_queue_depth <= 65536:
        raise ConfigError("transport.max_queue_depth: must be 2..65536")
    if not 2 <= transport.max_aq_depth <= 4096:
        raise ConfigError("transport.max_aq_depth: must be 2..4096")
    if not 1 <= transport.max_io_qpairs_per_ctrlr <= 65535:
        raise ConfigError("transport.max_io_qpairs_per_ctrlr: must be 1..65535")
    if not 0 <= transport.kas <= 0xFFFF:
        raise ConfigError("transport.kas: must be 0..65535")
    return transport


def _namespace(value: Any, where: str, index: int) -> NamespaceConfig:
    spec = _mapping(value, where, NAMESPACE_KEYS)
    kinds = [k for k in NAMESPACE_KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: needs exactly one of {', '.join(NAMESPACE_KINDS)}")
    kind = kinds[0]
    block_size = _typed(spec.get("block_size", 512), int, f"{where}.block_size")
    if block_size < 512 or block_size & (block_size - 1):
        raise ConfigError(f"{where}.block_size: must be a power of two >= 512")
    if kind == "malloc":
        path, size = None, parse_size(spec["malloc"], f"{where}.malloc")
        if "size" in spec:
            raise ConfigError(f"{where}.size: a malloc namespace takes its size from 'malloc'")
    else:
        path = _typed(spec[kind], str, f"{where}.{kind}")
        size = parse_size(spec["size"], f"{where}.size") if "size" in spec else None
        if kind == "block_device" and size is not None:
            raise ConfigError(f"{where}.size: a block device has its own size")
    if size is not None and size % block_size:
        raise ConfigError(f"{where}.size: {size} is not a multiple of block_size {block_size}")
    nsid = spec.get("nsid")
    if nsid is not None:
        _typed(nsid, int, f"{where}.nsid")
    ids = {k: _typed(spec[k], str, f"{where}.{k}") for k in ("uuid", "nguid", "eui64") if k in spec}
    if "uuid" in ids:
        try:
            parse_uuid(ids["uuid"])
        except ConfigError as e:
            raise ConfigError(f"{where}.uuid: {e}") from None
    name = _typed(spec.get("name", ""), str, f"{where}.name")
    return NamespaceConfig(where, kind, path, size, block_size, name, nsid, **ids)


def _subsystem(value: Any, where: str) -> SubsystemConfig:
    spec = _mapping(value, where, SUBSYSTEM_KEYS)
    if "nqn" not in spec:
        raise ConfigError(f"{where}.nqn: required")
    nqn = _typed(spec["nqn"], str, f"{where}.nqn")
    hosts = [
        _typed(h, str, f"{where}.hosts[{i}]")
        for i, h in enumerate(_list(spec.get("hosts"), f"{where}.hosts"))
    ]
    listeners = [_listener(v, f"{where}.listeners[{i}]")
                 for i, v in enumerate(_list(spec.get("listeners"), f"{where}.listeners"))]  # fmt: skip
    namespaces = [_namespace(v, f"{where}.namespaces[{i}]", i)
                  for i, v in enumerate(_list(spec.get("namespaces"), f"{where}.namespaces"))]  # fmt: skip
    cfg = SubsystemConfig(
        where=where,
        nqn=nqn,
        serial_number=_typed(
            str(spec.get("serial_number", "00000000000000000000")), str, f"{where}.serial_number"
        ),
        model_number=_typed(spec.get("model_number", "Kahu soft target"), str, f"{where}.model_number"),
        max_namespaces=_typed(spec.get("max_namespaces", 32), int, f"{where}.max_namespaces"),
        allow_any_host=_typed(spec.get("allow_any_host", False), bool, f"{where}.allow_any_host"),
        hosts=hosts,
        listeners=listeners,
        namespaces=namespaces,
    )
    try:  # the model's own checks (NQN form, serial and model lengths)
        Subsystem(cfg.nqn, cfg.serial_number, cfg.model_number, cfg.max_namespaces)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def parse_target_config(doc: Any) -> TargetConfig:
    spec = _mapping(
        doc if doc is not None else {}, "config", {"rpc_socket", "transport", "discovery", "subsystems"}
    )
    discovery = _mapping(spec.get("discovery") or {}, "discovery", {"listeners"})
    listeners = _list(discovery.get("listeners"), "discovery.listeners")
    subsystems = _list(spec.get("subsystems"), "subsystems")
    cfg = TargetConfig(
        rpc_socket=_typed(spec["rpc_socket"], str, "rpc_socket") if spec.get("rpc_socket") else None,
        transport=_transport(spec.get("transport")),
        discovery_listeners=[_listener(v, f"discovery.listeners[{i}]") for i, v in enumerate(listeners)],
        subsystems=[_subsystem(v, f"subsystems[{i}]") for i, v in enumerate(subsystems)],
    )
    seen: set[str] = set()
    for sub in cfg.subsystems:
        if sub.nqn in seen or sub.nqn == DISCOVERY_NQN:
            raise ConfigError(f"{sub.where}.nqn: duplicate subsystem {sub.nqn}")
        seen.add(sub.nqn)
    return cfg


def load_target_config(path: str | os.PathLike) -> TargetConfig:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_target_config(doc)


def _open_bdev(ns: NamespaceConfig, name: str) -> Bdev:
    if ns.kind == "malloc":
        return MallocBdev(name, ns.block_size, ns.size // ns.block_size, ns.uuid)
    path = Path(ns.path)
    if ns.kind == "file":
        if not path.exists():
            if ns.size is None:
                raise ConfigError(f"{ns.where}.size: required to create {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("xb") as f:
                f.truncate(ns.size)  # sparse
        elif ns.size is not None and path.stat().st_size != ns.size:
            raise ConfigError(f"{ns.where}.size: {path} already exists with {path.stat().st_size} bytes")
    return FileBdev(name, str(path), ns.block_size, ns.uuid)


async def apply_target_config(server: TargetServer, cfg: TargetConfig) -> None:
    """Create the transport, bdevs, subsystems and listeners of ``cfg`` on ``server``."""
    target = server.target
    target.add_transport(cfg.transport)
    for sub_cfg in cfg.subsystems:
        target.add_subsystem(Subsystem(sub_cfg.nqn, sub_cfg.serial_number, sub_cfg.model_number,
                                       sub_cfg.max_namespaces, sub_cfg.allow_any_host))  # fmt: skip
        for host in sub_cfg.hosts:
            target.add_host(sub_cfg.nqn, host)
        for i, ns in enumerate(sub_cfg.namespaces):
            name = ns.name or f"{sub_cfg.nqn}/n{i + 1}"
            try:
                bdev = target.add_bdev(_open_bdev(ns, name))
                target.add_namespace(sub_cfg.nqn, bdev.name, nsid=ns.nsid, nguid=ns.nguid, eui64=ns.eui64,
                                     uuid=ns.uuid)  # fmt: skip
            except (ConfigError, OSError) as e:
                raise ConfigError(f"{ns.where}: {e}") from None
        for i, address in enumerate(sub_cfg.listeners):
            await _listen(target, sub_cfg.nqn, address, f"{sub_cfg.where}.listeners[{i}]")
    for i, address in enumerate(cfg.discovery_listeners):
        await _listen(target, DISCOVERY_NQN, address, f"discovery.listeners[{i}]")


async def _listen(target, nqn: str, address: ListenAddress, where: str) -> None:
    try:
        await target.add_listener(nqn, address)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"{where}: {e}") from None
