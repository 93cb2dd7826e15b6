"""The data network: configure a node's data interfaces, and build throwaway multi-node topologies.

``configure_data_interfaces`` brings the interfaces named in a ``NodeConfig`` to the desired state
(address present, MTU, link up) and does nothing when they already are, so it can run on every start.

``Topology`` is how tests (and demos) get several "hosts" on one machine: one network namespace per
node, each with a veth into a bridge that lives in its own namespace, so nothing touches the root
namespace and all interface names can be fixed (``eth0`` in a node, ``br0`` and ``n1``.. beside the
bridge). Namespace names carry the creating process's PID and a random token
(``kahu-<pid>-<token>-n1``), so parallel runs never collide, and namespaces left by a run that died
(its PID gone) are removed by the next one.

With ``host_link=True`` one veth also reaches from the root namespace into the bridge (``kh<token>``
outside, ``host`` beside the bridge, ``<subnet>.1`` on the root side), so processes on the host itself
(the ``kahu`` CLI, an etcd) and the nodes reach each other. ``set_link`` pulls a node's cable (its
bridge port goes down) without killing anything, to test partitions.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import socket
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from ..procs import process_alive, stop_process
from .nodeconfig import NodeConfig

IFF_UP = 0x1
NODE_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
HOST_PORT_IFNAME = "host"  # the bridge-side end of the host link
HOST_LINK_PREFIX = "kh"  # the root-side end: kh<token>, 8 characters (the kernel allows 15)
FIRST_HOST = 11  # node n1 gets <subnet>.11, as in 10.77.0.11
STOP_TIMEOUT = 5.0
_RUN_NS_RE = re.compile(r"^kahu-(\d+)-([0-9a-f]{6})-(br|n\d+)$")
_HOST_LINK_RE = re.compile(rf"^{HOST_LINK_PREFIX}([0-9a-f]{{6}})$")


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
    """Remove what runs whose process no longer exists left behind; return the names removed.

    That is their namespaces, then root-side host links (``kh<token>`` veths) whose bridge namespace
    is gone. Such a veth disappears by itself once its peer's namespace is destroyed, but the kernel
    destroys namespaces asynchronously, and not at all while some process still holds one, so the
    link is deleted explicitly here rather than assumed gone.
    """
    removed = []
    for name in netns.listnetns():
        match = _RUN_NS_RE.match(name)
        if match and not process_alive(int(match.group(1))):
            netns.remove(name)
            removed.append(name)
    with IPRoute() as ipr:
        # Links first, namespaces second: a run creates its bridge namespace before its host link and
        # deletes the link before the namespace, so a live run's link always finds its namespace here.
        candidates = []
        for link in ipr.get_links():
            ifname = link.get_attr("IFLA_IFNAME") or ""
            if (match := _HOST_LINK_RE.match(ifname)) and _link_kind(link) == "veth":
                candidates.append((link["index"], ifname, match.group(1)))
        live_tokens = {
            m.group(2) for name in netns.listnetns() if (m := _RUN_NS_RE.match(name)) and m.group(3) == "br"
        }
        for index, ifname, token in candidates:
            if token not in live_tokens:
                _delete_link(ipr, index)
                removed.append(ifname)
    return removed


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _delete_link(ipr: Any, index: int) -> None:
    """Delete a link that may vanish on its own meanwhile (its peer's namespace being destroyed)."""
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def _addresses_in(ipr: Any, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, str]]:
    """(link index, "address/prefixlen on ifname") for each address whose network overlaps ``network``."""
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    found = []
    for addr in ipr.get_addr(family=family):
        ip = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
        interface = ipaddress.ip_interface(f"{ip}/{addr['prefixlen']}")
        if interface.network.overlaps(network):
            found.append((addr["index"], f"{interface} on {names.get(addr['index'], addr['index'])}"))
    return found


