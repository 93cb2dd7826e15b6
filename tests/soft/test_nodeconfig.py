"""Node configuration: parsing, defaults, stable drive identities, and errors that name the bad field."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.cli import main as cli_main
from appliance.spdk_rpc.nodeconfig import (
    DriveKind,
    NodeConfig,
    NodeConfigError,
    load_node_config,
    parse_node_config,
    parse_size,
)

FULL = """
name: node1
failure_domain: rack-a
data_addresses:
  - {address: 10.77.0.11/24, interface: eth1, mtu: 9000}
  - {address: "fd00::11", port: 4421}
discovery_port: 8009
hostnqns: [nqn.2014-08.org.nvmexpress:uuid:0f7d0b5a-3c1e-4f8e-9b6a-1d2c3b4a5f60]
drives:
  - {pci: "0000:0A:00.0"}
  - {block_device: /dev/sdb, block_size: 4096}
  - {file: /var/lib/kahu/d2.img, size: 1.5GiB, name: scratch}
  - {malloc: 64MiB, uuid: 6a1f0c3e-0d5b-4c53-9e2f-7f1b2a3c4d5e}
spdk: {binary: /opt/spdk/bin/nvmf_tgt, cores: [0, 2], hugepages: 1024, mem_size_mb: 2048, no_huge: false}
transport: {rdma: auto, options: {max_queue_depth: 256, c2h_success: true}}
"""


def minimal(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "node1",
        "data_addresses": [{"address": "127.0.0.1"}],
        "allow_any_host": True,
        "drives": [{"malloc": "64MiB"}],
    }
    doc.update(overrides)
    return doc


def test_full_config_is_parsed_into_typed_fields() -> None:
    cfg = parse_node_config(yaml.safe_load(FULL))
    assert (cfg.name, cfg.failure_domain) == ("node1", "rack-a")
    eth1, v6 = cfg.data_addresses
    assert (eth1.address, eth1.prefixlen, eth1.port, eth1.interface, eth1.mtu, eth1.adrfam) == (
        "10.77.0.11", 24, 4420, "eth1", 9000, "ipv4")
    assert (v6.address, v6.port, v6.prefixlen, v6.adrfam) == ("fd00::11", 4421, None, "ipv6")
    assert cfg.allow_any_host is False and len(cfg.hostnqns) == 1
    pci, blk, f, mal = cfg.drives
    assert (pci.kind, pci.source, pci.block_size) == (DriveKind.PCI, "0000:0a:00.0", None)
    assert (blk.kind, blk.source, blk.block_size) == (DriveKind.BLOCK_DEVICE, "/dev/sdb", 4096)
    assert (f.kind, f.name, f.size, f.block_size) == (DriveKind.FILE, "scratch", 3 << 29, 512)
    assert (mal.kind, mal.source, mal.size, mal.name) == (DriveKind.MALLOC, None, 64 << 20, "drive3")
    assert mal.uuid == uuid.UUID("6a1f0c3e-0d5b-4c53-9e2f-7f1b2a3c4d5e")
    assert mal.nguid == "6a1f0c3e0d5b4c539e2f7f1b2a3c4d5e"
    assert cfg.spdk.cpumask == "0x5" and cfg.spdk.hugepages == 1024 and cfg.spdk.no_huge is False
    assert cfg.transport.rdma is None
    assert cfg.transport.options == {"max_queue_depth": 256, "c2h_success": True}


def test_defaults_are_derived_from_the_node_name() -> None:
    cfg = parse_node_config(minimal())
    assert cfg.failure_domain == "node1"
    assert cfg.nqn == "nqn.2026-11.io.kahu:node1"
    assert cfg.data_addresses[0].port == 4420 and cfg.discovery_port == 8009
    assert cfg.serial_number.startswith("KAHU") and len(cfg.serial_number) == 20
    assert cfg.serial_number != parse_node_config(minimal(name="node2")).serial_number
    assert cfg.model_number == "Kahu node1"
    assert (cfg.spdk.rpc_socket, cfg.spdk.cpumask, cfg.spdk.no_huge, cfg.spdk.no_pci) == (
        "/var/tmp/spdk.sock", "0x1", None, False)
    assert cfg.drives[0].block_size == 512


def test_drive_uuid_is_stable_per_node_and_drive() -> None:
    doc = minimal(drives=[{"file": "/d/a.img", "size": "1MiB"}, {"file": "/d/b.img", "size": "1MiB"}])
    first = parse_node_config(doc).drives
    again = parse_node_config(copy.deepcopy(doc)).drives
    other_node = parse_node_config({**doc, "name": "node2"}).drives
    assert [d.uuid for d in first] == [d.uuid for d in again]
    assert first[0].uuid != first[1].uuid
    assert first[0].uuid != other_node[0].uuid
    assert first[0].uuid.version == 5


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 << 20), ("1GiB", 1 << 30), ("4096", 4096), (4096, 4096), ("1.5GiB", 3 << 29),
     ("2 KiB", 2048)],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("text", ["64MB", "abc", "-1", "", True, "1.5", 0, "0MiB"])
def test_bad_sizes_name_the_field(text: Any) -> None:
    with pytest.raises(NodeConfigError, match=r"^drives\[0\]\.malloc: "):
        parse_node_config(minimal(drives=[{"malloc": text}]))


def _drives(n_good: int, bad: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"malloc": "1MiB", "name": f"m{i}"} for i in range(n_good)] + [bad]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"drives": _drives(2, {"file": "/x", "size": "64 megs"})}, "drives[2].size: must be a size like"),
        ({"nmae": "x"}, "nmae: unknown key"),
        ({"spdk": {"hugepage": 4}}, "spdk.hugepage: unknown key"),
        ({"drives": [{"malloc": "1MiB", "pci": "0000:01:00.0"}]}, "drives[0]: must have exactly one of"),
        ({"drives": [{"size": "1MiB"}]}, "drives[0]: must have exactly one of"),
        ({"drives": [{"pci": "01:00.0"}]}, "drives[0].pci: must be a PCI address"),
        ({"drives": [{"block_device": "sdb"}]}, "drives[0].block_device: must be a path under /dev/"),
        ({"drives": [{"file": "/x"}]}, "drives[0].size: required"),
        ({"drives": [{"pci": "0000:01:00.0", "size": "1MiB"}]}, "drives[0].size: only a file drive"),
        ({"drives": [{"malloc": "1MiB", "block_size": 1024}]}, "drives[0].block_size: must be one of"),
        ({"drives": [{"malloc": 1000, "block_size": 512}]}, "drives[0]: size 1000 is not a multiple"),
        ({"drives": [{"malloc": "1MiB", "uuid": "nope"}]}, "drives[0].uuid: must be a UUID"),
        ({"drives": [{"malloc": "1MiB", "name": "a"}, {"malloc": "1MiB", "name": "a"}]}, "drives[1].name:"),
        ({"drives": [{"file": "/x", "size": 512}, {"file": "/x", "size": 512}]}, "drives[1].source:"),
        ({"drives": []}, "drives: needs at least 1 entry"),
        ({"data_addresses": [{"address": "10.0.0.300"}]}, "data_addresses[0].address: must be an IP"),
        ({"data_addresses": [{"address": "10.0.0.1", "port": 0}]}, "data_addresses[0].port: must be an int"),
        ({"data_addresses": [{"address": "10.0.0.1", "mtu": 9}]}, "data_addresses[0].mtu:"),
        ({"data_addresses": [{"address": "10.0.0.1", "interface": "x" * 16}]}, "data_addresses[0].interface"),
        ({"data_addresses": [{"address": "10.0.0.1", "port": 8009}]}, "data_addresses[0].port: 8009"),
        ({"data_addresses": [{"address": "10.0.0.1"}, {"address": "10.0.0.1"}]}, "data_addresses[1]: 10."),
        ({"data_addresses": [{"port": 4420}]}, "data_addresses[0].address: required"),
        ({"hostnqns": ["nqn.2014-08.org.nvmexpress:uuid:1"]}, "allow_any_host: cannot be true"),
        ({"allow_any_host": False}, "hostnqns: list the allowed host NQNs"),
        ({"allow_any_host": False, "hostnqns": ["host1"]}, "hostnqns[0]: must be an NQN"),
        ({"nqn": "nqn.kahu"}, "nqn: must be an NQN"),
        ({"name": "bad name"}, "name: must be 1..63 letters"),
        ({"serial_number": "x" * 21}, "serial_number: at most 20"),
        ({"spdk": {"cores": [0], "cpumask": "0x1"}}, "spdk.cores: give either"),
        ({"spdk": {"cpumask": "3"}}, "spdk.cpumask: must be a hex mask"),
        ({"spdk": {"no_huge": "maybe"}}, "spdk.no_huge: must be true or false"),
        ({"spdk": {"rpc_socket": "spdk.sock"}}, "spdk.rpc_socket: must be an absolute path"),
        ({"transport": {"options": {"trtype": "RDMA"}}}, "transport.options.trtype:"),
        ({"transport": {"options": {"x": [1]}}}, "transport.options.x: must be a number"),
        ({"transport": {"rdma": "yes please"}}, "transport.rdma: must be true or false"),
    ],
)
def test_errors_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError) as err:
        parse_node_config(minimal(**overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_name_is_required_and_the_document_must_be_a_mapping() -> None:
    doc = minimal()
    del doc["name"]
    with pytest.raises(NodeConfigError, match=r"^name: required"):
        parse_node_config(doc)
    with pytest.raises(NodeConfigError, match="must be a mapping"):
        parse_node_config(["name", "x"])


def test_normalised_form_parses_back_to_the_same_config(tmp_path: Path) -> None:
    for cfg in (parse_node_config(yaml.safe_load(FULL)), NodeConfig.default(tmp_path)):
        assert parse_node_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_one_machine_default(tmp_path: Path) -> None:
    cfg = NodeConfig.default(tmp_path)
    (drive,) = cfg.drives
    assert drive.kind is DriveKind.FILE and drive.size == 256 << 20
    assert Path(drive.source or "").parent.parent == tmp_path
    (addr,) = cfg.data_addresses
    assert (addr.address, addr.port, cfg.discovery_port) == ("127.0.0.1", 4420, 8009)
    assert cfg.allow_any_host is True
    assert cfg.nqn == f"nqn.2026-11.io.kahu:{cfg.name}"


def test_load_reports_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match="cannot read"):
        load_node_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(NodeConfigError, match="not valid YAML"):
        load_node_config(bad)
    good = tmp_path / "node.yaml"
    good.write_text(FULL)
    assert load_node_config(good).name == "node1"


def test_cli_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "node.yaml"
    good.write_text(FULL)
    assert cli_main.main(["node", "check-config", str(good)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert parse_node_config(printed) == load_node_config(good)
    assert printed["drives"][2]["size"] == "1536MiB" and printed["spdk"]["cpumask"] == "0x5"

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(drives=_drives(2, {"file": "/x", "size": "big"}))))
    assert cli_main.main(["node", "check-config", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "drives[2].size: must be a size like 64MiB" in captured.err
