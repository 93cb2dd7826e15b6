"""Network-namespace topologies and data-interface configuration (real namespaces, veths, a bridge)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from netns import existing_namespaces, requires_netns, start_tcp_listener, tcp_greeting
from pyroute2 import netns

from appliance.spdk_rpc.netconf import NetconfError, Topology, cleanup_stale, configure_data_interfaces
from appliance.spdk_rpc.nodeconfig import parse_node_config

pytestmark = requires_netns
PORT = 7000


def test_two_nodes_reach_each_other_and_everything_is_gone_after() -> None:
    with Topology(2) as topo:
        names = topo.namespaces
        assert set(names) <= existing_namespaces()
        n1, n2 = topo.nodes
        assert (n1.address, n2.address) == ("10.77.0.11", "10.77.0.12")
        listener = start_tcp_listener(topo, 1, PORT)
        assert tcp_greeting(topo, 2, n1.address, PORT) == f"{n1.namespace} sees {n2.address}"
        assert listener.wait(timeout=10) == 0
    assert not set(names) & existing_namespaces()


def test_teardown_after_an_exception_also_stops_spawned_processes() -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology(1) as topo:
        names = topo.namespaces
        listener = start_tcp_listener(topo, 1, PORT)  # still waiting for a client
        raise RuntimeError("boom")
    assert listener.poll() is not None
    assert not set(names) & existing_namespaces()


def test_parallel_runs_with_the_same_subnet_are_isolated() -> None:
    with Topology(1) as a, Topology(1) as b:
        assert a.node(1).address == b.node(1).address
        assert not set(a.namespaces) & set(b.namespaces)
        start_tcp_listener(a, 1, PORT)
        # The same address in b's network is b's own node, where nothing listens.
        with pytest.raises(subprocess.CalledProcessError) as refused:
            tcp_greeting(b, 1, b.node(1).address, PORT)
        assert "ConnectionRefusedError" in refused.value.stderr
        assert tcp_greeting(a, 1, a.node(1).address, PORT).startswith(a.node(1).namespace)


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"kahu-{gone.pid}-abcdef-n1"
    live = f"kahu-{os.getpid()}-abcdef-n9"
    try:
        netns.create(stale)
        netns.create(live)
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert stale not in existing_namespaces() and live in existing_namespaces()
    finally:
        for name in {stale, live} & existing_namespaces():
            netns.remove(name)


def test_topology_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="n_nodes"):
        Topology(0)
    with pytest.raises(ValueError, match="n_nodes"):
        Topology(300, subnet="10.77.0.0/24")
    with pytest.raises(ValueError, match=r"node_index: 3 is not in 1\.\.2"):
        Topology(2).node(3)


def _config(interface: str) -> dict[str, object]:
    return {
        "name": "node1",
        "allow_any_host": True,
        "drives": [{"malloc": "1MiB"}],
        "data_addresses": [{"address": "10.77.0.50/24", "interface": interface, "mtu": 1400}],
    }


def test_data_interfaces_are_configured_idempotently() -> None:
    with Topology(1) as topo:
        namespace = topo.node(1).namespace
        config = parse_node_config(_config("eth0"))
        assert configure_data_interfaces(config, namespace) == ["eth0: mtu 1400", "eth0: add 10.77.0.50/24"]
        assert configure_data_interfaces(config, namespace) == []
        (link,) = json.loads(topo.run(1, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        assert link["mtu"] == 1400
        addresses = {(a["local"], a["prefixlen"]) for a in link["addr_info"]}
        assert addresses >= {("10.77.0.50", 24), ("10.77.0.11", 24)}

        topo.run(1, ["ip", "link", "set", "eth0", "down"])
        assert configure_data_interfaces(config, namespace) == ["eth0: up"]

        with pytest.raises(NetconfError, match=r"data_addresses\[0\]\.interface: no interface 'eth9'"):
            configure_data_interfaces(parse_node_config(_config("eth9")), namespace)
