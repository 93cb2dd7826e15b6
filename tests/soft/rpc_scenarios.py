"""Reconciler scenarios run against any drive target: the soft target (tests/soft) and SPDK (tests/hw)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ports import free_port
from rpc_helpers import CountingRpc, write_read_block

from appliance.nvmeof.spec import DISCOVERY_NQN
from appliance.spdk_rpc.lifecycle import NodeTarget
from appliance.spdk_rpc.nodeconfig import NodeConfig, parse_node_config
from appliance.spdk_rpc.reconciler import desired_state, reconcile, teardown_state

SCENARIO_TIMEOUT = 120.0
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-1111-4222-8333-444444444444"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:0b0b0b0b-1111-4222-8333-444444444444"


def run_scenario(scenario: Callable[..., Coroutine[Any, Any, None]], tmp_path: Path, soft: bool) -> None:
    """Run one of the scenarios below against the soft target or SPDK, bounded by SCENARIO_TIMEOUT."""
    asyncio.run(asyncio.wait_for(scenario(tmp_path, soft=soft), SCENARIO_TIMEOUT))


def node_config(tmp_path: Path, ports: list[int], drives: list[dict[str, Any]], hosts: list[str],
                discovery_port: int) -> NodeConfig:
    return parse_node_config({
        "name": "n1",
        "data_addresses": [{"address": "127.0.0.1", "port": p} for p in ports],
        "discovery_port": discovery_port,
        "hostnqns": hosts,
        "drives": drives,
        "spdk": {"rpc_socket": str(tmp_path / "spdk.sock")},
        "transport": {"rdma": False},
    })


def file_drive(tmp_path: Path) -> dict[str, Any]:
    return {"file": str(tmp_path / "drives" / "d0.img"), "size": "4MiB", "name": "d0"}


MALLOC_1 = {"malloc": "2MiB", "name": "m1", "block_size": 4096}
MALLOC_2 = {"malloc": "1MiB", "name": "m2"}


def read_state(rpc) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(our subsystem, discovery subsystem, bdevs by name) as the target reports them."""
    subs = {s["nqn"]: s for s in rpc.nvmf_get_subsystems()}
    bdevs = {b["name"]: b for b in rpc.bdev_get_bdevs()}
    return subs.get("nqn.2026-11.io.kahu:n1", {}), subs[DISCOVERY_NQN], bdevs


