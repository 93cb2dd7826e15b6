"""ClusterStore (appliance.cluster.store) against a real one-member etcd on loopback: creating a cluster,
membership, drives and their states, file systems and capacity, concurrent admin changes, schema and
damaged records, bucket leases with epochs, the event log and the manager's fenced health marks.

Every refusal is checked twice: the error says why, and etcd holds exactly what it held before (every
key under ``/kahu/`` and the store's revision, which any write would have moved).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from clusters import make_etcd
from conftest import run

from appliance.cli.drive import drive_spec
from appliance.cluster.etcd import Etcd, KeyValue
from appliance.cluster.etcd_server import EtcdCluster
from appliance.cluster.schema import (
    BUCKET_EPOCHS,
    BUCKETS,
    CLUSTER_KEY,
    COUNTERS,
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
    Config,
    DriveReport,
    DriveState,
    FileSystem,
    Health,
    Heartbeat,
    Node,
    ProtectionPolicy,
    Severity,
    dumps,
)
from appliance.cluster.store import ClusterStore, event_op

POLICY_1_2 = ProtectionPolicy(1, 2)
POLICY_2_2 = ProtectionPolicy(2, 2)
MiB = 1 << 20
GiB = 1 << 30
SCENARIO_TIMEOUT = 15.0

Snapshot = tuple[dict[str, bytes], int]


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the whole module (starting one per test would dominate the run time)."""
    with make_etcd(tmp_path_factory.mktemp("etcd"), 1) as cluster:
        yield cluster


@pytest.fixture
def endpoints(etcd_server: EtcdCluster) -> list[str]:
    """The shared member's client URLs, with ``/kahu/`` wiped: every test starts from no cluster."""

    async def wipe() -> None:
        async with Etcd(etcd_server.endpoints) as etcd:
            await etcd.delete("/kahu/", prefix=True)

    run(wipe(), 10.0)
    return etcd_server.endpoints


def scenario(endpoints: list[str], body: Callable[[ClusterStore], Awaitable[None]],
             timeout: float = SCENARIO_TIMEOUT) -> None:
    """Run ``body(store)`` on a fresh client and event loop, bounded in time."""

    async def main() -> None:
        async with Etcd(endpoints) as etcd:
            await body(ClusterStore(etcd))

    run(main(), timeout)


async def snapshot(etcd: Etcd) -> Snapshot:
    """Every key under /kahu/ with its value, and the store revision they were read at."""
    kvs, revision = await etcd.get_prefix_at("/kahu/")
    return {kv.key: kv.value for kv in kvs}, revision


async def refused(store: ClusterStore, action: Callable[[], Awaitable[Any]], match: str,
                  error: type[Exception] = ClusterError) -> str:
    """``action()`` raises ``error`` matching ``match`` and changes nothing in etcd; returns the message."""
    before = await snapshot(store.etcd)
    with pytest.raises(error, match=match) as caught:
        await action()
    after = await snapshot(store.etcd)
    assert after[0] == before[0], "a refused command changed keys"
    assert after[1] == before[1], "a refused command wrote to etcd"
    return str(caught.value)


def make_nodes(count: int, domains: int = 0, first: int = 1) -> list[Node]:
    """``node<i>`` at 10.0.0.<i>; with ``domains``, spread round-robin over racks rack0..."""
    return [Node(f"node{i}", f"10.0.0.{i}", f"rack{i % domains}" if domains else "")
            for i in range(first, first + count)]


async def kinds(store: ClusterStore, limit: int = 100) -> list[str]:
    return [e.kind for e in await store.events(limit)]


async def create(store: ClusterStore, policy: ProtectionPolicy = POLICY_2_2,
                 nodes: list[Node] | None = None, drive_size: int = 0) -> Config:
    """A cluster (default: 2+2 on node1..node4), optionally one file drive of ``drive_size`` per node."""
    nodes = make_nodes(4) if nodes is None else nodes
    await store.create_cluster("test", policy, nodes, 6)
    if drive_size:
        for n in nodes:
            await store.add_drive(n.name, {"file": f"/srv/{n.name}/d.img", "size": drive_size})
    return await store.config()


def usable_formula(raw: int, k: int, m: int, spares: int, domains: int) -> int:
    """usable = raw x k/(k+m) x (domains - spares)/domains, in whole bytes."""
    return raw * k * (domains - spares) // ((k + m) * domains)


# --- create_cluster ---------------------------------------------------------------------------------


