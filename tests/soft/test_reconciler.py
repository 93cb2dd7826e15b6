"""The reconciler against the soft target (a subprocess started by lifecycle.NodeTarget): create from
nothing, re-apply without a single mutating call, apply only deltas, tear down, and a host reaching
every exported namespace."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from rpc_scenarios import (
    changed_drive_replaces_its_namespace,
    create_reapply_delta_connect_teardown,
    run_scenario,
)

from appliance.nvmeof.spec import DISCOVERY_NQN
from appliance.spdk_rpc.nodeconfig import parse_node_config
from appliance.spdk_rpc.reconciler import Observed, desired_state, plan


def test_create_reapply_delta_connect_teardown(tmp_path: Path) -> None:
    run_scenario(create_reapply_delta_connect_teardown, tmp_path, soft=True)


def test_changed_drive_replaces_its_namespace(tmp_path: Path) -> None:
    run_scenario(changed_drive_replaces_its_namespace, tmp_path, soft=True)


def observed(subsystems: list[dict[str, Any]] | None = None, bdevs: list[dict[str, Any]] | None = None,
             transports: list[str] = ("TCP",)) -> Observed:
    discovery = {"nqn": DISCOVERY_NQN, "subtype": "Discovery", "listen_addresses": [], "hosts": [],
                 "allow_any_host": True}
    return Observed([{"trtype": t} for t in transports], bdevs or [], [discovery, *(subsystems or [])])


def test_plan_pci_drive_rdma_and_identity_change(tmp_path: Path) -> None:
    config = parse_node_config({
        "name": "n1", "data_addresses": [{"address": "10.0.0.1"}], "allow_any_host": True,
        "drives": [{"pci": "0000:0a:00.0", "name": "Nvme0"}],
    })
    desired = desired_state(config, rdma=True)
    steps = [(s.method, s.params) for s in plan(desired, observed(transports=[])).steps]
    assert ("nvmf_create_transport", {"trtype": "RDMA"}) in steps
    attach = {"name": "Nvme0", "trtype": "pcie", "traddr": "0000:0a:00.0"}
    assert ("bdev_nvme_attach_controller", attach) in steps
    listeners = {s[1]["listen_address"]["trtype"] for s in steps if s[0] == "nvmf_subsystem_add_listener"}
    assert listeners == {"TCP", "RDMA"}
    [add_ns] = [p for m, p in steps if m == "nvmf_subsystem_add_ns"]
    assert add_ns["namespace"]["bdev_name"] == "Nvme0n1"
    assert add_ns["namespace"]["uuid"] == str(config.drives[0].uuid)

    # Another node's subsystem and a stray bdev claimed by it are removed; ours (other serial) is rebuilt.
    stray_ns = {"nsid": 1, "bdev_name": "Malloc0", "uuid": str(uuid.uuid4()), "nguid": "0" * 32}
    stray = {"nqn": "nqn.2016-06.io.spdk:other", "subtype": "NVMe", "serial_number": "X",
             "model_number": "Y", "listen_addresses": [], "hosts": [], "allow_any_host": True,
             "namespaces": [stray_ns]}
    ours = {**stray, "nqn": config.nqn, "serial_number": "OLD", "namespaces": []}
    bdevs = [{"name": "Malloc0", "product_name": "Malloc disk"},
             {"name": "Nvme0n1", "product_name": "NVMe disk"},
             {"name": "Nvme0n2", "product_name": "NVMe disk"}]
    todo = plan(desired_state(config, rdma=False), observed([stray, ours], bdevs))
    methods = [s.method for s in todo.steps]
    assert methods[:4] == ["nvmf_subsystem_remove_ns", "bdev_malloc_delete", "nvmf_delete_subsystem",
                           "nvmf_delete_subsystem"]
    assert "bdev_nvme_detach_controller" not in methods  # Nvme0n2 shares the wanted controller
    assert methods[4] == "nvmf_create_subsystem"
