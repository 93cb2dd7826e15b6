"""A 4-node cluster (namespaces as root) with 3 etcd members on the first nodes, under faults: the
etcd leader killed, a node's cable pulled, a node crashed; and admin changes reaching the drive
targets (a drive added is exported, a drive removed is withdrawn), checked with the NVMe/TCP host.

One cluster serves the module; every test leaves it as it found it (all nodes and members running,
all links up), also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import cluster_spec, health_of, until
from conftest import run, run_kahu

from appliance.cluster.etcd import Etcd
from appliance.cluster.local import LocalCluster, local_cluster
from appliance.cluster.schema import EVENTS, DriveState
from appliance.cluster.store import ClusterStore
from appliance.nvmeof.host.controller import Controller
from appliance.procs import process_alive

NODE_TIMEOUT = 3  # seconds; heartbeat lease TTL 2 s
SLACK = 1.5  # etcd checks lease expiry every 500 ms; the manager then writes one transaction
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("cluster")
    with local_cluster(home, cluster_spec(nodes=4, etcd_members=3, node_timeout=NODE_TIMEOUT)) as c:
        yield c


@pytest.fixture
def healthy(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The cluster, restored after the test: links up, every member and node running and up."""
    try:
        yield cluster
    finally:
        if cluster.topology is not None:
            for name in cluster.names:
                cluster.restore_link(name)
        assert cluster.etcd is not None
        for member in cluster.etcd.members:
            if not cluster.etcd.running(member.name):
                cluster.etcd.start_member(member.name)
        for name, proc in cluster.backends.items():
            if proc.poll() is not None:
                cluster.start_node(name)
        run(cluster.wait_up(cluster.names, 20), 30)


