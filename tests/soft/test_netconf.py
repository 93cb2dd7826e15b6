"""Network-namespace topologies and data-interface configuration (real namespaces, veths, a bridge)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from netns import (
    existing_namespaces,
    recv_all,
    requires_netns,
    root_links,
    spawn_tcp_client,
    start_tcp_listener,
    tcp_greeting,
    wait_for_link_deletion,
)
from pyroute2 import IPRoute, netns

from appliance.spdk_rpc.netconf import NetconfError, Topology, cleanup_stale, configure_data_interfaces
from appliance.spdk_rpc.nodeconfig import parse_node_config

pytestmark = requires_netns
PORT = 7000
# Host links put addresses in the root namespace, shared with every other run on the machine: subnets of
# their own, away from the default one, so these tests do not refuse (or get refused by) other runs.
HOST_SUBNET = "10.79.1.0/24"
OTHER_HOST_SUBNET = "10.79.2.0/24"
CUT_TIMEOUT = 1.0  # connect timeout while a link is cut: the attempt must time out, so keep it short


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


def test_root_namespace_and_nodes_reach_each_other_over_the_host_link() -> None:
    with Topology(2, subnet=HOST_SUBNET, host_link=True) as topo:
        ifname = topo.host_ifname
        assert ifname is not None and re.fullmatch(r"kh[0-9a-f]{6}", ifname)
        assert topo.run_id.endswith(ifname[2:])  # the run's token: unique per run
        assert topo.host_address == "10.79.1.1" and ifname in root_links()
        n1, n2 = topo.nodes

        listener = start_tcp_listener(topo, 1, PORT)
        with socket.create_connection((n1.address, PORT), timeout=10) as conn:
            assert recv_all(conn) == f"{n1.namespace} sees {topo.host_address}"
        assert listener.wait(timeout=10) == 0

        with socket.create_server((topo.host_address, PORT)) as server:
            server.settimeout(10)
            client = spawn_tcp_client(topo, 2, topo.host_address, PORT)
            conn, peer = server.accept()
            with conn:
                conn.sendall(b"root says hello")
        out, err = client.communicate(timeout=10)
        assert (client.returncode, out.strip(), peer[0]) == (0, "root says hello", n2.address), err
    assert ifname not in root_links()


def test_no_host_link_unless_asked() -> None:
    topo = Topology(1)
    assert (topo.host_ifname, topo.host_address) == (None, None)


def test_host_link_goes_by_itself_with_its_bridge_namespace_and_close_copes() -> None:
    with Topology(1, subnet=HOST_SUBNET, host_link=True) as topo:
        assert topo.host_ifname is not None
        # The kernel deletes a veth whose peer's namespace is destroyed (asynchronously: hence the wait).
        wait_for_link_deletion(topo.host_ifname, lambda: netns.remove(topo.bridge_namespace))
    assert not set(topo.namespaces) & existing_namespaces()


def test_teardown_after_an_exception_removes_the_host_link() -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology(1, subnet=HOST_SUBNET, host_link=True) as topo:
        assert topo.host_ifname in root_links()
        raise RuntimeError("boom")
    assert topo.host_ifname not in root_links()
    assert not set(topo.namespaces) & existing_namespaces()


def test_a_second_host_link_on_the_same_subnet_is_refused() -> None:
    with Topology(1, subnet=HOST_SUBNET, host_link=True) as first:
        for subnet in (HOST_SUBNET, "10.79.0.0/16"):  # the same subnet, or one overlapping it
            second = Topology(1, subnet=subnet, host_link=True)
            refused = rf"already has 10\.79\.1\.1/24 on {first.host_ifname}"
            with pytest.raises(NetconfError, match=refused), second:
                pass
            assert second.host_ifname not in root_links()
            assert not set(second.namespaces) & existing_namespaces()
        with Topology(1, subnet=OTHER_HOST_SUBNET, host_link=True) as other:  # another subnet is fine
            assert other.host_address == "10.79.2.1"
        # Without a host link nothing goes into the root namespace, so the same subnet is fine too.
        with Topology(1, subnet=HOST_SUBNET):
            pass
        assert first.host_ifname in root_links()


@pytest.fixture
def stale_run_ids() -> Iterator[list[str]]:
    """Collects fake runs' namespaces and links to remove should the test fail half-way."""
    made: list[str] = []
    yield made
    with IPRoute() as ipr:
        for name in made:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
    for name in set(made) & existing_namespaces():
        netns.remove(name)


