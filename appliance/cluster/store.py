"""Cluster state operations on etcd: each admin change validated and applied atomically.

An admin change reads the whole configuration at one revision, checks the request against it (names
unique, the protection policy still fitting the failure domains, provisioned capacity still fitting
what is usable), and commits in one transaction that is conditional on nothing having changed since
the read, together with its event. When something did change, it reads and checks again, so a
refused command has changed nothing and an accepted one was valid at the moment it landed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..spdk_rpc.nodeconfig import NodeConfigError
from ..units import human_size
from .etcd import Etcd, KeyValue, delete_op, mod_revision_is, put_op, range_op, value_is, version_is
from .schema import (
    BUCKET_EPOCHS,
    BUCKETS,
    CLUSTER_KEY,
    CONFIG,
    COUNTERS,
    DEFAULT_NODE_TIMEOUT,
    DRIVE_STATE,
    DRIVE_TRANSITIONS,
    DRIVES,
    EVENTS,
    FILESYSTEMS,
    GEN_KEY,
    HEARTBEATS,
    MANAGER_KEY,
    MAX_BUCKETS,
    NODE_HEALTH,
    NODES,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    BucketOwner,
    ClusterError,
    ClusterInfo,
    Config,
    Drive,
    DriveReport,
    DriveState,
    Event,
    FileSystem,
    Health,
    Heartbeat,
    Node,
    NodeHealth,
    ProtectionPolicy,
    Severity,
    dumps,
    parse_record,
)

CHANGE_ATTEMPTS = 20
T = TypeVar("T")
Ops = list[dict[str, Any]]


def event_op(kind: str, subject: str, message: str, severity: Severity = Severity.INFO,
             now: float | None = None) -> dict[str, Any]:
    """The put that records an event; goes into the same transaction as the change it reports."""
    now = time.time() if now is None else now
    key = f"{EVENTS}{int(now * 1e9):020d}-{secrets.token_hex(3)}"
    return put_op(key, dumps(Event(now, kind, subject, message, severity)))


@dataclass
class Observed:
    """What the system reports about itself, next to the configuration: for ``kahu status``."""

    health: dict[str, NodeHealth] = field(default_factory=dict)
    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    drive_reports: dict[int, DriveReport] = field(default_factory=dict)
    manager: str | None = None


class ClusterStore:
    """The cluster's state in etcd, read and changed only through validated, atomic operations."""

    def __init__(self, etcd: Etcd):
        self.etcd = etcd

    # --- reading -----------------------------------------------------------------------------------

    async def config(self) -> Config:
        """``/kahu/config/`` at one revision (refuses a schema newer than this code)."""
        config, _ = await self.config_at()
        return config

    async def config_at(self) -> tuple[Config, int]:
        """The config and the revision it was read at, to watch for what comes after it."""
        await self.check_schema()
        kvs, revision = await self.etcd.get_prefix_at(CONFIG)
        config = Config()
        for kv in kvs:
            _load(config, kv)
        return config, revision

    async def check_schema(self) -> int:
        kv = await self.etcd.get(SCHEMA_KEY)
        version = parse_record(kv.key, kv.value, _SchemaRecord).version if kv else 0
        if version > SCHEMA_VERSION:
            raise ClusterError(f"the cluster's state has schema version {version}; this Kahu understands "
                               f"up to {SCHEMA_VERSION}: upgrade Kahu")
        return version

    async def require(self) -> Config:
        config = await self.config()
        _require_cluster(config)
        return config

    async def observed(self) -> Observed:
        """Health marks, heartbeats, drive reports and the manager, read together."""
        health, heartbeats, reports, manager = await asyncio.gather(
            self.etcd.get_prefix(NODE_HEALTH), self.etcd.get_prefix(HEARTBEATS),
            self.etcd.get_prefix(DRIVE_STATE), self.etcd.get(MANAGER_KEY))
        out = Observed()
        for kv in health:
            out.health[kv.key[len(NODE_HEALTH):]] = parse_record(kv.key, kv.value, NodeHealth)
        for kv in heartbeats:
            out.heartbeats[kv.key[len(HEARTBEATS):]] = parse_record(kv.key, kv.value, Heartbeat)
        for kv in reports:
            out.drive_reports[int(kv.key[len(DRIVE_STATE):])] = parse_record(kv.key, kv.value, DriveReport)
        out.manager = manager.json()["node"] if manager else None
        return out

    async def wait_until(self, check: Callable[[ClusterStore], Awaitable[T | None]], timeout: float,
                         what: str = "condition") -> T:
        """The first truthy ``check(self)``, re-evaluated after each change under ``/kahu/``, within
        ``timeout`` (TimeoutError naming ``what`` after it): waiting on etcd, never on the clock."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    revision = await self.etcd.revision()
                    if result := await check(self):
                        return result
                    await self.etcd.next_change("/kahu/", revision + 1)
        except TimeoutError:
            raise TimeoutError(f"{what}: not within {timeout:g}s") from None

    async def all_up(self, nodes: Iterable[str]) -> bool:
        """Whether the manager has marked every one of ``nodes`` up and each holds its heartbeat."""
        observed = await self.observed()
        return all((h := observed.health.get(n)) is not None and h.state is Health.UP
                   and n in observed.heartbeats for n in nodes)

    async def events(self, limit: int = 20) -> list[Event]:
        """The newest ``limit`` events, oldest first."""
        kvs = await self.etcd.get_prefix(EVENTS, limit=limit, newest_first=True)
        return [parse_record(kv.key, kv.value, Event) for kv in reversed(kvs)]

    async def trim_events(self, keep: int) -> int:
        """Drop the oldest events beyond the newest ``keep``; returns how many went."""
        excess = await self.etcd.count(EVENTS) - keep
        if excess <= 0:
            return 0
        oldest = await self.etcd.get_prefix(EVENTS, limit=excess)
        return await self.etcd.delete_until(EVENTS, oldest[-1].key)

    # --- changing ----------------------------------------------------------------------------------

    async def change(self, plan: Callable[[Config], Ops]) -> Config:
        """Validate-and-commit: ``plan`` checks the request against the config and returns the writes.

        The writes commit only if the config is still the one ``plan`` saw; otherwise it runs again
        on the new one. ``plan`` raises ClusterError to refuse. Returns the config that was checked.

        Each attempt stamps the generation with a token of its own: when etcd committed an attempt
        but its answer was lost (the client then retries it and the retry's compare fails), the
        stamp shows the change is ours and landed, instead of re-planning against our own write.
        """
        for _ in range(CHANGE_ATTEMPTS):
            config = await self.config()
            ops = plan(config)
            stamp = f"{config.generation + 1} {secrets.token_hex(8)}"
            result = await self.etcd.txn(
                [mod_revision_is(GEN_KEY, config.gen_revision)],
                [*ops, put_op(GEN_KEY, stamp)],
                [range_op(GEN_KEY)],
            )
            if result.succeeded or any(kv.value.decode() == stamp for kvs in result.ranges() for kv in kvs):
                return config
        raise ClusterError("the cluster configuration kept changing under this command; try again")

    async def create_cluster(self, name: str, policy: ProtectionPolicy, nodes: list[Node],
                             node_timeout: int | None = None) -> ClusterInfo:
        now = time.time()
        info = ClusterInfo.new(name, policy, DEFAULT_NODE_TIMEOUT if node_timeout is None else node_timeout,
                               now)
        nodes = [replace(n, added=now) for n in nodes]

        def plan(config: Config) -> Ops:
            if config.cluster is not None:
                raise ClusterError(f"cluster {config.cluster.name} already exists here "
                                   f"(uuid {config.cluster.uuid}); nothing changed")
            _check_new_nodes({}, nodes)
            policy.check_fits(len(config.failure_domains(nodes)))
            return [
                put_op(SCHEMA_KEY, json.dumps({"version": SCHEMA_VERSION})),
                put_op(CLUSTER_KEY, dumps(info)),
                *(put_op(NODES + n.name, dumps(n)) for n in nodes),
                event_op("cluster.created", name, f"cluster {name} created with protection {policy}, "
                         f"{len(nodes)} node(s)", now=now),
            ]

        await self.change(plan)
        return info

    async def add_node(self, node: Node) -> Node:
        node = replace(node, added=time.time())

        def plan(config: Config) -> Ops:
            _require_cluster(config)
            _check_new_nodes(config.nodes, [node])
            return [put_op(NODES + node.name, dumps(node)),
                    event_op("node.added", node.name, f"node {node.name} added at {node.address} "
                             f"(failure domain {node.domain})")]

        await self.change(plan)
        return node

    async def remove_node(self, name: str, force: bool = False) -> list[Drive]:
        """Remove a node that is down (or any, with ``force``); its drives go to ``removed``."""
        observed = await self.observed()
        if name in observed.heartbeats and not force:
            raise ClusterError(f"node {name} is up (its backend is running); stop it first, "
                               "or use --force to remove it anyway")
        removed: list[Drive] = []

        def plan(config: Config) -> Ops:
            info = _require_cluster(config)
            _require_node(config, name)
            rest = [n for n in config.nodes.values() if n.name != name]
            info.policy.check_fits(len(config.failure_domains(rest)))
            gone = {d.id for d in config.live_drives(name)}
            _check_capacity(config, observed.drive_reports, f"removing node {name}", exclude=gone, nodes=rest)
            now = time.time()
            removed[:] = [replace(d, state=DriveState.REMOVED, changed=now) for d in config.live_drives(name)]
            return [delete_op(NODES + name), delete_op(NODE_HEALTH + name),
                    *(put_op(DRIVES + str(d.id), dumps(d)) for d in removed),
                    event_op("node.removed", name, f"node {name} removed"
                             + (f" with drives {', '.join(str(d.id) for d in removed)}" if removed else ""))]

        await self.change(plan)
        return removed

    async def add_drive(self, node: str, spec: dict[str, Any]) -> Drive:
        added: list[Drive] = []

        def plan(config: Config) -> Ops:
            _require_cluster(config)
            _require_node(config, node)
            now = time.time()
            drive = Drive(config.next_id("drive"), node, dict(spec), DriveState.ACTIVE, now, now)
            try:
                parsed = drive.parsed()  # the node-config checks: kind, source, size, block size
            except NodeConfigError as e:
                raise ClusterError(f"node {node}: {e}") from None
            if parsed.source and parsed.kind == "file" and not parsed.source.startswith("/"):
                raise ClusterError(f"node {node}: a file drive needs an absolute path, got {parsed.source!r}")
            for other in config.live_drives(node):
                if other.parsed().source and other.parsed().source == parsed.source:
                    raise ClusterError(f"node {node} already has {parsed.source} as drive {other.id}")
            added[:] = [drive]
            return [put_op(DRIVES + str(drive.id), dumps(drive)),
                    put_op(COUNTERS + "drive", str(drive.id)),
                    event_op("drive.added", drive.name, f"drive {drive.id} ({_describe(drive)}) "
                             f"added to node {node}")]

        await self.change(plan)
        return added[0]

    async def set_drive_state(self, drive_id: int, state: DriveState, reason: str = "") -> Drive:
        """Move a drive along DRIVE_TRANSITIONS; leaving service is refused when capacity would not fit."""
        observed = await self.observed()
        changed: list[Drive] = []

        def plan(config: Config) -> Ops:
            _require_cluster(config)
            drive = config.drives.get(drive_id)
            if drive is None:
                raise ClusterError(f"no drive {drive_id}")
            if state not in DRIVE_TRANSITIONS[drive.state]:
                raise ClusterError(f"drive {drive_id} is {drive.state}; it cannot become {state}")
            if drive.state is DriveState.ACTIVE and state is not DriveState.FAILED:  # a failure is a fact
                _check_capacity(config, observed.drive_reports, f"taking drive {drive_id} out of service",
                                exclude={drive_id})
            new = replace(drive, state=state, changed=time.time())
            changed[:] = [new]
            severity = Severity.WARNING if state is DriveState.FAILED else Severity.INFO
            message = f"drive {drive_id} on {drive.node}: {drive.state} -> {state}" + (
                f" ({reason})" if reason else "")
            return [put_op(DRIVES + str(drive_id), dumps(new)),
                    event_op(f"drive.{state}", new.name, message, severity)]

        await self.change(plan)
        return changed[0]

    async def create_fs(self, name: str, capacity: int) -> FileSystem:
        observed = await self.observed()
        created: list[FileSystem] = []

        def plan(config: Config) -> Ops:
            _require_cluster(config)
            if name in config.filesystems:
                raise ClusterError(f"file system {name} already exists")
            fs = FileSystem(name, config.next_id("fs"), capacity, time.time())
            usable = config.usable_capacity(observed.drive_reports)
            if config.provisioned() + capacity > usable:
                raise ClusterError(
                    f"file system {name}: {human_size(capacity)} does not fit: {human_size(usable)} usable, "
                    f"{human_size(config.provisioned())} already provisioned")
            created[:] = [fs]
            return [put_op(FILESYSTEMS + name, dumps(fs)), put_op(COUNTERS + "fs", str(fs.id)),
                    event_op("fs.created", f"fs/{name}",
                             f"file system {name} created ({human_size(capacity)})")]

        await self.change(plan)
        return created[0]

    async def delete_fs(self, name: str) -> None:
        def plan(config: Config) -> Ops:
            _require_cluster(config)
            if name not in config.filesystems:
                raise ClusterError(f"no file system {name!r}")
            return [delete_op(FILESYSTEMS + name),
                    event_op("fs.deleted", f"fs/{name}", f"file system {name} deleted")]

        await self.change(plan)

    # --- observed state, written by backends --------------------------------------------------------

    async def report_drive(self, drive_id: int, report: DriveReport) -> None:
        await self.etcd.put(DRIVE_STATE + str(drive_id), dumps(report))

    async def mark_health(self, node: str, state: Health, manager_value: bytes, why: str) -> bool:
        """Record a node's health and its event, only while ``manager_value`` is still the manager key."""
        now = time.time()
        severity = Severity.WARNING if state is Health.DOWN else Severity.INFO
        result = await self.etcd.txn(
            [value_is(MANAGER_KEY, manager_value), version_is(NODES + node, 0, "!=")],
            [put_op(NODE_HEALTH + node, dumps(NodeHealth(state, now))),
             event_op(f"node.{state}", node, f"node {node} is {state}: {why}", severity, now)],
        )
        return result.succeeded

    # --- bucket leases ------------------------------------------------------------------------------

    async def acquire_bucket(self, bucket: int, owner: str, lease: int) -> BucketOwner | None:
        """Take a free bucket under ``lease``: its epoch goes up by one, atomically with taking it.

        Returns None when someone else owns it. The new owner's epoch is greater than every earlier
        owner's, so journal writes stamped by a deposed owner can be recognised and ignored.
        """
        if not 0 <= bucket < MAX_BUCKETS:
            raise ClusterError(f"bucket {bucket}: must be in 0..{MAX_BUCKETS - 1}")
        epoch_key = f"{BUCKET_EPOCHS}{bucket:05d}"
        for _ in range(CHANGE_ATTEMPTS):
            current = await self.etcd.get(epoch_key)
            epoch = int(current.value) + 1 if current else 1
            record = BucketOwner(bucket, owner, epoch, lease)
            result = await self.etcd.txn(
                [version_is(f"{BUCKETS}{bucket:05d}", 0),
                 mod_revision_is(epoch_key, current.mod_revision if current else 0)],
                [put_op(f"{BUCKETS}{bucket:05d}", dumps(record), lease=lease), put_op(epoch_key, str(epoch))],
            )
            if result.succeeded:
                return record
            if await self.etcd.get(f"{BUCKETS}{bucket:05d}") is not None:
                return None
        raise ClusterError(f"bucket {bucket}: ownership kept changing; try again")

    async def release_bucket(self, owner: BucketOwner) -> bool:
        """Give a bucket up, only if ``owner`` (this epoch) still holds it."""
        key = f"{BUCKETS}{owner.bucket:05d}"
        result = await self.etcd.txn([value_is(key, dumps(owner))], [delete_op(key)])
        return result.succeeded

    async def bucket_owners(self) -> dict[int, BucketOwner]:
        return {int(kv.key[len(BUCKETS):]): parse_record(kv.key, kv.value, BucketOwner)
                for kv in await self.etcd.get_prefix(BUCKETS)}


_COLLECTIONS: dict[str, tuple[str, Any]] = {NODES: ("nodes", Node), DRIVES: ("drives", Drive),
                                            FILESYSTEMS: ("filesystems", FileSystem)}


def _load(config: Config, kv: KeyValue) -> None:
    if kv.key == GEN_KEY:
        config.gen_revision, config.generation = kv.mod_revision, _number(kv, kv.value.split()[:1])
    elif kv.key == CLUSTER_KEY:
        config.cluster = parse_record(kv.key, kv.value, ClusterInfo)
    elif kv.key.startswith(COUNTERS):
        config.counters[kv.key[len(COUNTERS):]] = _number(kv, [kv.value])
    else:
        for prefix, (attr, cls) in _COLLECTIONS.items():
            if kv.key.startswith(prefix):
                record = parse_record(kv.key, kv.value, cls)
                getattr(config, attr)[record.id if cls is Drive else record.name] = record


@dataclass(frozen=True)
class _SchemaRecord:
    version: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _SchemaRecord:
        if not isinstance(d.get("version"), int):
            raise ValueError("version is not a number")
        return cls(d["version"])


def _number(kv: KeyValue, parts: list[bytes]) -> int:
    try:
        return int(parts[0])
    except (IndexError, ValueError):
        raise ClusterError(f"etcd key {kv.key}: damaged record (not a number: {kv.value[:40]!r})") from None


def _require_cluster(config: Config) -> ClusterInfo:
    if config.cluster is None:
        raise ClusterError("no cluster here yet: create one with `kahu cluster create` (or `kahu up`)")
    return config.cluster


def _require_node(config: Config, name: str) -> Node:
    if name not in config.nodes:
        raise ClusterError(f"no node {name!r} (nodes: {', '.join(sorted(config.nodes)) or 'none'})")
    return config.nodes[name]


def _check_new_nodes(existing: dict[str, Node], new: list[Node]) -> None:
    """Names unique; no two nodes listening on one address and port."""
    taken = {ep: n.name for n in existing.values() for ep in n.endpoints}
    names = set(existing)
    for node in new:
        if node.name in names:
            raise ClusterError(f"node {node.name} already exists")
        for ep in sorted(node.endpoints):
            if ep in taken:
                raise ClusterError(
                    f"node {node.name}: {ep[0]} port {ep[1]} is already used by node {taken[ep]}")
            taken[ep] = node.name
        names.add(node.name)


def _check_capacity(config: Config, reports: dict[int, DriveReport], action: str,
                    exclude: set[int], nodes: list[Node] | None = None) -> None:
    usable = config.usable_capacity(reports, exclude, nodes)
    if config.provisioned() > usable:
        raise ClusterError(f"{action} would leave {human_size(usable)} usable, less than the "
                           f"{human_size(config.provisioned())} provisioned to file systems")


def _describe(drive: Drive) -> str:
    parsed = drive.parsed()
    size = f", {human_size(parsed.size)}" if parsed.size else ""
    return f"{parsed.kind} {parsed.source or ''}".strip() + size
