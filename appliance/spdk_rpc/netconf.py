"""The data network: configure a node's data interfaces, and build throwaway multi-node topologies.

``configure_data_interfaces`` brings the interfaces named in a ``NodeConfig`` to the desired state
(address present, MTU, link up) and does nothing when they already are, so it can run on every start.

``Topology`` is how tests (and demos) get several "hosts" on one machine: one network namespace per
node, each with a veth into a bridge that lives in its own namespace, so nothing touches the root
namespace and all interface names can be fixed (``eth0`` in a node, ``br0`` and ``n1``.. beside the
bridge). Namespace names carry the creating process's PID and a random token
(``kahu-<pid>-<token>-n1``), so parallel runs never collide, and namespaces left by a run that died
(its PID gone) are removed by the next one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

from ..procs import stop_process
from .nodeconfig import NodeConfig

IFF_UP = 0x1
NODE_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
FIRST_HOST = 11  # node n1 gets <subnet>.11, as in 10.77.0.11
STOP_TIMEOUT = 5.0
_RUN_NS_RE = re.compile(r"^kahu-(\d+)-[0-9a-f]{6}-(br|n\d+)$")


class NetconfError(OSError):
    """A data interface or topology cannot be set up."""


# --- data interfaces --------------------------------------------------------------------------------


def configure_data_interfaces(config: NodeConfig, namespace: str | None = None) -> list[str]:
    """Make each data address with an ``interface`` present, with its MTU, on an up link.

    Returns what was changed (empty when everything already matched). ``namespace`` runs it inside a
    named network namespace instead of the current one.
    """
    changes: list[str] = []
    with _ipr(namespace) as ipr:
        for i, addr in enumerate(config.data_addresses):
            if addr.interface is None:
                continue
            found = ipr.link_lookup(ifname=addr.interface)
            if not found:
                raise NetconfError(f"data_addresses[{i}].interface: no interface {addr.interface!r}")
            index = found[0]
            link = ipr.link("get", index=index)[0]
            if addr.mtu is not None and link.get_attr("IFLA_MTU") != addr.mtu:
                ipr.link("set", index=index, mtu=addr.mtu)
                changes.append(f"{addr.interface}: mtu {addr.mtu}")
            present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            ip = ipaddress.ip_address(addr.address)
            if str(ip) not in present:
                prefixlen = addr.prefixlen if addr.prefixlen is not None else ip.max_prefixlen
                ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen)
                changes.append(f"{addr.interface}: add {ip}/{prefixlen}")
            if not link["flags"] & IFF_UP:
                ipr.link("set", index=index, state="up")
                changes.append(f"{addr.interface}: up")
    return changes


def _ipr(namespace: str | None) -> Any:
    return NetNS(namespace) if namespace else IPRoute()


# --- test topology ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopologyNode:
    index: int  # 1-based, as in the namespace name ("...-n1")
    namespace: str
    address: str
    ifname: str = NODE_IFNAME


def cleanup_stale() -> list[str]:
    """Remove topology namespaces whose creating process no longer exists; return their names."""
    removed = []
    for name in netns.listnetns():
        match = _RUN_NS_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            netns.remove(name)
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Topology:
    """``n_nodes`` network namespaces on one bridge; torn down on exit, also after an exception."""

    def __init__(self, n_nodes: int, subnet: str = "10.77.0.0/24", mtu: int | None = None):
        network = ipaddress.ip_network(subnet)
        if not 1 <= n_nodes <= network.num_addresses - FIRST_HOST - 1:
            raise ValueError(f"n_nodes: {n_nodes} nodes do not fit in {subnet} (first host .{FIRST_HOST})")
        self.run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.network = network
        self.mtu = mtu
        self.bridge_namespace = f"kahu-{self.run_id}-br"
        self.nodes = [
            TopologyNode(i, f"kahu-{self.run_id}-n{i}", str(network.network_address + FIRST_HOST + i - 1))
            for i in range(1, n_nodes + 1)
        ]
        self._created: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Topology:
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def node(self, index: int) -> TopologyNode:
        if not 1 <= index <= len(self.nodes):
            raise ValueError(f"node_index: {index} is not in 1..{len(self.nodes)}")
        return self.nodes[index - 1]

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_namespace, *(n.namespace for n in self.nodes)]

    def command(self, node_index: int, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside the node's namespace."""
        return ["ip", "netns", "exec", self.node(node_index).namespace, *argv]

    def run(
        self, node_index: int, argv: list[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a node; output is captured as text."""
        return subprocess.run(
            self.command(node_index, argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def spawn(self, node_index: int, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside a node; it is stopped when the topology closes."""
        proc = subprocess.Popen(self.command(node_index, argv), **popen_kwargs)
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop the spawned processes, then delete every namespace (their links go with them)."""
        for proc in self._processes:
            stop_process(proc, STOP_TIMEOUT)
        self._processes.clear()
        existing = set(netns.listnetns())
        for name in reversed(self._created):
            if name in existing:
                netns.remove(name)
        self._created.clear()

    def _create_namespace(self, name: str) -> None:
        netns.create(name)
        self._created.append(name)

    def _build(self) -> None:
        self._create_namespace(self.bridge_namespace)
        for node in self.nodes:
            self._create_namespace(node.namespace)
        with NetNS(self.bridge_namespace) as br:
            br.link("add", ifname=BRIDGE_IFNAME, kind="bridge")
            bridge = br.link_lookup(ifname=BRIDGE_IFNAME)[0]
            for node in self.nodes:
                port = f"n{node.index}"
                peer = {"ifname": NODE_IFNAME, "net_ns_fd": node.namespace}
                br.link("add", ifname=port, kind="veth", peer=peer)
                br.link("set", index=br.link_lookup(ifname=port)[0], master=bridge, state="up", **self._mtu())
            br.link("set", index=bridge, state="up", **self._mtu())
        for node in self.nodes:
            with NetNS(node.namespace) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth = ns.link_lookup(ifname=NODE_IFNAME)[0]
                ns.addr("add", index=eth, address=node.address, prefixlen=self.network.prefixlen)
                ns.link("set", index=eth, state="up", **self._mtu())

    def _mtu(self) -> dict[str, int]:
        return {"mtu": self.mtu} if self.mtu else {}