def test_create_cluster_writes_everything_in_one_step(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        nodes = [*make_nodes(5), Node("node6", "10.0.0.6", "rackx", 4430, 8010)]
        info = await store.create_cluster("alpha", ProtectionPolicy(3, 2, 1), nodes, 9)
        kvs, revision = await snapshot(etcd)

        assert json.loads(kvs[SCHEMA_KEY]) == {"version": SCHEMA_VERSION}
        cluster = json.loads(kvs[CLUSTER_KEY])
        assert cluster["name"] == "alpha" and cluster["uuid"] == info.uuid and len(info.uuid) == 36
        assert cluster["policy"] == {"data": 3, "parity": 2, "hot_spares": 1}
        assert cluster["node_timeout"] == 9 and info.heartbeat_ttl == 8
        assert sorted(k for k in kvs if k.startswith(NODES)) == [NODES + f"node{i}" for i in range(1, 7)]
        node6 = json.loads(kvs[NODES + "node6"])
        assert (node6["address"], node6["failure_domain"], node6["nvme_port"], node6["discovery_port"]) == (
            "10.0.0.6", "rackx", 4430, 8010)
        assert node6["added"] == pytest.approx(info.created)
        events = [k for k in kvs if k.startswith(EVENTS)]
        assert len(events) == 1
        event = json.loads(kvs[events[0]])
        assert event["kind"] == "cluster.created" and event["subject"] == "alpha"
        assert "3+2+1s" in event["message"] and "6 node(s)" in event["message"]
        assert kvs[GEN_KEY].split()[0] == b"1"  # the generation (possibly with a stamp after it)

        # all of it in one transaction: every key carries the same revision
        all_kvs = await etcd.get_prefix("/kahu/")
        assert {kv.mod_revision for kv in all_kvs} == {revision}

        config = await store.config()
        assert config.cluster == info and config.generation == 1
        assert set(config.nodes) == {f"node{i}" for i in range(1, 7)}
        assert len(config.failure_domains()) == 6

    scenario(endpoints, body)


def _policy(k: int, m: int, s: int = 0) -> Callable[[ClusterStore], Awaitable[Any]]:
    return lambda store: store.create_cluster("c", ProtectionPolicy(k, m, s), make_nodes(8))


def _nodes(nodes: Callable[[], list[Node]], policy: ProtectionPolicy = POLICY_1_2,
           timeout: int | None = 6) -> Callable[[ClusterStore], Awaitable[Any]]:
    return lambda store: store.create_cluster("c", policy, nodes(), timeout)


CREATE_REFUSALS: dict[str, tuple[Callable[[ClusterStore], Awaitable[Any]], str]] = {
    "policy-needs-more-nodes": (
        _nodes(lambda: make_nodes(6), ProtectionPolicy(4, 2, 1)),
        r"4\+2\+1s: 4\+2 stripes plus 1 hot spare\(s\) need 7 failure domains, the cluster has 6"),
    "six-nodes-in-two-racks": (
        _nodes(lambda: make_nodes(6, domains=2), ProtectionPolicy(1, 2)),
        r"need 3 failure domains, the cluster has 2"),
    "no-nodes": (_nodes(lambda: []), r"need 3 failure domains, the cluster has 0"),
    "m=1": (_policy(2, 1), r"parity \(m\): must be an integer in 2\.\.4, got 1"),
    "m=5": (_policy(2, 5), r"parity \(m\): must be an integer in 2\.\.4, got 5"),
    "k=0": (_policy(0, 2), r"data \(k\): must be an integer in 1\.\.16, got 0"),
    "k=17": (_policy(17, 2), r"data \(k\): must be an integer in 1\.\.16, got 17"),
    "spares=5": (_policy(1, 2, 5), r"hot spares: must be an integer in 0\.\.4, got 5"),
    "spares=-1": (_policy(1, 2, -1), r"hot spares: must be an integer in 0\.\.4, got -1"),
    "timeout=2": (_nodes(lambda: make_nodes(3), timeout=2), r"node timeout: must be an integer in 3\.\.600"),
    "timeout=601": (_nodes(lambda: make_nodes(3), timeout=601), r"node timeout: .* got 601"),
    "timeout=0": (_nodes(lambda: make_nodes(3), timeout=0), r"node timeout: .* got 0"),
    "duplicate-name": (
        _nodes(lambda: [*make_nodes(3), Node("node2", "10.0.0.9")]), r"node node2 already exists"),
    "same-address-and-port": (
        _nodes(lambda: [*make_nodes(3), Node("node4", "10.0.0.1")]),
        r"node node4: 10\.0\.0\.1 port 4420 is already used by node node1"),
    "nvme-port-on-a-discovery-port": (
        _nodes(lambda: [*make_nodes(3), Node("node4", "10.0.0.2", nvme_port=8009, discovery_port=8010)]),
        r"node node4: 10\.0\.0\.2 port 8009 is already used by node node2"),
    "bad-address": (
        _nodes(lambda: [*make_nodes(2), Node("node3", "10.0.0.300")]),
        r"node node3: address: must be an IPv4 or IPv6 address, got '10\.0\.0\.300'"),
    "bad-node-name": (_nodes(lambda: [*make_nodes(2), Node("no de", "10.0.0.3")]), r"node name: must be"),
    "bad-cluster-name": (
        lambda store: store.create_cluster("-x", ProtectionPolicy(1, 2), make_nodes(3)), r"cluster name"),
    "same-ports-on-one-node": (
        _nodes(lambda: [*make_nodes(2), Node("node3", "10.0.0.3", nvme_port=9000, discovery_port=9000)]),
        r"nvme port and discovery port are both 9000"),
}


@pytest.mark.parametrize("case", list(CREATE_REFUSALS))
def test_create_cluster_refused_writes_nothing(endpoints: list[str], case: str) -> None:
    action, match = CREATE_REFUSALS[case]

    async def body(store: ClusterStore) -> None:
        await refused(store, lambda: action(store), match)
        assert await store.etcd.get_prefix("/kahu/") == []

    scenario(endpoints, body)


def test_create_cluster_twice_refused(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        first = await store.create_cluster("one", ProtectionPolicy(1, 2), make_nodes(3))
        message = await refused(
            store, lambda: store.create_cluster("two", ProtectionPolicy(1, 2), make_nodes(3, first=10)),
            r"cluster one already exists here")
        assert first.uuid in message
        assert (await store.config()).cluster == first

    scenario(endpoints, body)


def test_commands_before_a_cluster_exist_are_refused(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        match = r"no cluster here yet: create one with `kahu cluster create`"
        await refused(store, lambda: store.require(), match)
        await refused(store, lambda: store.add_node(Node("n", "10.0.0.1")), match)
        await refused(store, lambda: store.add_drive("n", {"file": "/d.img", "size": MiB}), match)
        await refused(store, lambda: store.create_fs("fs", MiB), match)
        await refused(store, lambda: store.delete_fs("fs"), match)
        await refused(store, lambda: store.set_drive_state(1, DriveState.DRAINING), match)
        await refused(store, lambda: store.remove_node("n"), match)

    scenario(endpoints, body)


# --- nodes ------------------------------------------------------------------------------------------


def test_add_node(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        node = await store.add_node(Node("node5", "10.0.0.5", "rack9"))
        config = await store.config()
        assert config.nodes["node5"] == node and node.added > 0
        assert config.generation == 2
        events = await store.events(1)
        assert events[0].kind == "node.added" and events[0].subject == "node5"
        assert "10.0.0.5" in events[0].message and "rack9" in events[0].message

        await refused(store, lambda: store.add_node(Node("node5", "10.0.0.50")), r"node node5 already exists")
        await refused(store, lambda: store.add_node(Node("node6", "10.0.0.5")),
                      r"node node6: 10\.0\.0\.5 port 4420 is already used by node node5")
        # the same address with other ports is a second node on one machine: allowed
        await store.add_node(Node("node6", "10.0.0.5", nvme_port=4421, discovery_port=8010))
        assert set((await store.config()).nodes) == {f"node{i}" for i in range(1, 7)}

    scenario(endpoints, body)


def test_remove_node_refused_while_it_has_a_heartbeat(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        await create(store, nodes=make_nodes(5))
        lease5, _ = await etcd.lease_grant(30)
        lease1, _ = await etcd.lease_grant(30)
        try:
            await etcd.put(HEARTBEATS + "node5", dumps(Heartbeat("node5", 1234, 0.0, lease5)), lease5)
            message = await refused(store, lambda: store.remove_node("node5"), r"node node5 is up")
            assert "--force" in message
            # with force it goes, heartbeat or not
            assert await store.remove_node("node5", force=True) == []
            assert "node5" not in (await store.config()).nodes

            # once its heartbeat lease is gone the node is down, and a heartbeat of another node does
            # not hold it back
            await etcd.lease_revoke(lease5)
            await store.add_node(Node("node5", "10.0.0.5"))
            await etcd.put(HEARTBEATS + "node1", dumps(Heartbeat("node1", 1, 0.0, lease1)), lease1)
            await store.remove_node("node5")
            assert "node5" not in (await store.config()).nodes
        finally:
            await etcd.lease_revoke(lease5)
            await etcd.lease_revoke(lease1)

    scenario(endpoints, body)


def test_remove_node_refused_when_the_policy_would_not_fit(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        # 2+2 on 6 nodes in 4 racks: rack1 and rack2 hold two nodes each
        nodes = make_nodes(6, domains=4)
        assert {n.domain for n in nodes} == {"rack0", "rack1", "rack2", "rack3"}
        await create(store, ProtectionPolicy(2, 2), nodes)
        # node5 shares rack1 with node1: removing it leaves 4 domains
        await store.remove_node("node5")
        # node4 is alone in rack0: removing it would leave 3
        for force in (False, True):
            await refused(store, lambda force=force: store.remove_node("node4", force=force),
                          r"need 4 failure domains, the cluster has 3")
        await refused(store, lambda: store.remove_node("node9"),
                      r"no node 'node9' \(nodes: node1, node2, node3, node4, node6\)")

    scenario(endpoints, body)


def test_remove_node_retires_its_drives(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        await create(store, nodes=make_nodes(5))
        d1 = await store.add_drive("node5", {"file": "/srv/a.img", "size": 64 * MiB})
        d2 = await store.add_drive("node5", {"file": "/srv/b.img", "size": 64 * MiB})
        other = await store.add_drive("node1", {"file": "/srv/a.img", "size": 64 * MiB})
        await etcd.put(NODE_HEALTH + "node5", json.dumps({"state": "down", "since": 1.0}))

        removed = await store.remove_node("node5")
        assert [d.id for d in removed] == [d1.id, d2.id]
        assert all(d.state is DriveState.REMOVED for d in removed)
        config = await store.config()
        assert "node5" not in config.nodes
        assert config.drives[d1.id].state is DriveState.REMOVED
        assert config.drives[d2.id].state is DriveState.REMOVED
        assert config.drives[other.id].state is DriveState.ACTIVE
        assert await etcd.get(NODES + "node5") is None
        assert await etcd.get(NODE_HEALTH + "node5") is None
        event = (await store.events(1))[0]
        assert (event.kind, event.subject) == ("node.removed", "node5")
        assert f"drives {d1.id}, {d2.id}" in event.message
        await refused(store, lambda: store.remove_node("node5"), r"no node 'node5'")
        await refused(store, lambda: store.add_drive("node5", {"file": "/x.img", "size": MiB}),
                      r"no node 'node5'")

    scenario(endpoints, body)


def test_remove_node_refused_when_capacity_would_not_fit(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        config = await create(store, ProtectionPolicy(1, 2), make_nodes(4), drive_size=96 * MiB)
        usable = config.usable_capacity({})
        assert usable == usable_formula(4 * 96 * MiB, 1, 2, 0, 4) == 128 * MiB
        await store.create_fs("big", 100 * MiB)
        # without node4: 3 x 96 MiB raw, 96 MiB usable < 100 MiB provisioned
        await refused(store, lambda: store.remove_node("node4", force=True),
                      r"removing node node4 would leave 96MiB usable, less than the 100MiB provisioned")
        await store.delete_fs("big")
        await store.create_fs("small", 96 * MiB)
        await store.remove_node("node4")

    scenario(endpoints, body)


# --- drives -----------------------------------------------------------------------------------------


def test_add_drive_ids_and_records(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        await create(store)
        a = await store.add_drive("node1", {"file": "/srv/d1.img", "size": "1GiB"})
        b = await store.add_drive("node1", {"pci": "0000:0A:00.0"})
        c = await store.add_drive("node2", {"block_device": "/dev/nvme0n1", "block_size": 4096})
        assert [a.id, b.id, c.id] == [1, 2, 3]
        assert a.size == GiB and b.size is None
        kv = await etcd.get(COUNTERS + "drive")
        assert kv is not None and kv.value == b"3"
        config = await store.config()
        assert sorted(config.drives) == [1, 2, 3]
        assert config.drives[2].spec == {"pci": "0000:0A:00.0"} and config.drives[2].node == "node1"
        assert all(d.state is DriveState.ACTIVE for d in config.drives.values())
        events = (await store.events(3))
        assert [e.kind for e in events] == ["drive.added"] * 3
        assert [e.subject for e in events] == ["drive1", "drive2", "drive3"]
        assert "file /srv/d1.img, 1GiB" in events[0].message and "node node1" in events[0].message

        # the same source twice on one node (PCI addresses compared normalised), not on two nodes
        await refused(store, lambda: store.add_drive("node1", {"file": "/srv/d1.img", "size": "2GiB"}),
                      r"node node1 already has /srv/d1\.img as drive 1")
        await refused(store, lambda: store.add_drive("node1", {"pci": "0000:0a:00.0"}),
                      r"node node1 already has 0000:0a:00\.0 as drive 2")
        d = await store.add_drive("node2", {"file": "/srv/d1.img", "size": "1GiB"})
        assert d.id == 4
        # a removed drive's source can be used again
        await store.set_drive_state(1, DriveState.DRAINING)
        await store.set_drive_state(1, DriveState.REMOVED)
        assert (await store.add_drive("node1", {"file": "/srv/d1.img", "size": "1GiB"})).id == 5
        await refused(store, lambda: store.add_drive("node9", {"file": "/x.img", "size": "1GiB"}),
                      r"no node 'node9' \(nodes: node1, node2, node3, node4\)")

    scenario(endpoints, body)


BAD_DRIVES: dict[str, tuple[dict[str, Any], str]] = {
    "file-without-size": ({"file": "/srv/x.img"}, r"size: required for a file drive"),
    "size-on-a-device": ({"block_device": "/dev/sdb", "size": "1GiB"}, r"only a file drive takes a size"),
    "block-device-outside-dev": ({"block_device": "/srv/x"}, r"must be a path under /dev/"),
    "bad-pci-address": ({"pci": "0a:00"}, r"must be a PCI address"),
    "two-kinds": ({"pci": "0000:0a:00.0", "file": "/x"}, r"exactly one of"),
    "no-kind": ({}, r"exactly one of"),
    "unknown-field": ({"file": "/srv/x.img", "size": "1GiB", "colour": "red"}, r"colour"),
    "bad-size": ({"file": "/srv/x.img", "size": "lots"}, r"size: must be a size"),
    "decimal-size": ({"file": "/srv/x.img", "size": "1GB"}, r"binary units"),
    "bad-block-size": ({"file": "/srv/x.img", "size": "1GiB", "block_size": 1000}, r"block_size: must be"),
    "size-not-a-block-multiple": ({"file": "/srv/x.img", "size": 1000}, r"not a multiple of block_size"),
    "empty-source": ({"file": "", "size": "1GiB"}, r"must be a non-empty string"),
}


@pytest.mark.parametrize("case", list(BAD_DRIVES))
def test_add_drive_spec_checked_by_node_config_parser(endpoints: list[str], case: str) -> None:
    spec, match = BAD_DRIVES[case]

    async def body(store: ClusterStore) -> None:
        await create(store)
        await refused(store, lambda: store.add_drive("node1", spec), match)

    scenario(endpoints, body)


def test_drive_spec_from_the_command_line() -> None:
    """What `kahu drive add` builds from its arguments, and what it refuses before etcd is asked."""
    assert drive_spec("/srv/d.img", "1GiB", None) == {"file": "/srv/d.img", "size": "1GiB"}
    assert drive_spec("0000:0a:00.0", None, 4096) == {"pci": "0000:0a:00.0", "block_size": 4096}
    assert drive_spec("/dev/nvme0n1", None, None) == {"block_device": "/dev/nvme0n1"}
    for args, match in [(("d.img", "1GiB"), r"absolute path"), (("/srv/d.img", None), r"needs --size"),
                        (("/dev/sdb", "1GiB"), r"only a file drive takes a size"),
                        (("0000:0a:00.0", "1GiB"), r"only a file drive takes a size")]:
        with pytest.raises(ClusterError, match=match):
            drive_spec(*args, None)


def test_drive_state_transitions(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        ids = [(await store.add_drive("node1", {"file": f"/srv/{i}.img", "size": "64MiB"})).id
               for i in range(4)]

        async def move(drive: int, *states: DriveState) -> None:
            for state in states:
                changed = await store.set_drive_state(drive, state, "test")
                assert changed.state is state
                assert (await store.config()).drives[drive].state is state
                event = (await store.events(1))[0]
                assert (event.kind, event.subject) == (f"drive.{state}", f"drive{drive}")
                assert event.message.endswith(f"-> {state} (test)")
                assert event.severity is (Severity.WARNING if state is DriveState.FAILED else Severity.INFO)

        draining, failed, back, again = ids
        await move(draining, DriveState.DRAINING, DriveState.REMOVED)
        await move(failed, DriveState.FAILED, DriveState.REMOVED)
        await move(back, DriveState.FAILED, DriveState.ACTIVE, DriveState.DRAINING, DriveState.ACTIVE)
        await move(again, DriveState.DRAINING, DriveState.FAILED, DriveState.ACTIVE)

        cases = [(draining, DriveState.ACTIVE, "removed", "active"),
                 (draining, DriveState.FAILED, "removed", "failed"),
                 (back, DriveState.REMOVED, "active", "removed"),
                 (back, DriveState.ACTIVE, "active", "active")]
        for drive, state, was, to in cases:
            await refused(store, lambda drive=drive, state=state: store.set_drive_state(drive, state),
                          rf"^drive {drive} is {was}; it cannot become {to}$")
        await refused(store, lambda: store.set_drive_state(99, DriveState.DRAINING), r"^no drive 99$")

    scenario(endpoints, body)


def test_drive_out_of_service_refused_when_capacity_would_not_fit(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        config = await create(store, ProtectionPolicy(1, 2), make_nodes(3), drive_size=96 * MiB)
        assert config.usable_capacity({}) == 96 * MiB
        extra = await store.add_drive("node1", {"file": "/srv/extra.img", "size": 48 * MiB})
        await store.create_fs("fs1", 100 * MiB)  # fits only with the extra drive: 112 MiB usable
        await refused(store, lambda: store.set_drive_state(extra.id, DriveState.DRAINING),
                      rf"taking drive {extra.id} out of service would leave 96MiB usable, "
                      r"less than the 100MiB provisioned")
        # a failure is a fact, recorded whatever the capacity; the drive can come back
        await store.set_drive_state(extra.id, DriveState.FAILED)
        await store.set_drive_state(extra.id, DriveState.ACTIVE)
        await store.delete_fs("fs1")
        await store.create_fs("fs2", 96 * MiB)
        await store.set_drive_state(extra.id, DriveState.DRAINING)
        # a draining drive no longer counts, so nothing more fits
        await refused(store, lambda: store.create_fs("fs3", 1), r"does not fit")
        # back to active: its capacity counts again
        await store.set_drive_state(extra.id, DriveState.ACTIVE)
        await store.create_fs("fs3", 16 * MiB)

    scenario(endpoints, body)


# --- file systems and capacity ----------------------------------------------------------------------


def test_usable_capacity_counts_failure_domains_not_nodes(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        # 1+2 with a hot spare on 8 nodes in 4 racks; drive sizes 4, 8, ... 32 MiB
        nodes = make_nodes(8, domains=4)
        await store.create_cluster("cap", ProtectionPolicy(1, 2, 1), nodes)
        for i, n in enumerate(nodes, 1):
            await store.add_drive(n.name, {"file": "/srv/d.img", "size": 4 * i * MiB})
        config = await store.config()
        raw = 144 * MiB
        assert config.raw_capacity({}) == raw
        assert len(config.failure_domains()) == 4
        # raw x k/(k+m) x (domains - spares)/domains = 144 x 1/3 x 3/4 = 36 MiB (by nodes it would be 42)
        usable = config.usable_capacity({})
        assert usable == usable_formula(raw, 1, 2, 1, 4) == 36 * MiB

        # devices count with the size their target reports, once it reports one
        dev = await store.add_drive("node1", {"block_device": "/dev/nvme0n1"})
        assert (await store.config()).raw_capacity({}) == raw
        await store.report_drive(dev.id, DriveReport(True, 48 * MiB))
        reports = (await store.observed()).drive_reports
        assert (await store.config()).usable_capacity(reports) == 48 * MiB
        await store.set_drive_state(dev.id, DriveState.FAILED)

        await refused(store, lambda: store.create_fs("a", usable + 1),
                      r"file system a: 36MiB does not fit: 36MiB usable, 0B already provisioned")
        a = await store.create_fs("a", usable - 4 * MiB)
        assert (a.id, a.capacity) == (1, 32 * MiB)
        await refused(store, lambda: store.create_fs("b", 4 * MiB + 1), r"32MiB already provisioned")
        b = await store.create_fs("b", 4 * MiB)
        assert b.id == 2
        config = await store.config()
        assert config.provisioned() == usable
        assert config.filesystems == {"a": a, "b": b}
        kv = await store.etcd.get(FILESYSTEMS + "a")
        assert kv is not None and FileSystem.from_json(kv.json()) == a
        event = (await store.events(1))[0]
        assert (event.kind, event.subject) == ("fs.created", "fs/b") and "4MiB" in event.message

        await refused(store, lambda: store.create_fs("a", 1), r"^file system a already exists$")
        await refused(store, lambda: store.create_fs("bad name", 1), r"file system name: must be")
        await refused(store, lambda: store.create_fs("zero", 0), r"capacity must be a positive size")
        await refused(store, lambda: store.delete_fs("nope"), r"^no file system 'nope'$")

        await store.delete_fs("a")
        config = await store.config()
        assert set(config.filesystems) == {"b"} and config.provisioned() == 4 * MiB
        event = (await store.events(1))[0]
        assert (event.kind, event.subject) == ("fs.deleted", "fs/a")
        # ids are never reused
        assert (await store.create_fs("a", MiB)).id == 3

    scenario(endpoints, body)


# --- concurrency ------------------------------------------------------------------------------------


class RacingStore(ClusterStore):
    """A store whose first configuration read waits at ``barrier``: racers all validate the same config."""

    def __init__(self, etcd: Etcd, barrier: asyncio.Barrier):
        super().__init__(etcd)
        self.barrier = barrier
        self.reads = 0

    async def config(self) -> Config:
        config = await super().config()
        self.reads += 1
        if self.reads == 1:
            await self.barrier.wait()
        return config


async def race(endpoints: list[str], *actions: Callable[[ClusterStore], Awaitable[Any]]
               ) -> tuple[list[Any], list[RacingStore]]:
    """Run each action on its own client, all validating the same config; results or exceptions."""
    barrier = asyncio.Barrier(len(actions))
    clients = [Etcd(endpoints) for _ in actions]
    try:
        stores = [RacingStore(c, barrier) for c in clients]
        results = await asyncio.gather(*(a(s) for a, s in zip(actions, stores, strict=True)),
                                       return_exceptions=True)
    finally:
        for c in clients:
            await c.close()
    return list(results), stores


def test_conflicting_file_systems_racing(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        config = await create(store, ProtectionPolicy(1, 2), make_nodes(3), drive_size=96 * MiB)
        assert config.usable_capacity({}) == 96 * MiB
        results, stores = await race(endpoints, lambda s: s.create_fs("x", 60 * MiB),
                                     lambda s: s.create_fs("y", 60 * MiB))
        won = [r for r in results if isinstance(r, FileSystem)]
        lost = [r for r in results if isinstance(r, ClusterError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert "does not fit" in str(lost[0]) and "60MiB already provisioned" in str(lost[0])
        # both validated the same config; the loser's commit was refused and it checked again
        assert sorted(s.reads for s in stores) == [1, 2]
        config = await store.config()
        assert list(config.filesystems) == [won[0].name]
        assert config.provisioned() <= config.usable_capacity({})
        assert config.counters["fs"] == 1 and config.generation == 5
        assert (await kinds(store)).count("fs.created") == 1

    scenario(endpoints, body)


def test_drain_racing_a_file_system_that_needs_the_drive(endpoints: list[str]) -> None:
    """Each fits alone, together they would leave provisioned > usable: write skew, caught by gen."""

    async def body(store: ClusterStore) -> None:
        await create(store, ProtectionPolicy(1, 2), make_nodes(3), drive_size=96 * MiB)
        extra = await store.add_drive("node1", {"file": "/srv/extra.img", "size": 48 * MiB})
        results, _ = await race(endpoints, lambda s: s.create_fs("x", 100 * MiB),
                                lambda s: s.set_drive_state(extra.id, DriveState.DRAINING))
        assert sum(isinstance(r, ClusterError) for r in results) == 1, results
        config = await store.config()
        assert config.provisioned() <= config.usable_capacity({})
        assert (config.drives[extra.id].state is DriveState.DRAINING) == (not config.filesystems)

    scenario(endpoints, body)


def test_concurrent_add_drive_gets_distinct_ids(endpoints: list[str]) -> None:
    count = 12

    async def body(store: ClusterStore) -> None:
        await create(store)
        clients = [Etcd(endpoints) for _ in range(3)]
        try:
            stores = [ClusterStore(c) for c in clients]
            drives = await asyncio.gather(*(
                stores[i % 3].add_drive(f"node{i % 4 + 1}", {"file": f"/srv/{i}.img", "size": "64MiB"})
                for i in range(count)))
        finally:
            for c in clients:
                await c.close()
        assert sorted(d.id for d in drives) == list(range(1, count + 1))
        config = await store.config()
        assert sorted(config.drives) == list(range(1, count + 1))
        assert {d.id: d.spec["file"] for d in drives} == {i: d.spec["file"] for i, d in config.drives.items()}
        assert config.counters["drive"] == count
        assert (await kinds(store)).count("drive.added") == count

    scenario(endpoints, body)


def test_concurrent_add_node_conflicts_one_wins(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        # three racers for one name
        results, _ = await race(endpoints, *(lambda s, i=i: s.add_node(Node("node5", f"10.0.0.{i}"))
                                             for i in (5, 6, 7)))
        assert [type(r) for r in results].count(ClusterError) == 2, results
        assert all(str(r) == "node node5 already exists" for r in results if isinstance(r, ClusterError))
        winner = next(r for r in results if isinstance(r, Node))
        assert (await store.config()).nodes["node5"] == winner
        # two names on one address and port
        results, _ = await race(endpoints, lambda s: s.add_node(Node("node8", "10.0.0.8")),
                                lambda s: s.add_node(Node("node9", "10.0.0.8")))
        assert [type(r) for r in results].count(ClusterError) == 1, results
        assert any("10.0.0.8 port 4420 is already used" in str(r) for r in results)
        config = await store.config()
        assert len(config.nodes) == 6 and len({n.address for n in config.nodes.values()}) == 6

    scenario(endpoints, body)


# --- schema and damaged records ---------------------------------------------------------------------


def test_newer_schema_refused(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        await store.etcd.put(SCHEMA_KEY, json.dumps({"version": 99}))
        match = r"schema version 99; this Kahu understands up to 1: upgrade Kahu"
        await refused(store, lambda: store.config(), match)
        await refused(store, lambda: store.add_node(Node("node5", "10.0.0.5")), match)
        await refused(store, lambda: store.create_fs("fs", 1), match)

    scenario(endpoints, body)


@pytest.mark.parametrize("key, value", [
    (NODES + "x", b"{not json"),
    (NODES + "x", b'{"name": "x"}'),
    (NODES + "x", b'{"name": "x", "address": "nowhere"}'),
    (DRIVES + "7", b'{"id": 7, "node": "node1", "spec": {}, "state": "melted", "added": 0, "changed": 0}'),
    (FILESYSTEMS + "f", b"[]"),
    (CLUSTER_KEY, b"null"),
    (GEN_KEY, b"lots"),
    (COUNTERS + "drive", b""),
    (SCHEMA_KEY, b'{"version": "one"}'),
])
def test_damaged_record_named_in_the_error(endpoints: list[str], key: str, value: bytes) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        await store.etcd.put(key, value)
        await refused(store, lambda: store.config(), rf"^etcd key {key}: damaged record \(")

    scenario(endpoints, body)


# --- bucket leases ----------------------------------------------------------------------------------


def test_bucket_leases_and_epochs(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        lease_a, _ = await etcd.lease_grant(30)
        lease_b, _ = await etcd.lease_grant(30)
        try:
            a = await store.acquire_bucket(7, "node-a", lease_a)
            assert a == BucketOwner(7, "node-a", 1, lease_a)
            assert await store.acquire_bucket(7, "node-b", lease_b) is None
            assert await store.acquire_bucket(7, "node-a", lease_a) is None  # not re-entrant either
            assert await store.bucket_owners() == {7: a}
            held = await etcd.get(f"{BUCKETS}00007")
            assert held is not None and held.lease == lease_a
            epoch = await etcd.get(f"{BUCKET_EPOCHS}00007")
            assert epoch is not None and epoch.value == b"1" and epoch.lease == 0

            # another bucket is independent
            other = await store.acquire_bucket(8, "node-b", lease_b)
            assert other is not None and other.epoch == 1

            await etcd.lease_revoke(lease_a)  # node-a's lease ends: its keys vanish with it
            assert await etcd.get(f"{BUCKETS}00007") is None
            b = await store.acquire_bucket(7, "node-b", lease_b)
            assert b == BucketOwner(7, "node-b", 2, lease_b)
            assert await store.bucket_owners() == {7: b, 8: other}

            assert await store.release_bucket(a) is False  # a stale owner cannot release it
            assert (await store.bucket_owners())[7] == b
            assert await store.release_bucket(b) is True
            assert await store.release_bucket(b) is False
            assert 7 not in await store.bucket_owners()
            c = await store.acquire_bucket(7, "node-a", lease_b)
            assert c is not None and c.epoch == 3

            for bucket in (-1, MAX_BUCKETS):
                await refused(store, lambda bucket=bucket: store.acquire_bucket(bucket, "x", lease_b),
                              rf"bucket {bucket}: must be in 0\.\.{MAX_BUCKETS - 1}")
        finally:
            await etcd.lease_revoke(lease_a)
            await etcd.lease_revoke(lease_b)

    scenario(endpoints, body)


def test_bucket_acquired_by_one_of_many_racers(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        leases = [(await store.etcd.lease_grant(30))[0] for _ in range(5)]
        try:
            owners = await asyncio.gather(*(store.acquire_bucket(3, f"n{i}", lease)
                                            for i, lease in enumerate(leases)))
            won = [o for o in owners if o is not None]
            assert len(won) == 1 and won[0].epoch == 1
            assert await store.bucket_owners() == {3: won[0]}
        finally:
            for lease in leases:
                await store.etcd.lease_revoke(lease)

    scenario(endpoints, body)


# --- events, health -------------------------------------------------------------------------------


def test_events_newest_in_time_order(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        times = [1_700_000_000.0 + i for i in range(30)]
        shuffled = random.Random(4).sample(times, len(times))
        for t in shuffled:  # written out of order: the key, not the write order, decides
            await etcd.txn([], [event_op("test.tick", "t", f"tick {t}", now=t)])
        newest = await store.events(5)
        assert [e.time for e in newest] == times[-5:]
        assert [e.message for e in newest] == [f"tick {t}" for t in times[-5:]]
        assert [e.time for e in await store.events(100)] == times
        assert await store.events(1) == newest[-1:]

        # real changes append after them, in the order they happened
        await create(store)
        await store.add_node(Node("node5", "10.0.0.5"))
        await store.add_drive("node5", {"file": "/d.img", "size": "64MiB"})
        assert await kinds(store, 3) == ["cluster.created", "node.added", "drive.added"]

    scenario(endpoints, body)


def test_mark_health_fenced_on_the_manager_key(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        etcd = store.etcd
        await create(store)
        mine = json.dumps({"node": "node1", "lease": 1, "since": 1.0}).encode()
        theirs = json.dumps({"node": "node2", "lease": 2, "since": 2.0}).encode()

        # no manager at all: refused
        before = await snapshot(etcd)
        assert await store.mark_health("node3", Health.DOWN, mine, "test") is False
        assert await snapshot(etcd) == before

        await etcd.put(MANAGER_KEY, mine)
        assert await store.mark_health("node3", Health.DOWN, mine, "no heartbeat") is True
        observed = await store.observed()
        assert observed.health["node3"].state is Health.DOWN and observed.manager == "node1"
        event = (await store.events(1))[0]
        assert (event.kind, event.subject, event.severity) == ("node.down", "node3", Severity.WARNING)
        assert event.message == "node node3 is down: no heartbeat"

        # an unknown node is not marked, even by the manager
        before = await snapshot(etcd)
        assert await store.mark_health("node9", Health.UP, mine, "test") is False
        assert await snapshot(etcd) == before

        # deposed: another manager took over; the old fence no longer works
        await etcd.put(MANAGER_KEY, theirs)
        before = await snapshot(etcd)
        assert await store.mark_health("node3", Health.UP, mine, "stale") is False
        assert await snapshot(etcd) == before
        assert (await store.observed()).health["node3"].state is Health.DOWN
        assert await store.mark_health("node3", Health.UP, theirs, "heartbeat present") is True
        assert (await store.observed()).health["node3"].state is Health.UP

    scenario(endpoints, body)


def test_config_reads_one_revision(endpoints: list[str]) -> None:
    """Every change bumps the generation and the gen key's revision, which change() compares."""

    async def body(store: ClusterStore) -> None:
        await create(store)
        first = await store.config()
        await store.add_node(Node("node5", "10.0.0.5"))
        second = await store.config()
        assert second.generation == first.generation + 1
        assert second.gen_revision > first.gen_revision
        kv: KeyValue | None = await store.etcd.get(GEN_KEY)
        assert kv is not None and kv.mod_revision == second.gen_revision

    scenario(endpoints, body)


def test_file_drive_needs_an_absolute_path_in_the_store_too(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)
        await refused(store, lambda: store.add_drive("node1", {"file": "d.img", "size": "1MiB"}),
                      r"node node1: a file drive needs an absolute path, got 'd.img'")

    scenario(endpoints, body)


def test_trim_events_keeps_the_newest(endpoints: list[str]) -> None:
    async def body(store: ClusterStore) -> None:
        await create(store)  # one event
        for i in range(9):
            await store.add_node(Node(f"extra{i}", "10.9.9.9", "", 5000 + 2 * i, 5001 + 2 * i))
        newest = await store.events(4)
        assert await store.trim_events(4) == 6
        assert await store.etcd.count(EVENTS) == 4
        assert await store.events(10) == newest
        assert await store.trim_events(4) == 0

    scenario(endpoints, body)