class Topology:
    """``n_nodes`` network namespaces on one bridge; torn down on exit, also after an exception."""

    def __init__(
        self, n_nodes: int, subnet: str = "10.77.0.0/24", mtu: int | None = None, host_link: bool = False
    ):
        network = ipaddress.ip_network(subnet)
        if not 1 <= n_nodes <= network.num_addresses - FIRST_HOST - 1:
            raise ValueError(f"n_nodes: {n_nodes} nodes do not fit in {subnet} (first host .{FIRST_HOST})")
        token = secrets.token_hex(3)
        self.run_id = f"{os.getpid()}-{token}"
        self.network = network
        self.mtu = mtu
        self.bridge_namespace = f"kahu-{self.run_id}-br"
        # Only the token: the PID would not fit in an interface name; cleanup_stale maps it back.
        self.host_ifname: str | None = f"{HOST_LINK_PREFIX}{token}" if host_link else None
        self.nodes = [
            TopologyNode(i, f"kahu-{self.run_id}-n{i}", str(network.network_address + FIRST_HOST + i - 1))
            for i in range(1, n_nodes + 1)
        ]
        self._created: list[str] = []
        self._host_link_created = False
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

    @property
    def host_address(self) -> str | None:
        """The root namespace's address on the topology's network (``<subnet>.1``), if it has a host link."""
        return str(self.network.network_address + 1) if self.host_ifname else None

    def set_link(self, index: int, up: bool) -> None:
        """Pull (or plug back) node ``index``'s cable: its bridge port goes down, nothing is killed.

        Packets to and from the node are dropped at the bridge, so connections stall and connection
        attempts time out, as with a real pulled cable; after ``up=True`` TCP retransmits recover.
        The node keeps its ``eth0`` administratively up; it only loses carrier.
        """
        self.node(index)
        with self._bridge_ns() as br:
            br.link("set", index=br.link_lookup(ifname=f"n{index}")[0], state="up" if up else "down")

    def link_up(self, index: int) -> bool:
        """Whether node ``index``'s cable is plugged in (its bridge port administratively up)."""
        self.node(index)
        with self._bridge_ns() as br:
            (link,) = br.link("get", index=br.link_lookup(ifname=f"n{index}")[0])
            return bool(link["flags"] & IFF_UP)

    def _bridge_ns(self) -> Any:
        """The bridge namespace; an error, rather than a fresh empty namespace, once it is gone."""
        if self.bridge_namespace not in self._created:
            raise NetconfError(f"topology {self.run_id} is not set up")
        return NetNS(self.bridge_namespace, flags=0)

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
        """Stop the spawned processes, delete the host link, then every namespace (their links go too).

        The host link goes first and explicitly: deleting the bridge namespace would take it along,
        but only once the kernel gets round to destroying that namespace, and ``cleanup_stale`` in
        another run relies on a live host link always having its bridge namespace.
        """
        try:
            for proc in self._processes:
                stop_process(proc, STOP_TIMEOUT)
            self._processes.clear()
            if self._host_link_created:
                with IPRoute() as ipr:
                    for index in ipr.link_lookup(ifname=self.host_ifname):
                        _delete_link(ipr, index)
                self._host_link_created = False
        finally:
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
        if self.host_ifname:
            self._build_host_link()

    def _check_subnet_free(self, ipr: Any, own_index: int | None = None) -> None:
        """Refuse a subnet the root namespace already routes elsewhere: two links with one address."""
        taken = [desc for index, desc in _addresses_in(ipr, self.network) if index != own_index]
        if taken:
            raise NetconfError(
                f"host_link: the root namespace already has {', '.join(taken)}, in or overlapping "
                f"{self.network} (another topology with a host link?); use another subnet"
            )

    def _build_host_link(self) -> None:
        assert self.host_ifname is not None and self.host_address is not None
        with IPRoute() as ipr:
            self._check_subnet_free(ipr)
            peer = {"ifname": HOST_PORT_IFNAME, "net_ns_fd": self.bridge_namespace}
            ipr.link("add", ifname=self.host_ifname, kind="veth", peer=peer)
            self._host_link_created = True
            (index,) = ipr.link_lookup(ifname=self.host_ifname)
            ipr.addr("add", index=index, address=self.host_address, prefixlen=self.network.prefixlen)
            # Checked again with our address in place: of two runs racing for one subnet, at most one wins.
            self._check_subnet_free(ipr, own_index=index)
            ipr.link("set", index=index, state="up", **self._mtu())
        with NetNS(self.bridge_namespace, flags=0) as br:
            bridge = br.link_lookup(ifname=BRIDGE_IFNAME)[0]
            port = br.link_lookup(ifname=HOST_PORT_IFNAME)[0]
            br.link("set", index=port, master=bridge, state="up", **self._mtu())

    def _mtu(self) -> dict[str, int]:
        return {"mtu": self.mtu} if self.mtu else {}