async def create_reapply_delta_connect_teardown(tmp_path: Path, soft: bool) -> None:
    """From nothing to exported, no-op re-apply, a dry run, a delta, host I/O, then tear-down."""
    port_a, port_b, disc = free_port(), free_port(), free_port()
    first = node_config(tmp_path, [port_a], [file_drive(tmp_path), MALLOC_1], [HOST_A], disc)
    second = node_config(tmp_path, [port_b], [MALLOC_1, MALLOC_2], [HOST_B], disc)

    async with NodeTarget(first, tmp_path / "state", soft=soft) as nt:
        assert nt.kind == ("soft" if soft else "spdk") and nt.applied == 1
        # (The soft target may start with its TCP transport; SPDK starts with none.)
        created = [s.method for s in nt.last_plan.steps if s.method != "nvmf_create_transport"]
        assert created == [
            "bdev_aio_create", "bdev_malloc_create", "nvmf_create_subsystem",
            "nvmf_subsystem_add_ns", "nvmf_subsystem_add_ns", "nvmf_subsystem_add_host",
            "nvmf_subsystem_add_listener", "nvmf_subsystem_add_listener",
        ]
        image = tmp_path / "drives" / "d0.img"
        assert image.stat().st_size == 4 << 20 and image.stat().st_blocks == 0  # created sparse

        counting = await asyncio.to_thread(CountingRpc.connect, first.spdk.rpc_socket, 10.0)
        try:
            transports = await asyncio.to_thread(counting.nvmf_get_transports)
            assert [t["trtype"] for t in transports] == ["TCP"]
            sub, discovery, bdevs = await asyncio.to_thread(read_state, counting)
            assert set(bdevs) == {"d0", "m1"} and all(b["claimed"] for b in bdevs.values())
            assert {(n["bdev_name"], n["uuid"]) for n in sub["namespaces"]} == {
                (d.name, str(d.uuid)) for d in first.drives
            }
            assert [a["trsvcid"] for a in sub["listen_addresses"]] == [str(port_a)]
            assert [a["trsvcid"] for a in discovery["listen_addresses"]] == [str(disc)]
            assert sub["hosts"] == [{"nqn": HOST_A}] and sub["allow_any_host"] is False

            # Re-applying an unchanged configuration: the three reads and nothing else.
            counting.methods.clear()
            again = await asyncio.to_thread(reconcile, counting, desired_state(first))
            assert not again and counting.mutations() == [] and len(counting.methods) == 3

            # A dry run of a change reads, plans, and changes nothing.
            counting.methods.clear()
            dry = await asyncio.to_thread(reconcile, counting, desired_state(second), True)
            assert dry and counting.mutations() == [] and "bdev_aio_delete" in str(dry)

            # The change: drive d0 out, m2 in, listener a -> b, host A -> B. Only that is issued.
            counting.methods.clear()
            await asyncio.to_thread(reconcile, counting, desired_state(second))
            assert counting.mutations() == [
                "nvmf_subsystem_remove_listener", "nvmf_subsystem_remove_host",
                "nvmf_subsystem_remove_ns", "bdev_aio_delete", "bdev_malloc_create",
                "nvmf_subsystem_add_ns", "nvmf_subsystem_add_host", "nvmf_subsystem_add_listener",
            ]
            sub, discovery, bdevs = await asyncio.to_thread(read_state, counting)
            assert set(bdevs) == {"m1", "m2"}
            assert [a["trsvcid"] for a in sub["listen_addresses"]] == [str(port_b)]
            assert sub["hosts"] == [{"nqn": HOST_B}]
            assert image.exists(), "removing a drive must not delete its data"

            # A host reaches every namespace that is exported, with the drives' stable identities.
            blocks = await write_read_block("127.0.0.1", port_b, second.nqn, hostnqn=HOST_B)
            assert sorted(blocks.values()) == [512, 4096]
            nguids = {n["nguid"] for n in sub["namespaces"]}
            assert nguids == {d.uuid.hex.upper() for d in second.drives}

            counting.methods.clear()
            assert not await asyncio.to_thread(reconcile, counting, desired_state(second))
            assert counting.mutations() == []

            # Tear down: everything Kahu exported goes, in the safe order.
            counting.methods.clear()
            await asyncio.to_thread(reconcile, counting, teardown_state())
            assert counting.mutations() == [
                "nvmf_subsystem_remove_listener", "nvmf_subsystem_remove_listener",
                "nvmf_subsystem_remove_host", "nvmf_subsystem_remove_ns", "nvmf_subsystem_remove_ns",
                "bdev_malloc_delete", "bdev_malloc_delete", "nvmf_delete_subsystem",
            ]
            sub, discovery, bdevs = await asyncio.to_thread(read_state, counting)
            assert sub == {} and bdevs == {} and discovery["listen_addresses"] == []
        finally:
            counting.close()


async def changed_drive_replaces_its_namespace(tmp_path: Path, soft: bool) -> None:
    """A drive whose size changed: its namespace is removed, the bdev replaced, the namespace re-added."""
    port, disc = free_port(), free_port()
    config = node_config(tmp_path, [port], [MALLOC_1], [HOST_A], disc)
    bigger = node_config(tmp_path, [port], [{**MALLOC_1, "malloc": "4MiB"}], [HOST_A], disc)

    async with NodeTarget(config, tmp_path / "state", soft=soft) as nt:
        counting = await asyncio.to_thread(CountingRpc.connect, config.spdk.rpc_socket, 10.0)
        try:
            await asyncio.to_thread(reconcile, counting, desired_state(bigger))
            assert counting.mutations() == [
                "nvmf_subsystem_remove_ns", "bdev_malloc_delete", "bdev_malloc_create",
                "nvmf_subsystem_add_ns",
            ]
            _, _, bdevs = await asyncio.to_thread(read_state, counting)
            assert bdevs["m1"]["num_blocks"] * bdevs["m1"]["block_size"] == 4 << 20
            assert nt.applied == 1
        finally:
            counting.close()