def kahu(cluster: LocalCluster, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return run_kahu(*args, "--etcd", ",".join(cluster.endpoints), timeout=timeout)


async def health_events(etcd: Etcd, node: str) -> list[str]:
    events = await ClusterStore(etcd).events(200)
    return [e.kind for e in events if e.subject == node and e.kind in ("node.up", "node.down")]


def test_every_node_up_with_one_manager_and_status_is_fast(healthy: LocalCluster) -> None:
    best = min(_timed(lambda: kahu(healthy, "status", "--json")) for _ in range(3))
    doc = json.loads(kahu(healthy, "status", "--json").stdout)
    assert [n["health"] for n in doc["nodes"]] == ["up"] * 4
    assert sum(n["manager"] for n in doc["nodes"]) == 1
    assert [m["healthy"] for m in doc["etcd"]] == [True] * 3 and sum(m["leader"] for m in doc["etcd"]) == 1
    assert len(doc["drives"]) == 4 and all(d["exported"] for d in doc["drives"])
    assert best < 1.0, f"kahu status took {best:.2f}s"
    if healthy.topology is not None:  # each node really is its own host with its own address
        assert {n["address"] for n in doc["nodes"]} == {healthy.node_address(i) for i in range(1, 5)}


def _timed(action: object) -> float:
    began = time.monotonic()
    result = action()  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    return time.monotonic() - began


def test_killing_the_etcd_leader_does_not_disturb_the_cluster(healthy: LocalCluster) -> None:
    etcd_cluster = healthy.etcd
    assert etcd_cluster is not None
    leader = etcd_cluster.leader()
    assert leader is not None

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            start = await etcd.revision()
            etcd_cluster.kill_member(leader)
            store = ClusterStore(etcd)
            fs = await store.create_fs(f"during-{uuid.uuid4().hex[:6]}", 1 << 20)  # writes go on
            await store.delete_fs(fs.name)
            new_leader = await asyncio.to_thread(etcd_cluster.leader)
            assert new_leader not in (None, leader)

            # For longer than the node timeout (plus the election) no node may be marked down.
            async def a_node_goes_down() -> None:
                async for event in etcd.watch(EVENTS, start + 1):
                    if b'"node.down"' in event.kv.value:
                        raise AssertionError(f"disturbed: {event.kv.value!r}")

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(a_node_goes_down(), NODE_TIMEOUT + 2 * SLACK)
            observed = await store.observed()
            assert set(observed.heartbeats) == set(healthy.names)
            assert observed.manager is not None

    run(scenario(), 40)
    result = kahu(healthy, "status", "--json")
    assert result.returncode == 0, result.stderr
    members = {m["name"]: m for m in json.loads(result.stdout)["etcd"]}
    assert members[leader]["healthy"] is False  # still dead, and shown so
    etcd_cluster.start_member(leader)  # it rejoins with its data
    assert etcd_cluster.running(leader)


def test_a_cut_node_is_marked_down_within_the_timeout_and_up_when_back(healthy: LocalCluster) -> None:
    if healthy.topology is None:
        pytest.skip("cutting a link needs network namespaces (root)")
    victim = "node4"  # no etcd member there: only the node itself is cut off

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            cut_at = time.monotonic()
            await asyncio.to_thread(healthy.cut_link, victim)  # pyroute2 runs its own loop
            await until(etcd, lambda s: _is(s, victim, "down"), NODE_TIMEOUT + 2 * SLACK, f"{victim} down")
            took = time.monotonic() - cut_at
            assert took <= NODE_TIMEOUT + SLACK, f"marked down after {took:.1f}s"
            assert healthy.backends[victim].poll() is None  # nothing was killed: only the cable
            # Keep it cut until its own etcd calls have given up (the client's deadline): the backend
            # must ride that out and rejoin by itself, with the same process.
            await wait_for_log(healthy.home / "logs" / f"{victim}.log", "no member answered", 20)
            await asyncio.to_thread(healthy.restore_link, victim)
            await until(etcd, lambda s: _is(s, victim, "up"), 20, f"{victim} up again")
            assert healthy.backends[victim].poll() is None
            heartbeat = (await ClusterStore(etcd).observed()).heartbeats[victim]
            assert heartbeat.pid == healthy.backends[victim].pid
            assert (await health_events(etcd, victim))[-2:] == ["node.down", "node.up"]

    run(scenario(), 60)


def test_a_crashed_node_is_marked_down_and_serves_again_after_restart(healthy: LocalCluster) -> None:
    victim = "node3"  # also hosts etcd3, which keeps running: a crashed backend, not a crashed host
    old_pid = healthy.backends[victim].pid

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            killed_at = time.monotonic()
            await asyncio.to_thread(healthy.kill_node, victim)
            await until(etcd, lambda s: _is(s, victim, "down"), NODE_TIMEOUT + 2 * SLACK, f"{victim} down")
            assert time.monotonic() - killed_at <= NODE_TIMEOUT + SLACK
            address, port = healthy.node_address(3), healthy.node_ports(3)[0]
            with pytest.raises(OSError):  # its drive target died with it
                await asyncio.wait_for(asyncio.open_connection(address, port), 2)
            await asyncio.to_thread(healthy.start_node, victim)
            await until(etcd, lambda s: _is(s, victim, "up"), 20, f"{victim} up again")
            heartbeat = (await ClusterStore(etcd).observed()).heartbeats[victim]
            assert heartbeat.pid != old_pid
            assert sorted(await namespaces(address, port, f"nqn.2026-11.io.kahu:{victim}")) != []

    run(scenario(), 60)
    assert not process_alive(old_pid)


def test_cutting_off_the_manager_elects_another(healthy: LocalCluster) -> None:
    if healthy.topology is None:
        pytest.skip("cutting a link needs network namespaces (root)")

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            store = ClusterStore(etcd)
            manager = (await store.observed()).manager
            assert manager is not None
            # Where the manager shares its node with an etcd member, that member is cut off too.
            await asyncio.to_thread(healthy.cut_link, manager)
            await until(etcd, lambda s: _is(s, manager, "down"), NODE_TIMEOUT + 3 * SLACK, f"{manager} down")
            assert (await store.observed()).manager not in (None, manager)
            await asyncio.to_thread(healthy.restore_link, manager)
            await until(etcd, lambda s: _is(s, manager, "up"), 20, f"{manager} up again")

    run(scenario(), 60)


def test_cutting_off_the_etcd_leaders_node(healthy: LocalCluster) -> None:
    """The harshest cut: the node that hosts etcd's leader. etcd elects another leader (extending
    leases meanwhile), the node is marked down, and after the cable is back member and node rejoin."""
    if healthy.topology is None:
        pytest.skip("cutting a link needs network namespaces (root)")
    assert healthy.etcd is not None
    leader = healthy.etcd.leader()
    assert leader is not None
    victim = f"node{leader.removeprefix('etcd')}"  # etcd member j runs on node j

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            cut_at = time.monotonic()
            await asyncio.to_thread(healthy.cut_link, victim)
            await until(etcd, lambda s: _is(s, victim, "down"), NODE_TIMEOUT + 3 * SLACK, f"{victim} down")
            took = time.monotonic() - cut_at
            new_leader = await asyncio.to_thread(healthy.etcd.leader)
            assert new_leader not in (None, leader)
            await asyncio.to_thread(healthy.restore_link, victim)
            await until(etcd, lambda s: _is(s, victim, "up"), 20, f"{victim} up again")
            assert healthy.backends[victim].poll() is None
            print(f"{victim} (etcd leader {leader}) marked down {took:.1f}s after the cut")

    run(scenario(), 60)


def test_added_drive_is_exported_and_a_removed_one_withdrawn(healthy: LocalCluster, tmp_path: Path) -> None:
    node, index = "node2", 2
    address, port = healthy.node_address(index), healthy.node_ports(index)[0]
    nqn = f"nqn.2026-11.io.kahu:{node}"
    path = healthy.home / "nodes" / node / "drives" / f"extra-{uuid.uuid4().hex[:6]}.img"
    added = kahu(healthy, "drive", "add", node, str(path), "--size", "32MiB")
    assert added.returncode == 0, added.stderr
    drive_id = int(added.stdout.split()[1])

    async def scenario() -> None:
        async with Etcd(healthy.endpoints) as etcd:
            store = ClusterStore(etcd)

            async def exported(s: ClusterStore) -> bool:
                report = (await s.observed()).drive_reports.get(drive_id)
                return bool(report and report.exported)

            await until(etcd, exported, 20, f"drive {drive_id} exported")
            drive = (await store.config()).drives[drive_id]
            found = await namespaces(address, port, nqn)
            assert drive.parsed().uuid in found.values()
            assert found and max(found) >= 2  # the node's first drive plus this one
            assert path.stat().st_size == 32 << 20

            removed = kahu(healthy, "drive", "remove", str(drive_id))
            assert removed.returncode == 0, removed.stderr

            async def gone(s: ClusterStore) -> bool:
                config, observed = await s.config(), await s.observed()
                report = observed.drive_reports.get(drive_id)
                removed = config.drives[drive_id].state is DriveState.REMOVED
                return removed and report is not None and not report.exported

            await until(etcd, gone, 20, f"drive {drive_id} removed and withdrawn")
            assert drive.parsed().uuid not in (await namespaces(address, port, nqn)).values()

    run(scenario(), 60)


def test_removing_a_node_that_the_policy_needs_is_refused(healthy: LocalCluster) -> None:
    healthy.kill_node("node4")
    result = kahu(healthy, "node", "remove", "node4", "--force")
    assert result.returncode == 1
    assert "need 4 failure domains, the cluster has 3" in result.stderr
    listed = json.loads(kahu(healthy, "node", "list", "--json").stdout)
    assert [n["name"] for n in listed] == healthy.names


async def _is(store: ClusterStore, node: str, state: str) -> bool:
    return await health_of(store, node) == state


async def namespaces(address: str, port: int, nqn: str) -> dict[int, uuid.UUID | None]:
    """What the node's target exports, as an NVMe/TCP host sees it: nsid -> namespace UUID."""
    ctrl = await asyncio.wait_for(Controller.connect(address, port, nqn), IO_TIMEOUT)
    try:
        return {nsid: info.uuid for nsid, info in ctrl.namespaces.items()}
    finally:
        await ctrl.close()


async def wait_for_log(path: Path, text: str, timeout: float) -> None:
    """Until a node's log says ``text`` (bounded polling of a file another process writes)."""
    start = path.stat().st_size
    async with asyncio.timeout(timeout):
        while text not in path.read_text(errors="replace")[start:]:
            await asyncio.sleep(0.1)
