"""A whole Kahu cluster on one machine: etcd members, node backends with their drive targets.

This is the one-machine default behind ``kahu up`` and the cluster fixture of the tests, so both run
the same code. As root every node gets its own network namespace and address on a bridge (with a
link from the root namespace, so the ``kahu`` CLI reaches everything), and etcd members run inside the
first nodes, as they would on a rack; otherwise everything shares loopback with distinct ports.

Nodes are *processes*: ``kill_node`` is a crash (the node's drive target dies with its backend),
``cut_link`` a pulled cable, ``start_node`` a reboot. Everything persistent (etcd's data, drive
files) lives under ``home``, so a cluster stopped with ``stop`` comes back with ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..procs import kahu_command, kahu_env, stop_process, tied_to_parent
from ..units import format_size
from .etcd import Etcd
from .etcd_server import EtcdCluster, EtcdMemberSpec
from .schema import ClusterError, Node, ProtectionPolicy
from .store import ClusterStore

log = logging.getLogger(__name__)

SPEC_FILE = "local-cluster.json"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
NVME_PORT = 4420
DISCOVERY_PORT = 8009


def default_policy(nodes: int) -> ProtectionPolicy:
    """The widest sensible policy for ``nodes`` failure domains: m=2, a hot spare from 6 nodes, k<=4."""
    if nodes < 3:
        raise ClusterError(f"--nodes: {nodes} node(s) cannot hold 2 parity chunks plus data; use 3 or more")
    spares = 1 if nodes >= 6 else 0
    return ProtectionPolicy(min(4, nodes - 2 - spares), 2, spares)


@dataclass(frozen=True)
class LocalSpec:
    """How a one-machine cluster is laid out; stored in ``home`` so later starts rebuild the same one."""

    nodes: int = 6
    etcd_members: int = 3
    netns: bool = True
    subnet: str = "10.77.0.0/24"
    base_port: int = 24000  # loopback layout: etcd member j uses base+2j-2/-1, node i base+100+2i-2/-1
    drives_per_node: int = 1
    drive_size: int = 1 << 30
    node_timeout: int = 6
    cluster_name: str = "kahu"
    soft: bool = False  # the soft target even where SPDK is installed
    etcd_heartbeat_ms: int = 100
    etcd_election_ms: int = 1000

    def __post_init__(self) -> None:
        if not 3 <= self.nodes <= 200:
            raise ClusterError(f"--nodes: must be in 3..200, got {self.nodes}")
        if self.etcd_members not in (1, 3, 5) or self.etcd_members > self.nodes:
            raise ClusterError(
                f"--etcd-members: must be 1, 3 or 5 and at most --nodes, got {self.etcd_members}")
        if not 1 <= self.drives_per_node <= 16:
            raise ClusterError(f"--drives-per-node: must be in 1..16, got {self.drives_per_node}")

    def node_name(self, index: int) -> str:
        return f"node{index}"

    @classmethod
    def load(cls, home: Path) -> LocalSpec | None:
        try:
            data = json.loads((home / SPEC_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ClusterError(f"{home / SPEC_FILE}: unreadable ({e})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, home: Path) -> None:
        (home / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


class LocalCluster:
    """Start, break and stop a cluster of ``spec.nodes`` nodes under ``home``."""

    def __init__(self, home: Path, spec: LocalSpec):
        self.home = Path(home).resolve()
        self.spec = spec
        self.topology: Any = None  # a netconf.Topology in the namespace layout
        self.etcd: EtcdCluster | None = None
        self.backends: dict[str, subprocess.Popen[bytes]] = {}
        self.names = [spec.node_name(i) for i in range(1, spec.nodes + 1)]

    # --- layout ------------------------------------------------------------------------------------

    def node_address(self, index: int) -> str:
        return self.topology.node(index).address if self.topology else "127.0.0.1"

    def node_ports(self, index: int) -> tuple[int, int]:
        if self.spec.netns:
            return NVME_PORT, DISCOVERY_PORT
        base = self.spec.base_port + 100 + 2 * (index - 1)
        return base, base + 1

    def _etcd_members(self) -> list[EtcdMemberSpec]:
        members = []
        for j in range(1, self.spec.etcd_members + 1):
            if self.spec.netns:
                host, client, peer = self.node_address(j), ETCD_CLIENT_PORT, ETCD_PEER_PORT
                wrap = tuple(self.topology.command(j, []))
            else:
                client = self.spec.base_port + 2 * j - 2
                host, peer = "127.0.0.1", client + 1
                wrap = ()
            members.append(EtcdMemberSpec(f"etcd{j}", host, self.home / "etcd" / f"etcd{j}", client, peer,
                                          wrap, also_localhost=self.spec.netns))
        return members

    @property
    def endpoints(self) -> list[str]:
        assert self.etcd is not None
        return self.etcd.endpoints

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ClusterError(f"no node {name!r} in this cluster ({', '.join(self.names)})")
        return self.names.index(name) + 1

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Bring everything up (creating the cluster the first time); returns the seconds it took."""
        began = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.start_network()
            self.start_etcd(timeout)
            asyncio.run(self._ensure_cluster())
            self.start_nodes(self.names, timeout - (time.monotonic() - began))
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - began

    def start_network(self) -> None:
        """The namespaces, bridge and host link of the namespace layout (nothing on loopback)."""
        if self.spec.netns and self.topology is None:
            from ..spdk_rpc.netconf import Topology  # pyroute2: only needed as root

            self.topology = Topology(self.spec.nodes, self.spec.subnet, host_link=True).__enter__()

    def start_etcd(self, timeout: float = START_TIMEOUT) -> None:
        """etcd's members, on the first nodes; returns once there is a leader."""
        spec = self.spec
        self.etcd = EtcdCluster(self._etcd_members(), self.home / "logs",
                                heartbeat_ms=spec.etcd_heartbeat_ms, election_ms=spec.etcd_election_ms)
        self.etcd.start(timeout)

    async def _ensure_cluster(self) -> None:
        """Create the cluster and its nodes and drives, once; a restart finds them in etcd."""
        async with Etcd(self.endpoints) as etcd:
            store = ClusterStore(etcd)
            config = await store.config()
            if config.cluster is not None:
                return
            nodes = []
            for i, name in enumerate(self.names, 1):
                nvme, discovery = self.node_ports(i)
                nodes.append(Node(name, self.node_address(i), "", nvme, discovery))
            await store.create_cluster(self.spec.cluster_name, default_policy(self.spec.nodes), nodes,
                                       self.spec.node_timeout)
            for name in self.names:
                for d in range(self.spec.drives_per_node):
                    path = self.home / "nodes" / name / "drives" / f"drive{d}.img"
                    size = format_size(self.spec.drive_size)
                    await store.add_drive(name, {"file": str(path), "size": size})

    def start_nodes(self, names: list[str], timeout: float = START_TIMEOUT) -> None:
        """Start the backends of ``names`` together; return once each serves and the cluster's
        manager has marked it up (what ``kahu status`` shows)."""
        deadline = time.monotonic() + timeout
        self._await_ready({name: self._spawn_backend(name) for name in names}, deadline)
        asyncio.run(self.wait_up(names, deadline - time.monotonic()))

    async def wait_up(self, names: list[str], timeout: float) -> None:
        async with Etcd(self.endpoints) as etcd:
            store = ClusterStore(etcd)
            await store.wait_until(lambda s: s.all_up(names), timeout, f"nodes {', '.join(names)} up")

    def _await_ready(self, pipes: dict[str, int], deadline: float) -> None:
        """Until each backend writes READY on its pipe (or fails, or the deadline passes)."""
        names = list(pipes)
        timeout = deadline - time.monotonic()
        with selectors.DefaultSelector() as sel:
            for name, fd in pipes.items():
                sel.register(fd, selectors.EVENT_READ, name)
            waiting = set(names)
            try:
                while waiting:
                    left = deadline - time.monotonic()
                    if left <= 0 or not (ready := sel.select(left)):
                        raise ClusterError(f"nodes {', '.join(sorted(waiting))} did not start within "
                                           f"{timeout:.0f}s; see {self.home / 'logs'}")
                    for key, _ in ready:
                        name = key.data
                        line = os.read(key.fd, 64)
                        sel.unregister(key.fd)
                        waiting.discard(name)
                        if not line.startswith(b"READY"):
                            raise ClusterError(f"node {name} failed to start: {self._log_tail(name)}")
            finally:
                for fd in pipes.values():
                    os.close(fd)

    def _spawn_backend(self, name: str) -> int:
        """Start a node's backend; returns the read end of its readiness pipe."""
        index = self.index(name)
        read_fd, write_fd = os.pipe()
        argv = kahu_command("node", "serve", name, "--etcd", ",".join(self.endpoints),
                            "--home", str(self.home), "--notify-fd", str(write_fd))
        if self.spec.soft:
            argv.append("--soft")
        if self.topology is not None:
            argv = self.topology.command(index, argv)
        log_path = self.home / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            self.backends[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(write_fd,), env=kahu_env(),
                start_new_session=True, preexec_fn=tied_to_parent())
        os.close(write_fd)
        return read_fd

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.home / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Crash a node: its backend gets ``sig`` (its drive target follows, see die_with_parent)."""
        proc = self.backends.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(STOP_TIMEOUT)

    def start_node(self, name: str, timeout: float = START_TIMEOUT) -> None:
        proc = self.backends.get(name)
        if proc is not None and proc.poll() is None:
            raise ClusterError(f"node {name} is running (pid {proc.pid})")
        self.start_nodes([name], timeout)

    def cut_link(self, name: str) -> None:
        self._require_netns("cutting a node's link").set_link(self.index(name), False)

    def restore_link(self, name: str) -> None:
        self._require_netns("restoring a node's link").set_link(self.index(name), True)

    def _require_netns(self, what: str) -> Any:
        if self.topology is None:
            raise ClusterError(f"{what} needs the network-namespace layout (root)")
        return self.topology

    def stop(self) -> None:
        """Backends first (each stops its target and ends its heartbeat), then etcd, then the network."""
        for proc in self.backends.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.backends.values():
            stop_process(proc, STOP_TIMEOUT)
        if self.etcd is not None:
            self.etcd.stop()
        if self.topology is not None:
            self.topology.__exit__(None, None, None)
            self.topology = None

    def record(self, supervisor_pid: int) -> dict[str, Any]:
        """What `kahu up` writes to ``running.json``: where the CLI finds etcd, who supervises."""
        return {"supervisor_pid": supervisor_pid, "etcd": self.endpoints,
                "nodes": {n: p.pid for n, p in self.backends.items()},
                "etcd_pids": {m.name: self.etcd.pid(m.name) for m in self.etcd.members} if self.etcd else {},
                "namespaces": self.topology.namespaces if self.topology else []}


def netns_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def resolve_spec(home: Path, requested: dict[str, Any]) -> LocalSpec:
    """The spec stored in ``home`` (a cluster made before), refusing options that contradict it;
    else a new spec from ``requested`` (None values: defaults)."""
    given = {k: v for k, v in requested.items() if v is not None}
    stored = LocalSpec.load(home)
    if stored is None:
        spec = LocalSpec(**given)
        home.mkdir(parents=True, exist_ok=True)
        spec.save(home)
        return spec
    clash = {k: v for k, v in given.items() if getattr(stored, k) != v}
    if clash:
        have = ", ".join(f"{k}={getattr(stored, k)}" for k in clash)
        raise ClusterError(f"{home} already holds a cluster made with {have}; use another --home, "
                           f"or remove {home} to start over")
    return stored


@contextlib.contextmanager
def local_cluster(home: Path, spec: LocalSpec, timeout: float = START_TIMEOUT) -> Iterator[LocalCluster]:
    """``with local_cluster(home, spec) as cluster:`` — started, and stopped also on failure."""
    cluster = LocalCluster(home, spec)
    cluster.start(timeout)
    try:
        yield cluster
    finally:
        cluster.stop()