def test_stale_host_links_are_removed(stale_run_ids: list[str]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, orphan, live = (secrets.token_hex(3) for _ in range(3))
    dead_ns, live_ns = f"kahu-{gone.pid}-{dead}-br", f"kahu-{os.getpid()}-{live}-br"
    with IPRoute() as ipr:
        for ns in (dead_ns, live_ns):
            netns.create(ns)
            stale_run_ids.append(ns)
        for token, ns in ((dead, dead_ns), (live, live_ns)):
            stale_run_ids.append(f"kh{token}")
            ipr.link("add", ifname=f"kh{token}", kind="veth", peer={"ifname": "host", "net_ns_fd": ns})
        # A host link whose bridge namespace is gone but which lives on (here: its peer is in the root).
        stale_run_ids.append(f"kh{orphan}")
        ipr.link("add", ifname=f"kh{orphan}", kind="veth", peer={"ifname": f"kx{orphan}"})
    removed = cleanup_stale()
    # The dead run's link may already have gone with its namespace, before cleanup_stale looked at links.
    assert {dead_ns, f"kh{orphan}"} <= set(removed) <= {dead_ns, f"kh{orphan}", f"kh{dead}"}
    links = root_links()
    assert not {f"kh{dead}", f"kh{orphan}", f"kx{orphan}"} & links and f"kh{live}" in links
    assert live_ns in existing_namespaces()


def test_a_cut_link_stalls_that_node_only_until_it_is_restored() -> None:
    with Topology(3, subnet="10.79.3.0/24") as topo:
        n1, n2, n3 = topo.nodes
        listeners = [start_tcp_listener(topo, i, PORT) for i in (1, 2, 3)]
        topo.set_link(2, False)
        assert [topo.link_up(i) for i in (1, 2, 3)] == [True, False, True]
        # Into and out of the cut node, at once; both must time out (not be refused: nothing answers).
        into = spawn_tcp_client(topo, 1, n2.address, PORT, timeout=CUT_TIMEOUT)
        out_of = spawn_tcp_client(topo, 2, n1.address, PORT, timeout=CUT_TIMEOUT)
        assert tcp_greeting(topo, 1, n3.address, PORT) == f"{n3.namespace} sees {n1.address}"
        for client in (into, out_of):
            _, err = client.communicate(timeout=CUT_TIMEOUT + 10)
            assert client.returncode != 0 and "TimeoutError" in err, err
        # The cut node keeps its interface up; it only loses carrier (as with a pulled cable).
        (eth0,) = json.loads(topo.run(2, ["ip", "-j", "link", "show", "eth0"]).stdout)
        assert "UP" in eth0["flags"] and "NO-CARRIER" in eth0["flags"]

        topo.set_link(2, True)
        assert topo.link_up(2)
        # Both at once: either may wait up to a second for the ARP retry still pending from the cut.
        back = [spawn_tcp_client(topo, 1, n2.address, PORT), spawn_tcp_client(topo, 2, n1.address, PORT)]
        greetings = [client.communicate(timeout=15)[0].strip() for client in back]
        assert greetings == [f"{n2.namespace} sees {n1.address}", f"{n1.namespace} sees {n2.address}"]
        assert [listener.wait(timeout=10) for listener in listeners] == [0, 0, 0]


def test_link_arguments_are_checked() -> None:
    topo = Topology(2)
    with pytest.raises(NetconfError, match="not set up"):
        topo.set_link(1, False)
    assert topo.bridge_namespace not in existing_namespaces()  # and was not created by asking
    with topo:
        for bad in (0, 3):
            with pytest.raises(ValueError, match=rf"node_index: {bad} is not in 1\.\.2"):
                topo.set_link(bad, False)
            with pytest.raises(ValueError, match=rf"node_index: {bad} is not in 1\.\.2"):
                topo.link_up(bad)
    with pytest.raises(NetconfError, match="not set up"):
        topo.link_up(1)


def test_spawned_processes_can_have_their_own_session() -> None:
    with Topology(1) as topo:
        argv = [sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid())"]
        proc = topo.spawn(1, argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.communicate(timeout=10)[0].strip() == "True"
